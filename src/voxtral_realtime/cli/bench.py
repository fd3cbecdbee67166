"""``voxtral bench``: speed of the paths this package runs (:mod:`..benchmarking`)."""

from __future__ import annotations

import argparse
import json
import shlex
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..api import default_device
from ..audio import SAMPLE_RATE, load_audio
from ..benchmarking import benchmark, cpu, crispasr
from ..benchmarking.signals import speechlike
from ..errors import UsageError, VoxtralError
from ..gguf_file import KEY_QUANTIZATION, gguf_files
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
  voxtral bench --device cpu --random-weights --threads 16,8 --quant q4_0,q4_k --json cpu.json
  voxtral bench --device cpu --random-weights --compare crispasr --crispasr-converter convert-voxtral4b-to-gguf.py

Rows: encode/decode time of the file, ms per decoder step (host wall time; "gpu ms" is the replayed CUDA
graph alone), achieved GB/s of weights read per step against the measured copy bandwidth, real-time factor
(compute / audio time: below 1 is faster than real time).  Streams: every 80 ms tick each stream brings 80 ms
of audio; "real time" means the 99th-percentile tick takes less than 80 ms.

On the CPU (--device cpu, or no GPU) the bench measures each --quant type (default q4_0,q4_k) at each --threads
count in a fresh process: the memory-read bandwidth and the decoder step's floor from it (weight bytes / bandwidth),
the decoder step, the encoder's and the whole live step's cost when fed 80 ms at a time, a live stream fed at
real-time pace (token latency beyond the delay, compute per 80 ms step, RTF, work still queued at the end), the
file's offline RTF and the process's peak resident memory.  --random-weights writes a full-size GGUF of each type
once into ~/.cache/voxtral-realtime/ (the float model never exists); a folder or Hub id is quantized into a
temporary GGUF; a GGUF file is measured as it is.  --step-batches, --streams, --compare transformers,
--check-precision and --compile instead time the model in this process, as on a GPU.
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
    bn.add_argument("--step-batches", type=int_list, metavar="B,B,...",
                    help="time the batched decoder step alone at these numbers of streams (default: 1)")
    bn.add_argument("--step-context", type=positive_int, default=400, metavar="TOKENS",
                    help="tokens already in each stream's decoder cache for --step-batches (default: 400 = 32 s)")
    bn.add_argument("--streams", type=int_list, metavar="N,N,...",
                    help="simulate N concurrent live streams (80 ms of audio per stream per tick) and report "
                         "tick time, latency and whether all keep up with real time")
    bn.add_argument("--stream-seconds", type=positive_float, default=30.0,
                    help="length of each simulated live stream, and of the CPU bench's real-time-paced one "
                         "(default: %(default)s)")
    bn.add_argument("--compare", choices=["transformers", "crispasr"],
                    help="also time the reference implementation (transformers) on the same weights and audio, "
                         "or on the CPU CrispASR (ggml; pip install crispasr) on random full-size weights at Q4_K "
                         "(needs --crispasr-converter)")
    bn.add_argument("--crispasr-converter", type=Path, metavar="PATH",
                    help="CrispASR's converter, models/convert-voxtral4b-to-gguf.py of its repository "
                         "(github.com/CrispStrobe/CrispASR; not on PyPI), for --compare crispasr")
    bn.add_argument("--threads", type=int_list, metavar="N,N,...",
                    help="CPU bench: thread counts to measure at (default: the CPUs this process may use)")
    bn.add_argument("--compile", action="store_true",
                    help="compile the batched calls with torch.compile first (fuses small kernels; adds about a "
                         "minute of compilation per batch size)")
    bn.add_argument("--check-precision", action="store_true",
                    help="compare this dtype's logits and tokens with float32 compute on the same weights")
    bn.add_argument("--quant", type=quant_list, metavar="TYPE,...",
                    help="then also time the model quantized to these GGUF types (q4_0, q4_k, q8_0), each built "
                         "afresh: one-file and decoder-step rows next to the unquantized ones; on the CPU the "
                         "types measured (default: q4_0,q4_k)")
    bn.add_argument("--json", type=Path, metavar="FILE", help="also write every number to FILE")
    bn.add_argument("--no-progress", action="store_true", help="no progress bar while loading")
    bn.set_defaults(func=run)


IN_PROCESS_OPTIONS = ("step_batches", "streams", "check_precision", "compile")


