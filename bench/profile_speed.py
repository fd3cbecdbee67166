"""Where the time goes on the GPU: top kernels of an encoder chunk and of one eager decoder step, and the
compiled decoder step.  A diagnostic for developers (numbers in bench/results/profile_*.txt).

    python bench/profile_speed.py
"""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

from voxtral_realtime.benchmarking import benchmark
from voxtral_realtime.benchmarking.random_weights import random_model


def top_kernels(fn, rows: int = 14) -> str:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    n_kernels = sum(e.count for e in events if e.device_type.name == "CUDA")
    return f"{n_kernels} kernel launches\n" + events.table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70)


def main() -> None:
    model = random_model(device="cuda", dtype=torch.bfloat16)
    net = model.network
    print(torch.cuda.get_device_name(), torch.__version__)

    state = net.encoder.new_state(1, max_chunk=256, device=net.device, dtype=net.dtype)
    state.cache.reserve(1100)
    mel = torch.randn(1, 128, 512, device="cuda")

    def encoder_chunk() -> None:
        state.cache.reset(0)
        with torch.no_grad():
            net.embed_audio(mel, state, torch.arange(0, 256, device="cuda")[None])

    for _ in range(3):
        encoder_chunk()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        encoder_chunk()
    torch.cuda.synchronize()
    print(f"encoder chunk of 256 frames: {1000 * (time.perf_counter() - t) / 10:.2f} ms")
    print(top_kernels(encoder_chunk))

    engine = model.engine(1)
    slot = engine.attach(benchmark._Sink())
    slot.prompt, slot.position = [], 400
    engine.decoder_cache.reserve(500)
    engine._step_inputs[1, 0] = 400
    engine._step_inputs[2, 0] = 1

    def eager_step() -> None:
        with torch.no_grad():
            engine._decode_rows(1)

    print("eager decoder step, batch 1:")
    print(top_kernels(eager_step, rows=20))

    for compiled in (False, True):
        model.compile = compiled
        t = time.perf_counter()
        result = benchmark.bench_step(model, 1, 400)
        print(f"compile={compiled}: {result['ms_per_step']:.2f} ms/step wall, {result.get('gpu_ms_per_step', 0):.2f} ms "
              f"GPU, {result['gb_per_s']:.0f} GB/s (with setup {time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    main()
