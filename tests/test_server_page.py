"""The page at ``/`` in a real browser: Debian's chromium driven by Playwright, its fake microphone reading a WAV
file.  The page keeps a copy of the PCM16 it sent (its "keep audio" option, downloaded as a WAV), so the live
transcript is compared with the offline transcript of exactly those samples: the fake device's resampling and
looping then cannot blur the comparison.  Screenshots go to ``test-artifacts/``."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from voxtral_realtime.benchmarking.signals import speechlike
from voxtral_realtime.server import create_app
from voxtral_realtime.writers import to_srt, to_txt, to_vtt

from . import chromium
from .live_server import serve_in_thread

NODE = shutil.which("node")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
WEB = Path(__file__).resolve().parent.parent / "src" / "voxtral_realtime" / "server" / "web"
SPEECH_SECONDS = 3.0


@pytest.fixture(scope="module")
def microphone_wav(tmp_path_factory) -> Path:
    """Speech, then silence: the fake device loops the file, and the test stops well before the loop."""
    audio = np.concatenate([speechlike(SPEECH_SECONDS, seed=51), np.zeros(16000 * 6, np.float32)])
    path = tmp_path_factory.mktemp("microphone") / "microphone.wav"
    sf.write(path, audio, 16000, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def browser(microphone_wav):
    with chromium.sync_playwright()() as playwright:
        browser = chromium.launch(playwright, "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                  "--disable-component-update", "--no-first-run", microphone=microphone_wav)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page_server(tiny_short):
    app = create_app(tiny_short, model_name="tiny", max_streams=4)
    with serve_in_thread(app) as base:
        yield base, app


@pytest.fixture
def page(browser):
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert errors == [], f"uncaught errors in the page: {errors}"


def _screenshot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    page.screenshot(path=path, full_page=True)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(path, ARTIFACTS / name)


def _download(page, button: str) -> bytes:
    with page.expect_download() as download:
        page.click(button)
    return Path(download.value.path()).read_bytes()


def test_microphone_captions_equal_the_offline_transcript_of_the_audio_sent(page, page_server, tiny_short,
                                                                            microphone_wav, tmp_path):
    base, app = page_server
    page.goto(f"{base}/?keep_audio=1")
    page.click("#mic-start")
    page.wait_for_selector("body[data-state=live]", timeout=30_000)
    # captions appear while the microphone is still on
    page.wait_for_function("document.querySelector('#transcript').textContent.length > 0", timeout=30_000)
    page.wait_for_timeout(SPEECH_SECONDS * 500)
    _screenshot(page, tmp_path, "browser-live-captions-in-progress.png")
    page.wait_for_timeout(SPEECH_SECONDS * 500 + 500)
    page.click("#mic-stop")
    page.wait_for_selector("body[data-state=done]", timeout=60_000)
    shown = page.text_content("#transcript")
    assert page.text_content("#tail-text") == ""  # once done, nothing is provisional

    sent, rate = sf.read(io.BytesIO(_download(page, "#download-wav")), dtype="int16")
    assert rate == 16000 and len(sent) >= 16000 * SPEECH_SECONDS
    sent = sent.astype(np.float32) / 32768
    # it is the file's speech that went through the AudioWorklet, not silence
    source, _ = sf.read(microphone_wav, dtype="float32")
    source_level, sent_level = np.abs(source[:16000 * 2]).mean(), np.abs(sent[:16000 * 4]).mean()
    assert 0.3 * source_level < sent_level < 1.5 * source_level

    offline = tiny_short.transcribe(sent)
    assert tiny_short.tokenizer.eos_id not in offline.tokens  # the page's always-on stream equals it then
    assert shown == offline.text
    # every word is listed with its latency, and the downloads hold the same transcript
    assert page.locator("#words li").count() == len(offline.words)
    assert page.locator("#words li .latency").count() == len(offline.words)
    assert "p50" in page.text_content("#latency-summary")
    assert _download(page, "#download-txt").decode() == to_txt(offline)
    assert _download(page, "#download-srt").decode() == to_srt(offline)
    assert _download(page, "#download-vtt").decode() == to_vtt(offline)
    _screenshot(page, tmp_path, "browser-live-captions.png")
    state = app.state.voxtral
    assert state.worker.free_slots == state.limits.max_streams


def test_file_upload_shows_the_offline_transcript(page, page_server, tiny_short, tmp_path):
    base, _ = page_server
    audio = speechlike(4.0, seed=52)
    path = tmp_path / "upload.flac"
    sf.write(path, audio, 16000, format="FLAC")
    expected = tiny_short.transcribe(path)
    page.goto(base)
    page.set_input_files("#file-input", str(path))
    page.wait_for_selector("body[data-state=done]", timeout=60_000)
    assert page.text_content("#transcript") == expected.text
    assert page.locator("#words li").count() == len(expected.words)
    assert _download(page, "#download-srt").decode() == to_srt(expected)
    _screenshot(page, tmp_path, "browser-file-upload.png")


def test_the_page_says_when_the_server_refuses_it(browser, tiny_short, tmp_path):
    app = create_app(tiny_short, model_name="tiny", max_streams=1, api_key="the-key")
    with serve_in_thread(app) as base:
        context = browser.new_context()
        page = context.new_page()
        page.goto(base)
        page.click("#mic-start")
        page.wait_for_selector("body[data-state=error]", timeout=30_000)
        assert "API key" in page.text_content("#status")
        page.set_input_files("#file-input", {"name": "a.wav", "mimeType": "audio/wav", "buffer": b"RIFF"})
        page.wait_for_selector("body[data-state=error]", timeout=30_000)
        assert "API key" in page.text_content("#status")
        # with the key, the same page works
        page.click("summary")
        page.fill("#api-key", "the-key")
        page.click("#mic-start")
        page.wait_for_selector("body[data-state=live]", timeout=30_000)
        page.click("#mic-stop")
        page.wait_for_selector("body[data-state=done]", timeout=60_000)
        context.close()


def test_resampler_keeps_speech_band_and_removes_what_would_alias(tmp_path):
    """The page's 48/44.1 kHz -> 16 kHz converter, run by node on pure tones."""
    if NODE is None:
        pytest.skip("node is not installed")
    script = tmp_path / "resample.mjs"
    script.write_text(f"""
import {{ StreamingResampler }} from {str(WEB / 'resampler.js')!r};
const results = [];
for (const [rate, freq] of [[48000, 1000], [44100, 440], [48000, 6000], [48000, 12000], [22050, 3000]]) {{
  const resampler = new StreamingResampler(rate, 16000);
  const input = Float32Array.from({{length: rate}}, (_, i) => 0.5 * Math.sin(2 * Math.PI * freq * i / rate));
  const parts = [];
  for (let i = 0; i < input.length; i += 128) parts.push(...resampler.push(input.subarray(i, i + 128)));
  parts.push(...resampler.flush());
  let error = 0, power = 0;
  for (let n = 200; n < parts.length - 200; n++) {{
    const expected = freq < 8000 ? 0.5 * Math.sin(2 * Math.PI * freq * n / 16000) : 0;
    error = Math.max(error, Math.abs(parts[n] - expected));
    power += parts[n] * parts[n] / (parts.length - 400);
  }}
  results.push({{rate, freq, length: parts.length, error, rms: Math.sqrt(power)}});
}}
console.log(JSON.stringify(results));
""")
    import json

    out = subprocess.run([NODE, str(script)], capture_output=True, text=True, check=True).stdout
    results = {(r["rate"], r["freq"]): r for r in json.loads(out)}
    for key in [(48000, 1000), (44100, 440), (22050, 3000)]:
        assert results[key]["length"] == 16000
        assert results[key]["error"] < 1e-3, results[key]
    assert results[(48000, 6000)]["rms"] == pytest.approx(0.5 / np.sqrt(2), rel=0.02)  # passband up to 6 kHz
    assert results[(48000, 12000)]["rms"] < 1e-3  # above 8 kHz: removed, not folded back to 4 kHz


