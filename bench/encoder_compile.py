"""A one-stream engine's encoder calls by size (CUDA graphs of eager ops, as the engine runs them) against the same
calls compiled first with ``torch.compile(dynamic=True)``: the setup time (capture, plus compilation) and each call
size's time.  A diagnostic for developers (bench/results/encoder_compile_session11.txt, where compiling cut a call
by about 1.6x but took 207 s: not adopted).

    python bench/encoder_compile.py [--quant q4_0,...]
"""

from __future__ import annotations

import argparse
import time

import torch
from tune_step import full_size_model

from voxtral_realtime.engine import Engine


def per_size(engine: Engine, repeats: int = 20) -> dict[int, float]:
    """Milliseconds per encoder call of each size (rows disabled, as capture_graphs runs them: nothing changes)."""
    out = {}
    with torch.no_grad():
        engine._tick_enabled.zero_()
        for steps in engine._tick_steps:
            def call(n=steps):
                return engine._call(("encode", 1, n), lambda: engine._encode_fn(1, n))
            call()
            torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(repeats):
                call()
            torch.cuda.synchronize()
            out[steps] = 1000 * (time.perf_counter() - started) / repeats
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quant", default=",q4_0", help="comma-separated: '' (bf16), q4_0, q4_k")
    args = parser.parse_args()
    for quant in args.quant.split(","):
        model = full_size_model(quant or None)
        for compiled in (False, True):
            engine = Engine(model.network, max_streams=1, compile=True)
            if compiled:
                engine._encode_fn = torch.compile(engine._encode_rows, dynamic=True)
            started = time.perf_counter()
            engine.capture_graphs()
            torch.cuda.synchronize()
            setup = time.perf_counter() - started
            sizes = per_size(engine)
            print(f"{torch.cuda.get_device_name()} quant={quant or None} encoder "
                  f"{'compiled dynamic' if compiled else 'eager'}: capture (+compile) {setup:.1f} s; ms per call by "
                  "steps: " + ", ".join(f"{s}: {ms:.2f}" for s, ms in sizes.items()), flush=True)
            del engine
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
