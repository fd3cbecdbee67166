"""``voxtral export web``: the ONNX step graphs, run by onnxruntime one 80 ms step at a time, give the tokens of
:meth:`Model.transcribe` (fp32: identical, with both windows wrapped many times on the short checkpoint and
unwrapped on the long one); quantized exports are measured and their agreement reported; bad sources, bad
exports and bad options fail with one line."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from voxtral_realtime.benchmarking.signals import speechlike

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from voxtral_realtime.browser import WebExport, copy_page, export_web, read_manifest, step_agreement
from voxtral_realtime.cli import main
from voxtral_realtime.errors import VoxtralError

#: Long enough that the short checkpoint's windows (12 encoder frames, 10 decoder tokens) wrap many times.
SECONDS = 5.0


@pytest.fixture(scope="module")
def audio() -> np.ndarray:
    return speechlike(SECONDS, seed=11)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_short, tiny_long) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("web")
    made = {}
    for name, model in (("short", tiny_short), ("long", tiny_long)):
        made[name, "fp32"] = root / f"{name}-fp32"
        export_web(model, made[name, "fp32"], quant="fp32")
    for quant in ("fp16", "q8", "q4"):
        made["short", quant] = root / f"short-{quant}"
        export_web(tiny_short, made["short", quant], quant=quant)
    return made


@pytest.mark.parametrize("name", ["short", "long"])
def test_fp32_export_gives_the_models_transcription(name, exports, audio, tiny_short, tiny_long):
    model = {"short": tiny_short, "long": tiny_long}[name]
    expected = model.transcribe(audio)
    got = WebExport(exports[name, "fp32"]).transcribe(audio)
    assert got.tokens == expected.tokens
    assert got.to_dict() == expected.to_dict()
    steps = len(expected.tokens)
    if name == "short":  # the rings really wrapped: more positions than either window holds
        cfg = model.config
        assert steps > 3 * cfg.decoder.sliding_window
        assert steps * cfg.audio.downsample_factor > 3 * cfg.encoder.sliding_window


def test_other_delays_and_teacher_forced_agreement_of_fp32(exports, audio, tiny_short):
    export = WebExport(exports["short", "fp32"])
    expected = tiny_short.transcribe(audio, delay_ms=160)
    assert export.transcribe(audio, delay_ms=160).tokens == expected.tokens
    assert step_agreement(export, audio, expected.tokens, delay_ms=160) == 1.0


def test_decoder_context_cap_equals_the_engines(tiny_long, audio, tmp_path):
    # a capped decoder ring attends to the last N tokens exactly as an engine built with decoder_context=N
    export_web(tiny_long, tmp_path, quant="fp32", decoder_context=10)
    session = tiny_long.stream(engine=tiny_long.engine(1, decoder_context=10))
    session.feed(audio)
    session.finish()
    expected = session.transcription.tokens
    assert expected != tiny_long.transcribe(audio).tokens  # the cap matters on this audio
    assert WebExport(tmp_path).transcribe(audio).tokens == expected


def test_quantized_exports_are_smaller_and_their_agreement_is_reported(exports, audio, tiny_short, record_property):
    import onnx

    expected = tiny_short.transcribe(audio).tokens
    sizes = {q: sum(f["bytes"] for f in read_manifest(exports["short", q])["files"] if f["name"] != "tekken.json")
             for q in ("fp32", "fp16", "q8", "q4")}
    rates = {}
    for quant in ("fp16", "q8", "q4"):
        export = WebExport(exports["short", quant])
        got = export.transcribe(audio).tokens
        free = sum(a == b for a, b in zip(got, expected)) / len(expected)
        forced = step_agreement(export, audio, expected)
        rates[quant] = (free, forced)
        record_property(f"{quant}_agreement", f"free-running {free:.3f}, teacher-forced {forced:.3f}")
        print(f"{quant}: {sizes[quant]} bytes of graphs+weights (fp32 {sizes['fp32']}); tokens equal to the "
              f"model's: free-running {free:.1%}, teacher-forced {forced:.1%}")
    assert sizes["q4"] < sizes["q8"] < sizes["fp16"] < sizes["fp32"]
    for quant in ("q4", "q8"):
        ops = {n.op_type for n in onnx.load(str(exports["short", quant] / "decoder_step.onnx"),
                                            load_external_data=False).graph.node}
        assert "MatMulNBits" in ops
        # the token lookup reads the quantized head: no float copy of the table is shipped
        names = {i.name for i in onnx.load(str(exports["short", quant] / "decoder_step.onnx"),
                                             load_external_data=False).graph.initializer}
        assert not any(n.startswith("embedding.") for n in names)
    # fp16 storage only rounds the weights: with the reference's history fed back it picks nearly every token
    assert rates["fp16"][1] > 0.9


def test_size_arithmetic_matches_the_measured_exports(exports, tiny_short):
    from voxtral_realtime.browser import estimate_export_bytes

    for quant in ("fp32", "fp16", "q8", "q4"):
        files = read_manifest(exports["short", quant], verify=False)["files"]
        estimate = estimate_export_bytes(tiny_short.config, quant)
        for graph, key in (("audio_step", "audio_graph"), ("decoder_step", "decoder_graph")):
            measured = sum(f["bytes"] for f in files if f["name"].startswith(graph + "."))
            # what the arithmetic leaves out is the graph's structure (nodes, names): tens of KB
            assert 0 <= measured - estimate[key] < 64 * 1024, (quant, graph, measured, estimate[key])


def test_weights_are_split_into_shards_of_at_most_the_limit(tmp_path, tiny_short, audio):
    limit = 256 * 1024
    manifest = export_web(tiny_short, tmp_path, quant="fp32", shard_bytes=limit)
    shards = [f for f in manifest["files"] if ".weights." in f["name"]]
    assert len(shards) >= 4
    assert all(f["bytes"] <= limit for f in shards)
    for graph in manifest["graphs"].values():
        assert graph["weights"] and all((tmp_path / w).is_file() for w in graph["weights"])
    assert WebExport(tmp_path).transcribe(audio).tokens == tiny_short.transcribe(audio).tokens


def test_q4_head_and_lookup_split_in_blocks_equal_one_block(exports, tmp_path, tiny_short, audio):
    # quantization blocks run along the input dimension, so cutting the head's rows into several MatMulNBits (and
    # the lookup into several dequantizing gathers) must not change a single token
    export_web(tiny_short, tmp_path, quant="q4", shard_bytes=256 * 1024)
    import onnx

    graph = onnx.load(str(tmp_path / "decoder_step.onnx"), load_external_data=False).graph
    assert len([i for i in graph.initializer if i.name.startswith("head.") and i.name.endswith("_Q4")]) >= 2
    assert WebExport(tmp_path).transcribe(audio).tokens == WebExport(exports["short", "q4"]).transcribe(audio).tokens


def test_manifest_describes_the_step_graphs(exports, tiny_short):
    manifest = read_manifest(exports["short", "fp32"])
    cfg, tok = tiny_short.config, tiny_short.tokenizer
    assert manifest["special"]["bos"] == tok.bos_id and manifest["special"]["eos"] == tok.eos_id
    assert manifest["special"]["streaming_pad"] == tok.streaming_pad_id
    assert manifest["audio"]["step_window"] == 7 * 160 + 400
    assert manifest["delay"]["default_ms"] == cfg.audio.transcription_delay_ms
    decoder_state = manifest["graphs"]["decoder"]["state"]
    assert len(decoder_state) == 2 * cfg.decoder.n_layers
    assert decoder_state[0]["shape"] == [1, cfg.decoder.n_kv_heads, cfg.decoder.sliding_window,
                                         cfg.decoder.head_dim]
    encoder_state = manifest["graphs"]["audio"]["state"]
    assert encoder_state[2]["shape"][2] == cfg.encoder.sliding_window + cfg.audio.downsample_factor - 1


def test_check_prints_what_transcribe_prints(checkpoints, tmp_path, audio, capsys):
    import soundfile

    wav = tmp_path / "talk.wav"
    soundfile.write(wav, audio, 16000)
    model_dir = str(checkpoints["short"].mistral_dir)
    assert main(["transcribe", str(wav), "--model", model_dir, "--device", "cpu", "--output-format", "json"]) == 0
    expected = capsys.readouterr().out
    assert main(["export", "web", "--model", model_dir, "--out", str(tmp_path / "out"), "--quant", "fp32",
                 "--check", str(wav), "--output-format", "json"]) == 0
    out, err = capsys.readouterr()
    assert out == expected
    assert json.loads(out)["tokens"]
    assert "(identical)" in err


@pytest.mark.parametrize("problem", ["missing", "corrupt params", "no weights"])
def test_bad_source_is_one_line(problem, checkpoints, tmp_path, capsys):
    import shutil

    source = tmp_path / "model"
    if problem != "missing":
        shutil.copytree(checkpoints["short"].mistral_dir, source)
    if problem == "corrupt params":
        (source / "params.json").write_text("{dim: 64,")
    if problem == "no weights":
        (source / "consolidated.safetensors").unlink()
    code = main(["export", "web", "--model", str(source), "--out", str(tmp_path / "out"), "--quant", "fp32"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error:") and err.count("\n") == 1, err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_bad_quant_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "web", "--out", "x", "--quant", "q3"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'q3'" in capsys.readouterr().err
    with pytest.raises(VoxtralError, match="unknown quantization 'q3'"):
        export_web(None, "x", quant="q3")


def test_missing_or_corrupted_files_of_an_export_are_refused(exports, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(exports["short", "fp32"], folder)
    shard = folder / "decoder_step.weights.0"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(VoxtralError, match="decoder_step.weights.0: sha256 mismatch"):
        WebExport(folder)
    shard.unlink()
    with pytest.raises(VoxtralError, match=r"decoder_step.weights.0: missing \(listed in manifest.json\)"):
        read_manifest(folder)
    with pytest.raises(VoxtralError, match="no manifest.json"):
        read_manifest(tmp_path)


def _fake_npm_tarball(path: Path) -> Path:
    """The layout of `npm pack onnxruntime-web` with stand-in contents."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("package/package.json", b'{"version": "9.9.9"}'),
                           ("package/dist/ort.webgpu.bundle.min.mjs", b"export const x = 1;"),
                           ("package/dist/ort-wasm-simd-threaded.jsep.wasm", b"\0asm")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_page_and_runtime_files_come_from_an_npm_tarball(tmp_path):
    tarball = _fake_npm_tarball(tmp_path / "onnxruntime-web-9.9.9.tgz")
    out = tmp_path / "site"
    out.mkdir()
    copied = copy_page(out, tarball)
    assert "index.html" in copied
    assert (out / "ort" / "ort.webgpu.bundle.min.mjs").read_bytes() == b"export const x = 1;"
    assert (out / "ort" / "VERSION").read_text().strip() == "9.9.9"
    (tmp_path / "junk.tgz").write_bytes(b"not a tarball")
    with pytest.raises(VoxtralError, match="not an onnxruntime-web npm tarball"):
        copy_page(out, tmp_path / "junk.tgz")


