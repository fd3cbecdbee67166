"""GPU path: same tokens as the CPU f32 path on the tiny model (runs on the device machine; skipped in CPU CI)."""

from __future__ import annotations

import pytest
import torch
from signals import speechlike

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
