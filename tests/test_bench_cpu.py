"""`voxtral bench --device cpu` on the tiny model, and the CrispASR comparison's plumbing with a fake library (the
real one is not installed here).  No timing is asserted beyond sanity: speed lives in bench/results."""

from __future__ import annotations

import json
import math
import os
import sys
import types

import pytest
import torch

from voxtral_realtime.benchmarking import cpu, crispasr
from voxtral_realtime.benchmarking.signals import speechlike
from voxtral_realtime.cli import main

# captured from the library's stderr (crispasr 0.8.45, voxtral4b backend, CRISPASR_VOXTRAL4B_BENCH=1 and
# CRISPASR_VOXTRAL4B_STREAM_TIMING=1): the first llm_kv call is the prompt's prefill
CRISPASR_LOG = """\
voxtral4b: fused QKV for 26 LLM layers (q+k+v -> qkv)
voxtral4b_bench: encoder      412.31 ms
voxtral4b_bench: llm_kv       210.50 ms
voxtral4b_bench: llm_kv        36.90 ms
voxtral4b_bench: llm_kv        37.10 ms
voxtral4b_bench: llm_kv        36.50 ms
voxtral4b_stream: drain 3 decode steps in 110.5 ms (avg 36.83 ms/step); flush total 121.0 ms
"""


def test_parse_crispasr_timing():
    parsed = crispasr.parse_timing(CRISPASR_LOG)
    assert parsed["prefill_ms"] == 210.5
    assert parsed["decoder_steps"] == 3
    assert parsed["decoder_step_ms"] == pytest.approx((36.9 + 37.1 + 36.5) / 3)
    assert parsed["drain_steps"] == 3 and parsed["drain_ms_per_step"] == 36.83
    assert crispasr.parse_timing("no timing lines") == {}