def test_page_subtitles_equal_ours_from_the_words_the_server_sends(tmp_path):
    """The page writes SRT/VTT from the server's word events (times in whole milliseconds); they must equal the
    writers' files of the unrounded words, half milliseconds included: words decided in the closing silence
    all sit at the audio's end, e.g. 75976 samples = 4.7485 s (the cue is then one millisecond long)."""
    if NODE is None:
        pytest.skip("node is not installed")
    import json

    from voxtral_realtime.server.worker import word_dict
    from voxtral_realtime.transcription import Transcription, Word

    end = 75976 / 16000
    words = [Word("One", 0.0625, 0.4215), Word("two.", 0.4215, 1.0005), Word("Late", 2.5, 3.0)]
    words += [Word("get", end, end) for _ in range(4)]
    result = Transcription(text=" " + " ".join(w.text for w in words), words=words, duration=end)
    script = tmp_path / "subtitles.mjs"
    script.write_text(f"""
import {{ toSrt, toVtt }} from {str(WEB / 'subtitles.js')!r};
const words = {json.dumps([word_dict(w) for w in words])};
console.log(JSON.stringify({{srt: toSrt(words), vtt: toVtt(words)}}));
""")
    out = json.loads(subprocess.run([NODE, str(script)], capture_output=True, text=True, check=True).stdout)
    assert out["srt"] == to_srt(result)
    assert out["vtt"] == to_vtt(result)
    assert "00:00:04,748 --> 00:00:04,749" in out["srt"]