def run(args: argparse.Namespace) -> int:
    if args.audio is not None and not args.audio.is_file():
        raise VoxtralError(f"{args.audio}: no such file")
    device = torch.device(args.device) if args.device else default_device()
    in_process = args.compare == "transformers" or any(getattr(args, o) for o in IN_PROCESS_OPTIONS)
    if device.type == "cpu" and not in_process:
        return run_cpu(args)
    for given, option in ((args.threads, "--threads"), (args.compare == "crispasr", "--compare crispasr"),
                          (args.crispasr_converter, "--crispasr-converter")):
        if given:
            raise UsageError(f"{option} is an option of the CPU bench (--device cpu, without "
                             "--step-batches, --streams, --compare transformers, --check-precision or --compile)")
    args.step_batches, args.streams, args.quant = args.step_batches or [1], args.streams or [], args.quant or []
    return run_in_process(args)


def run_in_process(args: argparse.Namespace) -> int:
    """Every part on the model loaded in this process (the GPU bench)."""
    reporter = Reporter(enabled=not args.no_progress)

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


def run_cpu(args: argparse.Namespace) -> int:
    """The CPU bench (``benchmarking.cpu``): each quantization type at each thread count in a fresh process."""
    reporter = Reporter(enabled=not args.no_progress)
    converter = crispasr.check_options(args.crispasr_converter) if args.compare == "crispasr" else None
    threads = args.threads or [cpu.usable_cpus()]
    audio = load_audio(args.audio) if args.audio else speechlike(args.audio_seconds, seed=1)
    report: dict[str, Any] = cpu.environment(shlex.join(["voxtral", *args.argv]))
    report["model"] = "random weights" if args.random_weights else args.model
    report["audio_s"] = len(audio) / SAMPLE_RATE

    def save_report() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    report["read_gb_per_s"], report["runs"] = {}, []
    with tempfile.TemporaryDirectory(prefix="voxtral-bench-") as scratch:
        models = _cpu_models(args, Path(scratch), reporter)
        for n in threads:  # with no model loaded
            report["read_gb_per_s"][str(n)] = cpu.read_bandwidth(n)
            reporter.info(f"memory-read bandwidth at {n} threads: {report['read_gb_per_s'][str(n)]:.1f} GB/s")
        for qtype, model in models:
            for n in threads:
                reporter.info(f"measuring {qtype} at {n} threads in a fresh process")
                result = cpu.measure_fresh(cpu.CpuRun(str(model), qtype, n, audio, args.stream_seconds,
                                                      args.delay_ms, args.dtype))
                cpu.add_floor(result, report["read_gb_per_s"][str(n)])
                report["runs"].append(result)
                save_report()
    if converter is not None:
        reporter.info("timing CrispASR on the same machine (its GGUF is built once and cached)")
        try:
            report["crispasr"] = crispasr.bench(converter, audio, threads)
        except Exception as exc:  # noqa: BLE001 - our rows are measured already: keep them
            report["crispasr"] = {"error": f"{type(exc).__name__}: {exc}"}
    save_report()
    cpu.print_report(report)
    return 1 if any("error" in r for r in report["runs"]) else 0


def _cpu_models(args: argparse.Namespace, scratch: Path, reporter: Reporter) -> list[tuple[str, Path]]:
    """(quantization type, GGUF file) to measure: cached random full-size files, the given GGUF, or the given
    checkpoint quantized into ``scratch``."""
    from ..gguf_file import write_gguf

    quants = args.quant or ["q4_0", "q4_k"]
    if args.random_weights:
        for qtype in quants:
            if not (cpu.CACHE_DIR / f"random-full-{qtype}.gguf").is_file():
                reporter.info(f"writing a full-size {qtype} GGUF of random weights into {cpu.CACHE_DIR} (once)")
        return [(qtype, cpu.random_gguf(qtype)) for qtype in quants]
    files = gguf_files(args.model)
    if files is not None:
        if args.quant:
            raise UsageError(f"{args.model} is a GGUF file of its own type; --quant picks the types to quantize a "
                             "checkpoint folder (or --random-weights) into")
        import gguf

        field = gguf.GGUFReader(files[0]).get_field(KEY_QUANTIZATION)
        return [(field.contents() if field is not None else "gguf", files[0])]
    models = []
    for qtype in quants:
        reporter.info(f"quantizing {args.model} to {qtype}")
        models.append((qtype, write_gguf(args.model, scratch / f"{qtype}.gguf", qtype=qtype)[0]))
    return models
