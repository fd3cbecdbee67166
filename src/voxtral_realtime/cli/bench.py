"""``voxtral bench``: speed of the paths this package runs (:mod:`..benchmarking`)."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

import torch

from ..api import default_device
from ..audio import load_audio
from ..benchmarking import benchmark
from ..benchmarking.signals import speechlike
from ..errors import VoxtralError
from .common import (
    DELAY_HELP,
    Reporter,
    add_model_options,
    delay_ms,
    int_list,
    load_model,
    positive_float,
    positive_int,
    quant_list,
    random_model_loader,
)

EPILOG_BENCH = """\
examples:
  voxtral bench --random-weights                              # one 30 s file, bf16 on the GPU
  voxtral bench --random-weights --step-batches 1,64,256 --streams 64,128,256 --json bench.json
  voxtral bench --model ./voxtral --audio talk.wav --compare transformers
  voxtral bench --random-weights --dtype f32 --device cpu --audio-seconds 5

Rows: encode/decode time of the file, ms per decoder step (host wall time; "gpu ms" is the replayed CUDA
graph alone), achieved GB/s of weights read per step against the measured copy bandwidth, real-time factor
(compute / audio time: below 1 is faster than real time).  Streams: every 80 ms tick each stream brings 80 ms
of audio; "real time" means the 99th-percentile tick takes less than 80 ms.
"""

def add_parser(sub: Any) -> None:
    bn = sub.add_parser("bench", help="measure speed: ms per decoder step, real-time factor, concurrent streams",
                        description="Time the paths this package runs, against the GPU's measured copy bandwidth "
                                    "(the memory floor of a decoder step) and, with --compare, the reference "
                                    "implementation on the same weights.",
                        epilog=EPILOG_BENCH, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(bn)
    bn.add_argument("--random-weights", action="store_true",
                    help="the real model's shapes with random values instead of --model (no download; timing "
                         "does not depend on the values)")
    bn.add_argument("--audio", type=Path, metavar="FILE", help="audio file to transcribe (default: synthetic)")
    bn.add_argument("--audio-seconds", type=positive_float, default=30.0,
                    help="length of the synthetic audio (default: %(default)s)")
    bn.add_argument("--delay-ms", type=delay_ms, help=DELAY_HELP)
    bn.add_argument("--step-batches", type=int_list, default=[1], metavar="B,B,...",
                    help="time the batched decoder step alone at these numbers of streams (default: 1)")
    bn.add_argument("--step-context", type=positive_int, default=400, metavar="TOKENS",
                    help="tokens already in each stream's decoder cache for --step-batches (default: 400 = 32 s)")
    bn.add_argument("--streams", type=int_list, default=[], metavar="N,N,...",
                    help="simulate N concurrent live streams (80 ms of audio per stream per tick) and report "
                         "tick time, latency and whether all keep up with real time")
    bn.add_argument("--stream-seconds", type=positive_float, default=30.0,
                    help="length of each simulated live stream (default: %(default)s)")
    bn.add_argument("--compare", choices=["transformers"],
                    help="also time the reference implementation on the same weights and audio")
    bn.add_argument("--compile", action="store_true",
                    help="compile the batched calls with torch.compile first (fuses small kernels; adds about a "
                         "minute of compilation per batch size)")
    bn.add_argument("--check-precision", action="store_true",
                    help="compare this dtype's logits and tokens with float32 compute on the same weights")
    bn.add_argument("--quant", type=quant_list, default=[], metavar="TYPE,...",
                    help="then also time the model quantized to these GGUF types (q4_0, q4_k, q8_0), each built "
                         "afresh: one-file and decoder-step rows next to the unquantized ones")
    bn.add_argument("--json", type=Path, metavar="FILE", help="also write every number to FILE")
    bn.add_argument("--no-progress", action="store_true", help="no progress bar while loading")
    bn.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    reporter = Reporter(enabled=not args.no_progress)
    if args.audio is not None and not args.audio.is_file():
        raise VoxtralError(f"{args.audio}: no such file")

    def build_model() -> Any:
        built = random_model_loader(args, reporter)() if args.random_weights else load_model(args, reporter)
        built.compile = args.compile
        return built

    def save_report() -> None:  # after every part, so a later failure or timeout keeps what was measured
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    model = build_model()
    audio = load_audio(args.audio) if args.audio else speechlike(args.audio_seconds, seed=1)
    report: dict[str, Any] = benchmark.environment(model, shlex.join(["voxtral", *args.argv]))
    reporter.info(f"{report['device_name']}: {model.dtype}, copy bandwidth "
                  f"{report['copy_gb_per_s'] or 0:.0f} GB/s, step floor {report['step_floor_ms'] or 0:.2f} ms")
    report["file"] = benchmark.bench_file(model, audio, delay_ms=args.delay_ms)
    report["steps"] = [benchmark.bench_step(model, b, args.step_context) for b in args.step_batches]
    save_report()
    report["streams"] = []
    for n in args.streams:
        reporter.info(f"simulating {n} live streams of {args.stream_seconds:g} s")
        try:
            report["streams"].append(benchmark.bench_streams(model, n, seconds=args.stream_seconds,
                                                             delay_ms=args.delay_ms))
        except torch.OutOfMemoryError:
            report["streams"].append({"streams": n, "error": "out of memory"})
            torch.cuda.empty_cache()
            break
    if args.compare:
        reporter.info("timing transformers on the same weights and audio")
        report["transformers"] = benchmark.bench_transformers(model, audio, delay_ms=args.delay_ms)
        report["speedup_vs_transformers"] = report["transformers"]["total_s"] / report["file"]["total_s"]
        report["transformers"]["tokens_equal"] = report["transformers"]["token_ids"] == report["file"]["token_ids"]
    if args.check_precision:
        reporter.info("comparing with float32 compute on the same weights")
        report["precision"] = benchmark.bench_precision(model, audio[: 16000 * 10], delay_ms=args.delay_ms)
    report["quantized"] = []
    save_report()
    for qtype in args.quant:
        del model
        benchmark.release(torch.device(args.device) if args.device else default_device())
        model = build_model()
        reporter.info(f"quantizing to {qtype}")
        try:
            report["quantized"].append(benchmark.bench_quantized(model, qtype, audio, args.step_batches,
                                                                 args.step_context, delay_ms=args.delay_ms))
        except Exception as exc:  # noqa: BLE001 - one failing path must not lose the rows measured before it
            reporter.error(f"{qtype}: {type(exc).__name__}: {exc}")
            report["quantized"].append({"qtype": qtype, "error": f"{type(exc).__name__}: {exc}"})
        save_report()
    benchmark.print_report(report)
    return 0