def test_serve_mounts_the_page_at_local(exports, tmp_path):
    import shutil

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from voxtral_realtime.browser import mount_local
    from voxtral_realtime.server import create_app

    site = tmp_path / "site"
    shutil.copytree(exports["short", "fp32"], site)
    app = create_app(lambda: None)
    with pytest.raises(VoxtralError, match="no page in it"):
        mount_local(app, site)
    copy_page(site, _fake_npm_tarball(tmp_path / "ort.tgz"))
    mount_local(app, site)
    client = TestClient(app)  # not entered: the lifespan (model loading) does not run
    page = client.get("/local/")
    assert page.status_code == 200 and "local.js" in page.text
    assert page.headers["cross-origin-embedder-policy"] == "require-corp"
    assert client.get("/local/manifest.json").json() == json.loads((site / "manifest.json").read_text())
    assert client.get("/local/ort/ort.webgpu.bundle.min.mjs").text == "export const x = 1;"
    redirect = client.get("/local", follow_redirects=False)
    assert redirect.status_code in (302, 307) and redirect.headers["location"].endswith("/local/")
    server_page = client.get("/")
    assert server_page.status_code == 200 and "local.js" not in server_page.text


def test_missing_onnx_is_one_line(monkeypatch, capsys, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "onnx", None)  # what an environment without the package looks like
    assert main(["export", "web", "--model", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: exporting for the web needs onnx") and err.count("\n") == 1, err


def test_full_size_bench_script_runs_on_small_shapes(tmp_path):
    """bench/web_export_full.py (the GPU machine's command) on a tiny params.json: every phase lands in its JSON,
    the CPU timing and the IO-binding path (CUDA's, here on the CPU) agree step by step."""
    import copy
    import os
    import subprocess
    import sys

    from voxtral_realtime.config import FULL_SIZE_PARAMS

    params = copy.deepcopy(FULL_SIZE_PARAMS)
    params.update(dim=128, hidden_dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, vocab_size=4096)
    params["multimodal"]["whisper_model_args"]["encoder_args"].update(dim=64, hidden_dim=128, n_layers=2,
                                                                      n_heads=2, n_kv_heads=2, head_dim=32)
    (tmp_path / "params.json").write_text(json.dumps(params))
    root = Path(__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(root / "bench" / "web_export_full.py"), "--params",
                           str(tmp_path / "params.json"), "--out", str(tmp_path / "out"), "--steps", "3",
                           "--bound-cpu-steps", "3", "--json", str(tmp_path / "r.json")],
                          check=False, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["finished"] and report["command"].endswith("r.json")
    phases = [p["phase"] for p in report["phases"]]
    assert phases[0] == "build the float32 model" and len([p for p in phases if p.startswith("export ")]) == 7
    runs = report["onnxruntime_runs"]
    assert runs["cpu"]["steps"] == 3 and runs["cpu"]["decoder_step_ms"] > 0
    assert runs["cpu_iobinding"]["embedding_max_abs_diff_vs_cpu"] == 0.0
    assert runs["cpu_iobinding"]["next_tokens_same_as_cpu"] == 1.0
    assert report["measured_bytes"]["download"] > 0 and "q4_within_target" in report