class _FakeCrispSession:
    """crispasr.Session's surface as the bench uses it; writes timing lines to file descriptor 2 as the C library
    does."""

    def __init__(self, model, *, n_threads, backend, use_gpu, verbosity):
        assert backend == "voxtral4b" and not use_gpu and os.environ["CRISPASR_VOXTRAL4B_BENCH"] == "1"
        self.threads = n_threads

    def _steps(self, n):
        os.write(2, ("voxtral4b_bench: llm_kv 200.0 ms\n" + f"voxtral4b_bench: llm_kv {60 / self.threads} ms\n" * n)
                 .encode())

    def transcribe(self, pcm):
        assert os.environ.get("CRISPASR_VOXTRAL4B_STREAM_BATCH_ENCODER") == "1"
        self._steps(len(pcm) // 1280)
        return []

    def stream_open(self, live):
        assert live
        session = self

        class Stream:
            def feed(self, pcm):
                assert len(pcm) <= 1280

            def flush(self):
                session._steps(4)

            def close(self):
                pass

        return Stream()

    def close(self):
        pass


@pytest.fixture
def fake_crispasr(monkeypatch, tmp_path):
    """The crispasr package faked in this process; its GGUF build skipped; its timings run here, not in a
    fresh process (the fake does not exist there)."""
    module = types.ModuleType("crispasr")
    module.Session = _FakeCrispSession
    monkeypatch.setitem(sys.modules, "crispasr", module)
    monkeypatch.setattr(crispasr, "available", lambda: True)
    model = tmp_path / "crisp-q4_k.gguf"
    model.write_bytes(b"GGUF")
    monkeypatch.setattr(crispasr, "crispasr_gguf", lambda converter, threads, cache_dir=None: model)
    monkeypatch.setattr(crispasr, "measure_fresh", crispasr.measure)
    for switch in ("CRISPASR_VOXTRAL4B_BENCH", "CRISPASR_VOXTRAL4B_STREAM_TIMING",
                   "CRISPASR_VOXTRAL4B_STREAM_BATCH_ENCODER"):
        monkeypatch.setenv(switch, "")  # so that the measurement's setting is undone after the test
        monkeypatch.delenv(switch)
    converter = tmp_path / "convert-voxtral4b-to-gguf.py"
    converter.write_text("")
    return converter


def test_cpu_bench_reports_every_field(checkpoints, tiny_short, tmp_path, fake_crispasr, monkeypatch, capsys):
    measure_bandwidth = cpu.read_bandwidth
    monkeypatch.setattr(cpu, "read_bandwidth", lambda threads: measure_bandwidth(threads, nbytes=2**28))
    out = tmp_path / "cpu.json"
    assert main(["bench", "--device", "cpu", "--model", str(checkpoints["short"].mistral_dir), "--threads", "1",
                 "--quant", "q4_0,q8_0", "--audio-seconds", "3", "--stream-seconds", "2", "--compare", "crispasr",
                 "--crispasr-converter", str(fake_crispasr), "--json", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert report["command"].startswith("voxtral bench --device cpu")
    assert report["read_gb_per_s"]["1"] > 0
    assert [(r["qtype"], r["threads"]) for r in report["runs"]] == [("q4_0", 1), ("q8_0", 1)]
    for r in report["runs"]:
        assert r["kernel"] == "onnxruntime MatMulNBits"
        assert 0 < r["step_floor_ms"] <= r["decoder_step_ms"] and r["step_x_floor"] >= 1
        assert r["decode_weight_gb"] > 0
        live = r["live_compute"]
        assert live["steps"] == 25 and 0 < live["encoder_ms_per_step"] < live["ms_per_step"]
        paced = r["live"]
        assert paced["audio_s"] == 2.0 and paced["tokens"] > 0 and paced["compute_ms_per_step"] > 0
        assert 0 <= paced["token_latency_ms_p50"] <= paced["token_latency_ms_p99"] <= paced["token_latency_ms_max"]
        assert paced["rtf"] == pytest.approx(paced["compute_ms_per_step"] / paced["tick_ms"])
        assert paced["keeps_up"] is True  # the tiny model takes a few ms a step
        assert r["file"]["audio_s"] == 3.0 and 0 < r["file"]["rtf"]
        # a fresh process each: its peak is a tiny model's, far below the bench process's bandwidth buffer
        assert 0 < r["rss_after_load_gib"] <= r["peak_rss_gib"] < 2
    # a step reads every decoder weight once (Q8_0: 34 bytes per 32), those onnxruntime holds included, and the
    # token table once (as the LM head; its lookups read one row)
    decoder = tiny_short.network.decoder
    weights = sum(m.weight.numel() for m in decoder.modules() if isinstance(m, torch.nn.Linear))
    weights += decoder.tok_embeddings.weight.numel()
    q8_bytes = report["runs"][1]["decode_weight_gb"] * 1e9
    assert weights * 34 / 32 < q8_bytes < weights * 34 / 32 * 1.02  # + norms
    crisp = report["crispasr"]
    assert crisp["qtype"] == "q4_k" and crisp["audio_s"] == 3.0
    (run,) = crisp["runs"]
    assert run["threads"] == 1 and run["decoder_step_ms"] == pytest.approx(60.0)
    assert run["offline"]["decoder_steps"] == 3 * 16000 // 1280 and run["live_decoder_step_ms"] == pytest.approx(60)
    assert run["offline_rtf"] > 0 and run["live_rtf"] > 0
    printed = capsys.readouterr().out
    assert "CrispASR" in printed and "q4_0" in printed and "q8_0" in printed


def test_live_paced_latency_on_a_virtual_clock(tiny_short):
    """With no compute time, each token is decided when its audio arrives, plus the chunks that the model's
    look-ahead (the step's last mel window reaching past its 80 ms) waits for."""
    now = [0.0]
    result = cpu.live_paced(tiny_short, speechlike(3.0, seed=2), clock=lambda: now[0],
                            sleep=lambda s: now.__setitem__(0, now[0] + s))
    audio = tiny_short.config.audio
    # the samples one step's mel frames read: its last frame's window reaches past the step's end
    window = (audio.samples_per_token // audio.hop_length - 1) * audio.hop_length + audio.window_size
    waits = math.ceil((window - audio.samples_per_token) / audio.samples_per_token)
    expected = waits * 1000 * audio.samples_per_token / audio.sample_rate
    assert result["feeds"] == 3000 // 80 and result["tokens"] > 10
    assert result["token_latency_ms_p50"] == pytest.approx(expected)
    assert result["token_latency_ms_max"] == pytest.approx(expected)
    assert result["final_backlog_ms"] == 0 and result["keeps_up"] is True


def test_read_bandwidth_is_positive():
    assert cpu.read_bandwidth(1, nbytes=2**24) > 0


def test_random_gguf_is_written_once(tmp_path, monkeypatch):
    from voxtral_realtime.benchmarking import random_weights

    written = []

    def fake_write(config, params, tekken, out, *, qtype):
        written.append(qtype)
        out.write_bytes(b"GGUF")
        return [out]

    monkeypatch.setattr(random_weights, "write_random_gguf", fake_write)
    first = cpu.random_gguf("q4_k", tmp_path)
    assert cpu.random_gguf("q4_k", tmp_path) == first == tmp_path / "random-full-q4_k.gguf"
    assert written == ["q4_k"] and list(tmp_path.iterdir()) == [first]


def test_crispasr_checkpoint_names_are_those_save_pretrained_writes(tmp_path):
    from safetensors import safe_open
    from transformers import VoxtralRealtimeConfig, VoxtralRealtimeForConditionalGeneration

    config = VoxtralRealtimeConfig(
        audio_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "head_dim": 16},
        text_config={"vocab_size": 512, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16})

    def stored(folder):
        names = {}
        for path in folder.glob("*.safetensors"):
            with safe_open(str(path), "np") as f:
                names |= {k: f.get_slice(k).get_shape() for k in f.keys()}
        return names

    VoxtralRealtimeForConditionalGeneration(config).save_pretrained(tmp_path / "real")
    ours = crispasr.write_hf_checkpoint(tmp_path / "ours", config, shard_bytes=20_000)
    assert len(list(ours.glob("model-*.safetensors"))) > 1
    assert stored(ours) == stored(tmp_path / "real")
    assert json.loads((ours / "config.json").read_text())["text_config"]["hidden_size"] == 32
    assert (ours / "tekken.json").is_file()


def test_crispasr_quantization_rule():
    from gguf import GGMLQuantizationType as T

    assert crispasr.quantized_type("blk.0.attn_q.weight", [3072, 4096], T.F16) == T.Q4_K
    assert crispasr.quantized_type("audio.blk.0.attn_q.weight", [1280, 2048], T.F16) == T.Q4_K
    assert crispasr.quantized_type("blk.0.ffn_down.weight", [9216 + 32, 3072], T.F16) == T.Q4_0
    assert crispasr.quantized_type("blk.0.attn_norm.weight", [3072, 1], T.F32) == T.F32
    assert crispasr.quantized_type("blk.0.ada_norm_down.weight", [3072, 32], T.F32) == T.F32
    assert crispasr.quantized_type("audio.conv.1.weight", [3, 128, 1280], T.F16) == T.F16
    assert crispasr.quantized_type("audio.attn_q.bias", [1280], T.F32) == T.F32


@pytest.mark.parametrize(("args", "message"), [
    (["--threads", "0"], "give positive whole numbers"),
    (["--quant", "q5_0"], "unknown quantization 'q5_0'"),
])
def test_cpu_bench_rejects_bad_numbers(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--device", "cpu", "--random-weights", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["--compare", "crispasr"], "needs the crispasr package: pip install crispasr"),
    (["--threads", "2", "--streams", "2"], "--threads is an option of the CPU bench"),
])
def test_cpu_bench_usage_errors_are_one_line(args, message, capsys, monkeypatch):
    monkeypatch.setattr(crispasr, "available", lambda: False)
    assert main(["bench", "--device", "cpu", "--random-weights", "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_compare_crispasr_needs_the_converter(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(crispasr, "available", lambda: True)
    assert main(["bench", "--device", "cpu", "--random-weights", "--compare", "crispasr", "--no-progress"]) == 2
    assert "give --crispasr-converter PATH" in capsys.readouterr().err
    assert main(["bench", "--device", "cpu", "--random-weights", "--compare", "crispasr", "--no-progress",
                 "--crispasr-converter", str(tmp_path / "nope.py")]) == 2
    assert "nope.py: no such file" in capsys.readouterr().err


def test_gguf_model_with_quant_is_one_line(tmp_path, capsys, tiny_short):
    from voxtral_realtime.gguf_file import write_gguf

    model = write_gguf(tiny_short.source, tmp_path / "m.gguf", qtype="q8_0")[0]
    assert main(["bench", "--device", "cpu", "--model", str(model), "--quant", "q4_0", "--no-progress"]) == 2
    assert "is a GGUF file of its own type" in capsys.readouterr().err

