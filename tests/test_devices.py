"""GPU path: same tokens as the CPU f32 path on the tiny model (runs on the device machine; skipped in CPU CI)."""

from __future__ import annotations

import pytest
import torch

from voxtral_realtime.benchmarking.signals import speechlike

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("name", ["short", "long"])
def test_cuda_f32_tokens_equal_cpu_f32(checkpoints, name, tiny_short, tiny_long):
    import voxtral_realtime

    cpu = {"short": tiny_short, "long": tiny_long}[name]
    gpu = voxtral_realtime.load(checkpoints[name].mistral_dir, device="cuda", dtype="f32")
    audio = speechlike(12.0, seed=31)
    assert gpu.transcribe(audio).tokens == cpu.transcribe(audio).tokens


def test_cuda_bf16_runs_to_the_end(checkpoints):
    import voxtral_realtime

    model = voxtral_realtime.load(checkpoints["short"].mistral_dir, device="cuda", dtype="bf16")
    assert model.dtype == torch.bfloat16 and model.device.type == "cuda"
    result = model.transcribe(speechlike(5.0, seed=3))
    assert len(result.tokens) > 0


def test_cuda_graph_engine_with_many_streams_equals_cpu(checkpoints, tiny_short):
    """Streams batched on the GPU (CUDA graphs per bucket, rows joining and leaving) give the CPU f32 tokens."""
    import voxtral_realtime

    from .test_engine import _round_robin

    gpu = voxtral_realtime.load(checkpoints["short"].mistral_dir, device="cuda", dtype="f32")
    # five streams join two rounds apart; two more join once the first ones have left and take their rows
    plan = [(speechlike(3.0 + i / 3, seed=40 + i), (80, 240, 480, 960)[i % 4], 2 * i if i < 5 else 60 + i)
            for i in range(7)]
    engine = gpu.engine(5)
    assert engine._graphs is not None
    sessions = _round_robin(gpu, engine, plan, 1280)
    for session, (audio, delay_ms, _) in zip(sessions, plan):
        assert session.transcription.tokens == tiny_short.transcribe(audio, delay_ms=delay_ms).tokens
    assert engine.decode_rows > engine.decode_calls


def test_bench_runs_on_cuda(checkpoints, tmp_path):
    """The benchmark harness end to end on the tiny model (numbers are not checked: speed lives in bench/)."""
    import json

    from voxtral_realtime.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(checkpoints["short"].mistral_dir), "--audio-seconds", "3",
                 "--step-batches", "1,8", "--streams", "4", "--stream-seconds", "2", "--check-precision",
                 "--json", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert report["steps"][0]["gpu_ms_per_step"] > 0
    assert report["precision"]["steps"] > 0


def test_compiled_engine_and_compiled_q4_engine(checkpoints, tiny_short):
    """torch.compile'd decode (the benchmark's path) gives the eager tokens, unquantized and with the 4-bit kernel
    inside the compiled graph."""
    import voxtral_realtime
    from voxtral_realtime.quantization import quantize_network

    audio = speechlike(4.0, seed=5)
    gpu = voxtral_realtime.load(checkpoints["short"].mistral_dir, device="cuda", dtype="f32")
    gpu.compile = True
    assert gpu.transcribe(audio).tokens == tiny_short.transcribe(audio).tokens
    quantize_network(gpu.network, "q4_0")
    gpu.compile = False
    eager = gpu.transcribe(audio).tokens
    gpu.compile = True
    assert gpu.transcribe(audio).tokens == eager


def test_warm_up_captures_every_graph_transcription_uses(checkpoints, tiny_short):
    """After ``warm_up`` (what ``voxtral transcribe`` shows as "capturing CUDA graphs") a transcription captures
    no graph of its own, and gives the CPU tokens."""
    import voxtral_realtime

    gpu = voxtral_realtime.load(checkpoints["short"].mistral_dir, device="cuda", dtype="f32")
    gpu.warm_up()
    engine = gpu.engine_for_session()
    captured = dict(engine._graphs._graphs)
    assert captured
    audio = speechlike(6.0, seed=8)
    assert gpu.transcribe(audio).tokens == tiny_short.transcribe(audio).tokens
    assert gpu.engine_for_session() is engine and engine._graphs._graphs == captured
