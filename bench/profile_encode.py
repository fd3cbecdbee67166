"""Where the encode stage of a file goes: one 30 s file through a session of the full-size model (random weights),
the CUDA kernels of its encoder calls by total time and the stage's wall time against the kernels' sum.  A
diagnostic for developers (bench/results/profile_encode_*.txt).

    python bench/profile_encode.py [--quant q4_0] [--compile] [--seconds 30]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from voxtral_realtime.quantization import quantize_network
from voxtral_realtime.random_weights import random_model
from voxtral_realtime.signals import speechlike


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quant")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    model = random_model(device="cuda", dtype=torch.bfloat16)
    if args.quant:
        quantize_network(model.network, args.quant)
    model.compile = args.compile
    audio = speechlike(args.seconds, seed=1)
    for _ in range(2):  # the second run has every shape of the timed one compiled / captured
        model.transcribe(audio)
    session = model.stream()
    engine = session.engine
    encode = engine._encode
    spans: list[float] = []

    def timed_encode() -> bool:
        torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.profiler.record_function("encode stage"):
            progressed = encode()
        torch.cuda.synchronize()
        spans.append(time.perf_counter() - started)
        return progressed

    engine._encode = timed_encode
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        with torch.profiler.record_function("feed+finish"):
            session.feed(audio)
            session.finish()
        torch.cuda.synchronize()
    print(f"{torch.cuda.get_device_name()} quant={args.quant} compile={args.compile}: encode stage {sum(spans):.3f} s "
          f"wall in {len(spans)} calls (profiled)")
    events = prof.key_averages()
    print(events.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    print(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
