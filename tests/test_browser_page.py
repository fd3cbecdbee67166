"""The in-browser page of ``voxtral export web`` in Debian's Chromium, driven by Playwright, on the WebAssembly
backend (and once on WebGPU, through Chromium's software Vulkan): file upload gives the tokens of ``Model.transcribe``; the fake microphone (a WAV) is resampled to 16 kHz
in the page and captioned live with the tokens our streaming session gives for the same captured samples; shards
are cached for the next visit; a missing or corrupted shard and a denied microphone give a clear message.

Skipped without Playwright, without a Chromium, or without the onnxruntime-web npm package (set
VOXTRAL_ONNXRUNTIME_WEB to a tarball or node_modules folder, or have npm fetch it).
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import socketserver
import threading
from pathlib import Path

import numpy as np
import pytest

from voxtral_realtime.benchmarking.signals import speechlike

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
sync_api = pytest.importorskip("playwright.sync_api")

from voxtral_realtime.browser import copy_page, export_web, npm_pack_onnxruntime_web
from voxtral_realtime.errors import VoxtralError

from . import chromium

pytestmark = pytest.mark.skipif(chromium.CHROMIUM is None, reason="no chromium on PATH")
#: a CPU-only headless browser: WebAssembly, the backend every browser has
LOAD_TIMEOUT_MS = 120_000


def _onnxruntime_web() -> Path:
    given = os.environ.get("VOXTRAL_ONNXRUNTIME_WEB")
    if given:
        return Path(given)
    try:
        return npm_pack_onnxruntime_web()
    except VoxtralError as err:
        pytest.skip(f"no onnxruntime-web package: {err}")


class _Server:
    """A plain static file server (like ``python -m http.server``) on a free port, in a thread."""

    def __init__(self, folder: Path) -> None:
        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

        self.httpd = socketserver.ThreadingTCPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=folder))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def wav(tmp_path_factory) -> Path:
    import soundfile

    path = tmp_path_factory.mktemp("page-audio") / "talk.wav"
    soundfile.write(path, speechlike(4.0, seed=21), 16000, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_short) -> Path:
    folder = tmp_path_factory.mktemp("site")
    export_web(tiny_short, folder, quant="fp32")
    copy_page(folder, _onnxruntime_web())
    return folder


@pytest.fixture(scope="module")
def playwright():
    with sync_api.sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright, wav):
    browser = chromium.launch(playwright, microphone=wav)
    yield browser
    browser.close()


def _open(browser, url: str):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "index.html?autoload=1")
    page.wait_for_function("window.voxtralPage && ['ready', 'failed'].includes(voxtralPage.status)",
                           timeout=LOAD_TIMEOUT_MS)
    return page, errors


def test_file_upload_gives_the_models_tokens(site, browser, wav, tiny_short, tmp_path):
    server = _Server(site)
    try:
        page, errors = _open(browser, server.url)
        assert page.evaluate("voxtralPage.status") == "ready", page.evaluate("voxtralPage.error")
        assert "WebAssembly" in page.text_content("#backend")
        page.set_input_files("#file", str(wav))
        page.wait_for_function("['done', 'failed'].includes(voxtralPage.status)", timeout=LOAD_TIMEOUT_MS)
        result = page.evaluate("voxtralPage.result")
        expected = tiny_short.transcribe(wav)
        assert result["tokens"] == expected.tokens
        assert result["text"] == expected.text
        assert [w["text"] for w in result["words"]] == [w.text for w in expected.words]
        with page.expect_download() as download:
            page.click("#download-srt")
        srt = Path(download.value.path()).read_text(encoding="utf-8")
        assert srt.startswith("1\n00:00:0") or not expected.words
        page.screenshot(path=str(tmp_path / "upload.png"))
        assert not errors
    finally:
        server.close()


def test_q4_export_runs_in_the_page_as_in_onnxruntime(browser, wav, tiny_short, tmp_path):
    from voxtral_realtime.browser import WebExport

    folder = tmp_path / "site-q4"
    export_web(tiny_short, folder, quant="q4")
    copy_page(folder, _onnxruntime_web())
    server = _Server(folder)
    try:
        page, errors = _open(browser, server.url)
        assert page.evaluate("voxtralPage.status") == "ready", page.evaluate("voxtralPage.error")
        page.set_input_files("#file", str(wav))
        page.wait_for_function("['done', 'failed'].includes(voxtralPage.status)", timeout=LOAD_TIMEOUT_MS)
        tokens = page.evaluate("voxtralPage.result.tokens")
        assert not errors
    finally:
        server.close()
    # MatMulNBits and the token lookup from the packed head: the same kernels in WebAssembly as natively
    assert tokens == WebExport(folder).transcribe(wav).tokens


def _best_match(signal: np.ndarray, window: np.ndarray) -> float:
    """The highest normalized correlation (cosine) of ``window`` with a segment of ``signal`` of its length
    (normalized per offset: a raw dot product favours the loudest segments, not the matching one)."""
    n = 1 << int(np.ceil(np.log2(len(signal) + len(window))))
    dots = np.fft.irfft(np.fft.rfft(signal, n) * np.conj(np.fft.rfft(window, n)), n)[: len(signal) - len(window) + 1]
    energy = np.concatenate([[0.0], np.cumsum(signal.astype(np.float64) ** 2)])
    norms = np.sqrt(np.maximum(energy[len(window):] - energy[: -len(window)], 0.0))
    return float(np.where(norms > 1e-3, dots / (norms * np.linalg.norm(window) + 1e-12), 0.0).max())


def test_fake_microphone_is_resampled_and_captioned_live(site, browser, wav, tiny_short, tmp_path):
    server = _Server(site)
    try:
        page, errors = _open(browser, server.url)
        page.click("#mic")
        page.wait_for_function("voxtralPage.status === 'listening' || voxtralPage.error", timeout=30_000)
        assert page.evaluate("voxtralPage.error") is None
        # three seconds of captured audio, then stop
        page.wait_for_function("voxtralPage.captured && voxtralPage.captured.length * 1280 >= 48000",
                               timeout=60_000)
        page.click("#mic")
        page.wait_for_function("['done', 'failed'].includes(voxtralPage.status)", timeout=LOAD_TIMEOUT_MS)
        page.screenshot(path=str(tmp_path / "live.png"))
        captured = np.array(page.evaluate("voxtralPage.captured.flatMap((b) => Array.from(b))"), np.float32)
        live = page.evaluate("voxtralPage.result")
        assert not errors
    finally:
        server.close()
    # the capture is the WAV (looped by Chromium), resampled to 16 kHz: each quarter second of it matches the file
    # at some offset.  Window by window, because Chromium's fake capture may skip a block when the machine is
    # loaded (a whole-capture match fell to 0.75 once on CI); a wrong sample rate fails every window.
    import soundfile

    source, _ = soundfile.read(wav, dtype="float32")
    looped = np.tile(source, 2 + 4000 // len(source))
    windows = [captured[i:i + 4000] for i in range(0, len(captured) - 3999, 4000)]
    similarities = [_best_match(looped, w) for w in windows if np.linalg.norm(w) > 1e-3]
    similarity = float(np.mean([s > 0.9 for s in similarities]))
    assert len(similarities) >= 8 and similarity >= 0.9, similarities
    # the live captions are what our own streaming session makes of the same samples
    session = tiny_short.stream(continue_after_eos=True)
    session.feed(captured)
    session.finish()
    expected = session.transcription.tokens
    eos = tiny_short.tokenizer.eos_id
    # after an EOS the page starts over from new audio while the session replays what it holds: compare up to it
    stop = expected.index(eos) + 1 if eos in expected else len(expected)
    print(f"capture: {similarity:.0%} of its windows match the file; {len(live['tokens'])} live tokens, "
          f"compared {stop}")
    assert live["tokens"][:stop] == expected[:stop]
    assert len(live["tokens"]) >= len(captured) // 1280


def test_second_visit_reads_the_shards_from_the_cache(site, browser):
    server = _Server(site)
    try:
        context = browser.new_context()
        fetched: list[str] = []
        context.on("requestfinished", lambda r: fetched.append(r.url) if ".weights." in r.url else None)
        for visit in range(2):
            page = context.new_page()
            page.goto(server.url + "index.html?autoload=1")
            page.wait_for_function("['ready', 'failed'].includes(voxtralPage.status)", timeout=LOAD_TIMEOUT_MS)
            assert page.evaluate("voxtralPage.status") == "ready"
            if visit == 0:
                assert fetched, "the first visit downloads the shards"
                fetched.clear()
            page.close()
        assert fetched == []
        context.close()
    finally:
        server.close()


@pytest.mark.parametrize("damage", ["missing", "corrupted"])
def test_a_bad_shard_is_reported_in_the_page(damage, site, browser, tmp_path):
    folder = tmp_path / "site"
    shutil.copytree(site, folder)
    shard = folder / "decoder_step.weights.0"
    if damage == "missing":
        shard.unlink()
    else:
        data = bytearray(shard.read_bytes())
        data[10] ^= 0x55
        shard.write_bytes(bytes(data))
    server = _Server(folder)
    try:
        page, _ = _open(browser, server.url)
        assert page.evaluate("voxtralPage.status") == "failed"
        message = page.text_content("#error")
        expected = "missing from the export (HTTP 404)" if damage == "missing" else "sha256 mismatch"
        assert message.startswith("decoder_step.weights.0: ") and expected in message, message
    finally:
        server.close()


def test_webgpu_backend_gives_the_models_tokens(site, playwright, tiny_short, tmp_path):
    """WebGPU on SwiftShader (Chromium's software Vulkan): slow, but the same graphs through the WebGPU kernels,
    with the state kept in GPU buffers between steps."""
    import soundfile

    wav = tmp_path / "short.wav"
    soundfile.write(wav, speechlike(1.0, seed=22), 16000, subtype="PCM_16")
    server = _Server(site)
    browser = chromium.launch(playwright, "--enable-unsafe-webgpu", "--use-webgpu-adapter=swiftshader",
                              "--enable-features=Vulkan")
    try:
        page = browser.new_page()
        page.goto(server.url + "manifest.json")
        if not page.evaluate("async () => !!(navigator.gpu && await navigator.gpu.requestAdapter())"):
            pytest.skip("this Chromium has no WebGPU adapter (SwiftShader)")
        page, errors = _open(browser, server.url)
        assert page.text_content("#backend").endswith("on WebGPU")
        page.set_input_files("#file", str(wav))
        page.wait_for_function("['done', 'failed'].includes(voxtralPage.status)", timeout=LOAD_TIMEOUT_MS)
        assert page.evaluate("voxtralPage.result.tokens") == tiny_short.transcribe(wav).tokens
        assert not errors
    finally:
        browser.close()
        server.close()


def test_denied_microphone_is_reported(site, playwright):
    server = _Server(site)
    # no fake-UI flag: the permission prompt is dismissed, as when a user blocks the microphone
    browser = chromium.launch(playwright, "--use-fake-device-for-media-stream", "--deny-permission-prompts")
    try:
        page, _ = _open(browser, server.url)
        page.click("#mic")
        page.wait_for_function("voxtralPage.error !== null", timeout=30_000)
        assert "microphone permission denied" in page.text_content("#error")
    finally:
        browser.close()
        server.close()
