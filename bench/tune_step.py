"""Compiled decoder step, batch 1: inductor settings compared, and the kernels of the fastest.  A diagnostic for
developers (bench/results/tune_step_h100.txt).

    python bench/tune_step.py
"""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

from voxtral_realtime import benchmark
from voxtral_realtime.random_weights import random_model


def main() -> None:
    import torch._inductor.config as inductor

    model = random_model(device="cuda", dtype=torch.bfloat16)
    model.compile = True
    print(torch.cuda.get_device_name(), torch.__version__)
    for name, settings in [("default", {}), ("coordinate_descent_tuning", {"coordinate_descent_tuning": True})]:
        with inductor.patch(settings):
            t = time.perf_counter()
            result = benchmark.bench_step(model, 1, 400, steps=200)
        print(f"{name}: {result['ms_per_step']:.3f} ms/step wall, {result['gpu_ms_per_step']:.3f} ms GPU "
              f"({time.perf_counter() - t:.0f} s with compilation)", flush=True)

    engine = model.engine(1)
    slot = engine.attach(benchmark._Sink())
    slot.prompt, slot.position, slot.last_token = [], 400, 0
    engine.decoder_cache.reserve(500)
    engine._step_inputs[1, 0] = 400
    engine._step_inputs[2, 0] = 1
    with torch.no_grad():
        for _ in range(3):
            engine._decode_fn(1)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine._decode_fn(1)
            torch.cuda.synchronize()
    events = prof.key_averages()
    print(sum(e.count for e in events if e.device_type.name == "CUDA"), "kernels in one compiled step")
    print(events.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
