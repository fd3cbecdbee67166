"""Where a stage of a file goes: one 30 s file through a session of the full-size model (random weights), the
CUDA kernels of the stage's calls by total time, the stage's wall time against the kernels' sum and the wall time of
its batched calls (CUDA graphs) by size.  For the decode stage also the prompt's prefill calls (wall, each
synchronized) apart from the one-position steps.  A diagnostic for developers
(bench/results/profile_{encode,decode}_*.txt; before session 10 this was bench/profile_encode.py, the encode stage
only).

    python bench/profile_stage.py [--stage encode|decode] [--quant q4_0] [--compile] [--seconds 30]
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch
from torch.profiler import ProfilerActivity, profile
from tune_step import full_size_model

from voxtral_realtime.benchmarking.signals import speechlike


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", choices=("encode", "decode"), default="encode")
    parser.add_argument("--quant")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    model = full_size_model(args.quant)
    model.compile = args.compile
    audio = speechlike(args.seconds, seed=1)
    for _ in range(2):  # the second run has every shape of the timed one compiled / captured
        model.transcribe(audio)

    def run(profiled: bool):
        """One session through the file; its stage (and prefill) calls timed, each synchronized."""
        session = model.stream()
        engine = session.engine
        engine.capture_graphs()
        spans: dict[str, list[float]] = {args.stage: [], "prefill": []}
        graph_calls: dict[int, list[float]] = {}  # the stage's batched calls by steps per row: seconds each

        def timed(name: str, call, seconds_of=None):
            """``call`` synchronized before and after, its wall time appended to ``spans[name]`` (or to
            ``seconds_of(*args)``)."""
            def run_call(*a, **k):
                torch.cuda.synchronize()
                started = time.perf_counter()
                with torch.profiler.record_function(f"{name} call"):
                    out = call(*a, **k)
                torch.cuda.synchronize()
                (seconds_of(*a) if seconds_of else spans[name]).append(time.perf_counter() - started)
                return out
            return run_call

        setattr(engine, f"_{args.stage}", timed(args.stage, getattr(engine, f"_{args.stage}")))
        batched_call = engine._call
        timed_batched_call = timed("batched", batched_call,
                                   lambda key, fn: graph_calls.setdefault(key[2], []))
        engine._call = lambda key, fn: (timed_batched_call if key[0] == args.stage else batched_call)(key, fn)
        if args.stage == "decode":
            engine._prefill = timed("prefill", engine._prefill)
        calls_before = engine.decode_calls
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) if profiled else nullcontext() as prof:
            with torch.profiler.record_function("feed+finish"):
                session.feed_all(audio, piece=model.transcription_piece)
            torch.cuda.synchronize()
        print(f"{torch.cuda.get_device_name()} quant={args.quant} compile={args.compile}"
              f"{' (profiled)' if profiled else ''}: {args.stage} stage {sum(spans[args.stage]):.3f} s wall in "
              f"{len(spans[args.stage])} calls")
        for steps, seconds in sorted(graph_calls.items(), reverse=True):
            print(f"  {len(seconds)} batched call(s) of {steps} step(s): {1000 * sum(seconds) / len(seconds):.2f} ms "
                  "each")
        if args.stage == "decode":
            print(f"  of which prefill {sum(spans['prefill']):.4f} s in {len(spans['prefill'])} calls; decoder "
                  f"calls {engine.decode_calls - calls_before}")
        return prof

    run(profiled=False)
    prof = run(profiled=True)
    events = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
    print(f"CUDA kernels' sum over feed+finish: {kernel_us / 1e6:.3f} s")
    print(events.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    print(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
