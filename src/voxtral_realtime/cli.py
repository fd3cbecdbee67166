"""The ``voxtral`` command line: a thin layer over :mod:`voxtral_realtime.api`.

Transcripts go to stdout, progress bars and messages to stderr.  A user mistake prints one ``error:`` line and
exits non-zero; in a run over several files a bad file is reported and the others are still transcribed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.markup import escape

from .config import SUPPORTED_DELAYS_MS
from .errors import VoxtralError, first_line
from .loading import DEFAULT_MODEL

EPILOG_TRANSCRIBE = """\
examples:
  voxtral transcribe talk.mp3                          # the Hub model, text on stdout
  voxtral transcribe a.wav b.flac --output-format json  # JSON list with text and tokens
  voxtral transcribe talk.m4a --model ./voxtral --delay-ms 960 --output-dir out/

The model is a Hugging Face repo id (downloaded once into the local cache) or a folder with
consolidated.safetensors + params.json + tekken.json (or a transformers config.json + model*.safetensors).
Set VOXTRAL_MODEL to change the default model.  Audio: anything ffmpeg decodes (wav, flac, ogg, mp3, m4a,
webm...), any sample rate and channel count.
"""

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

DELAY_HELP = ("how far the model may look ahead before deciding a word, in ms: 80..1200 in steps of 80, or 2400; "
              "longer is more accurate, shorter is more immediate (default: the model's own, 480)")


def _delay_ms(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of milliseconds") from None
    if value not in SUPPORTED_DELAYS_MS:
        raise argparse.ArgumentTypeError(f"{value} ms is not a delay the model supports (80..1200 in steps of 80, "
                                         "or 2400)")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive whole numbers, e.g. 1,64,256")
    return values


def _positive_int(text: str) -> int:
    values = _int_list(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give one positive whole number")
    return values[0]


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number")
    return value


def _quant_list(text: str) -> list[str]:
    from .quantization import FORMATS

    types = [t.strip().lower() for t in text.split(",") if t.strip()]
    unknown = [t for t in types if t not in FORMATS]
    if unknown or not types:
        raise argparse.ArgumentTypeError(f"unknown quantization {', '.join(unknown) or text!r}; "
                                         f"use {', '.join(FORMATS)}")
    return types


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=os.environ.get("VOXTRAL_MODEL", DEFAULT_MODEL), metavar="REPO_OR_DIR",
                        help="Hub repo id, local checkpoint folder or GGUF file (default: %(default)s)")
    parser.add_argument("--device", help="cuda, cuda:1, cpu, mps (default: the GPU if there is one, else cpu)")
    parser.add_argument("--dtype", choices=["bf16", "f16", "f32"],
                        help="weight precision (default: bf16 on CUDA, f16 on mps, f32 on cpu)")


def _add_gguf_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gguf", metavar="FILE",
                        help="a GGUF model (voxtral quantize's or the Rust project's; a shard set by any shard or "
                             "its folder) instead of --model")
    parser.add_argument("--tokenizer", metavar="TEKKEN_JSON",
                        help="tekken.json for a GGUF file that carries none (the Rust project's files)")


def _size(text: str) -> int:
    from .gguf_file import parse_size

    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="voxtral", description="Streaming speech recognition with Mistral's Voxtral Mini 4B Realtime.")
    parser.add_argument("--version", action="version", version=f"voxtral-realtime {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    tr = sub.add_parser("transcribe", help="transcribe audio files",
                        description="Transcribe audio files with the whole-file (offline) protocol.",
                        epilog=EPILOG_TRANSCRIBE, formatter_class=argparse.RawDescriptionHelpFormatter)
    tr.add_argument("files", nargs="+", metavar="FILE", help="audio or video files")
    _add_model_options(tr)
    _add_gguf_options(tr)
    tr.add_argument("--delay-ms", type=_delay_ms, help=DELAY_HELP)
    tr.add_argument("--output-format", choices=["txt", "json", "srt", "vtt"], default="txt",
                    help="txt: the transcript; json: text, tokens, timed words and segments; srt/vtt: subtitles "
                         "(default: txt)")
    tr.add_argument("--realtime", action="store_true",
                    help="replay each file at 1x speed through a live session: text appears as it is decided, "
                         "then each word's latency is printed on stderr")
    tr.add_argument("--output-dir", type=Path,
                    help="write FILE's transcript to OUTPUT_DIR/<name>.<format> instead of stdout")
    tr.add_argument("--no-progress", action="store_true", help="no progress bars (default when stderr is not a tty)")
    tr.set_defaults(func=cmd_transcribe)

    li = sub.add_parser("listen", help="live captions from the microphone",
                        description="Transcribe the default input device live; Ctrl-C ends and prints the final "
                                    "text.  Needs PortAudio (Debian/Ubuntu: apt install libportaudio2).",
                        epilog="example:\n  voxtral listen --delay-ms 240        # faster captions, a little "
                               "less accurate", formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_options(li)
    li.add_argument("--delay-ms", type=_delay_ms, help=DELAY_HELP)
    li.add_argument("--input-device", help="input device name or index (default: the system default; "
                                           "`python -m sounddevice` lists them)")
    li.add_argument("--no-progress", action="store_true", help="no progress bar while loading")
    li.set_defaults(func=cmd_listen)

    bn = sub.add_parser("bench", help="measure speed: ms per decoder step, real-time factor, concurrent streams",
                        description="Time the paths this package runs, against the GPU's measured copy bandwidth "
                                    "(the memory floor of a decoder step) and, with --compare, the reference "
                                    "implementation on the same weights.",
                        epilog=EPILOG_BENCH, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_options(bn)
    bn.add_argument("--random-weights", action="store_true",
                    help="the real model's shapes with random values instead of --model (no download; timing "
                         "does not depend on the values)")
    bn.add_argument("--audio", type=Path, metavar="FILE", help="audio file to transcribe (default: synthetic)")
    bn.add_argument("--audio-seconds", type=_positive_float, default=30.0,
                    help="length of the synthetic audio (default: %(default)s)")
    bn.add_argument("--delay-ms", type=_delay_ms, help=DELAY_HELP)
    bn.add_argument("--step-batches", type=_int_list, default=[1], metavar="B,B,...",
                    help="time the batched decoder step alone at these numbers of streams (default: 1)")
    bn.add_argument("--step-context", type=_positive_int, default=400, metavar="TOKENS",
                    help="tokens already in each stream's decoder cache for --step-batches (default: 400 = 32 s)")
    bn.add_argument("--streams", type=_int_list, default=[], metavar="N,N,...",
                    help="simulate N concurrent live streams (80 ms of audio per stream per tick) and report "
                         "tick time, latency and whether all keep up with real time")
    bn.add_argument("--stream-seconds", type=_positive_float, default=30.0,
                    help="length of each simulated live stream (default: %(default)s)")
    bn.add_argument("--compare", choices=["transformers"],
                    help="also time the reference implementation on the same weights and audio")
    bn.add_argument("--compile", action="store_true",
                    help="compile the batched calls with torch.compile first (fuses small kernels; adds about a "
                         "minute of compilation per batch size)")
    bn.add_argument("--check-precision", action="store_true",
                    help="compare this dtype's logits and tokens with float32 compute on the same weights")
    bn.add_argument("--quant", type=_quant_list, default=[], metavar="TYPE,...",
                    help="then also time the model quantized to these GGUF types (q4_0, q4_k, q8_0), each built "
                         "afresh: one-file and decoder-step rows next to the unquantized ones")
    bn.add_argument("--json", type=Path, metavar="FILE", help="also write every number to FILE")
    bn.add_argument("--no-progress", action="store_true", help="no progress bar while loading")
    bn.set_defaults(func=cmd_bench)

    dl = sub.add_parser("download", help="download a model from the Hugging Face Hub into the local cache",
                        description="Download (or resume downloading) a checkpoint into the Hugging Face cache and "
                                    "print its local folder.")
    dl.add_argument("repo", nargs="?", default=DEFAULT_MODEL, help="repo id (default: %(default)s)")
    dl.add_argument("--cache-dir", help="cache folder (default: the Hugging Face cache, $HF_HOME)")
    dl.set_defaults(func=cmd_download)
    _add_quantize_parser(sub)
    _add_serve_parser(sub)
    _add_batch_parser(sub)
    _add_export_parser(sub)
    return parser


# ---------------------------------------------------------------------------------------------------------------


class Reporter:
    """Progress bars on stderr (only when it is a terminal, unless asked) and one-line messages."""

    def __init__(self, enabled: bool) -> None:
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)
        self.enabled = enabled and self.console.is_terminal

    def error(self, message: str) -> None:
        # messages hold user paths: "[old]" in a folder name is text, not a rich style tag
        self.console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)

    def info(self, message: str) -> None:
        self.console.print(escape(message), soft_wrap=True)

    @contextmanager
    def bar(self, description: str, total: float, unit: str = "") -> Iterator[Any]:
        """Yields ``update(done, total)``; a no-op when progress is off."""
        if not self.enabled:
            yield lambda done, total: None
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = [TextColumn("{task.description}"), BarColumn(),
                   TextColumn("{task.completed:.0f}/{task.total:.0f}" + unit), TimeElapsedColumn(),
                   TimeRemainingColumn()]
        with Progress(*columns, console=self.console, transient=True) as progress:
            task = progress.add_task(description, total=total)
            yield lambda done, total: progress.update(task, completed=done, total=total)


def _load_model(args: argparse.Namespace, reporter: Reporter) -> Any:
    from .api import load

    model = getattr(args, "gguf", None) or args.model
    with reporter.bar("loading model", total=1, unit=" tensors") as update:
        return load(model, device=args.device, dtype=args.dtype, progress=update,
                    tokenizer=getattr(args, "tokenizer", None))


def cmd_transcribe(args: argparse.Namespace) -> int:
    from .writers import WRITERS

    reporter = Reporter(enabled=not args.no_progress)
    files = [Path(f) for f in args.files]
    readable = []
    failed = 0
    for f in files:  # fail fast on paths that cannot work, before loading gigabytes of weights
        if not f.exists():
            reporter.error(f"{f}: no such file")
            failed += 1
        elif f.is_dir():
            reporter.error(f"{f}: is a directory")
            failed += 1
        else:
            readable.append(f)
    if not readable:
        return 1
    if args.output_dir:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    model = _load_model(args, reporter)
    stems = [f.stem for f in readable]
    realtime = getattr(args, "realtime", False)
    json_records = []
    for f in readable:
        try:
            if realtime:
                result = _replay_in_real_time(model, f, args.delay_ms, reporter)
            else:
                with reporter.bar(f.name, total=1, unit=" s") as update:
                    result = model.transcribe(f, delay_ms=args.delay_ms, progress=update)
        except VoxtralError as err:
            reporter.error(str(err))
            failed += 1
            continue
        if args.output_dir:
            # talk.wav and talk.mp3 in one run must not overwrite each other's transcript
            base = f.name if stems.count(f.stem) > 1 else f.stem
            out = args.output_dir / f"{base}.{args.output_format}"
            text = WRITERS["json"](result, file=str(f)) if args.output_format == "json" else \
                WRITERS[args.output_format](result)
            out.write_text(text, encoding="utf-8")
            reporter.info(f"wrote {out}")
        elif args.output_format == "json":
            json_records.append({"file": str(f), **result.to_dict()})
        elif not realtime:
            header = f"==> {f} <==\n" if len(files) > 1 else ""
            print(header + WRITERS[args.output_format](result), end="", flush=True)
    if json_records:
        print(json.dumps(json_records[0] if len(files) == 1 else json_records, ensure_ascii=False, indent=2))
    return 1 if failed else 0


def _replay_in_real_time(model: Any, path: Path, delay_ms: int | None, reporter: Reporter) -> Any:
    """Feed a file through a live session at 1x speed, printing text as it is decided, then word latencies."""
    import time

    from .audio import load_audio

    samples = load_audio(path)
    session = model.stream(delay_ms=delay_ms)
    step = model.config.audio.samples_per_token
    started = time.perf_counter()
    for start in range(0, len(samples), step):
        wait = started + start / model.config.audio.sample_rate - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        print(session.feed(samples[start:start + step]), end="", flush=True)
    print(session.finish(), flush=True)
    result = session.transcription
    for word in result.words:
        late = f"{1000 * word.latency:7.0f} ms" if word.latency is not None else "      -"
        reporter.info(f"{word.start:8.2f}s  {late}  {word.text}")
    latencies = sorted(w.latency for w in result.words if w.latency is not None)
    if latencies:
        p50, p99 = latencies[len(latencies) // 2], latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        reporter.info(f"{len(latencies)} words; decided this long after their audio + the {result.delay_ms} ms "
                      f"delay had arrived: p50 {1000 * p50:.0f} ms, p99 {1000 * p99:.0f} ms")
    return result


def cmd_listen(args: argparse.Namespace) -> int:
    import queue
    import signal
    import threading

    from .audio import StreamResampler

    reporter = Reporter(enabled=not args.no_progress)
    sd = _import_sounddevice()
    device = int(args.input_device) if args.input_device and args.input_device.isdigit() else args.input_device
    try:
        info = sd.query_devices(device, kind="input")
    except Exception as exc:  # noqa: BLE001 - sounddevice raises ValueError / PortAudioError for no such device
        raise VoxtralError(f"no audio input device{f' {device!r}' if device is not None else ''} "
                           f"({first_line(exc)}); plug in a microphone or pick one with --input-device") from None
    rate = int(info["default_samplerate"])
    model = _load_model(args, reporter)
    session = model.stream(delay_ms=args.delay_ms, continue_after_eos=True)
    resampler = StreamResampler(rate)
    chunks: queue.Queue = queue.Queue()

    def on_audio(indata: Any, frames: int, time_info: Any, status: Any) -> None:
        chunks.put(indata.mean(axis=1) if indata.ndim == 2 else indata.copy())

    # Ctrl-C sets a flag instead of raising, so it never lands in the middle of a model step.
    stop = threading.Event()
    previous_handler = signal.signal(signal.SIGINT, lambda *_: stop.set())
    reporter.info(f"listening on {info['name']} ({rate} Hz); Ctrl-C to stop")
    try:
        with sd.InputStream(samplerate=rate, channels=1, dtype="float32", device=device, callback=on_audio,
                            blocksize=int(rate * 0.08)):
            while not stop.is_set():
                try:
                    chunk = chunks.get(timeout=0.1)
                except queue.Empty:
                    continue
                print(session.feed(resampler.push(chunk)), end="", flush=True)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    while not chunks.empty():  # audio captured before Ctrl-C is transcribed, not dropped
        print(session.feed(resampler.push(chunks.get())), end="", flush=True)
    session.feed(resampler.flush())
    print(session.finish(), flush=True)
    reporter.info(f"final text ({session.duration:.1f} s):")
    print(session.transcription.text.strip(), flush=True)
    return 0


def _import_sounddevice() -> Any:
    try:
        import sounddevice
    except ImportError:
        raise VoxtralError("voxtral listen needs the sounddevice package: pip install sounddevice") from None
    except OSError:  # the package is there but the PortAudio library is not
        raise VoxtralError("voxtral listen needs the PortAudio library (Debian/Ubuntu: apt install "
                           "libportaudio2; macOS: brew install portaudio)") from None
    return sounddevice



def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from . import benchmark
    from .api import default_device
    from .audio import load_audio
    from .signals import speechlike

    reporter = Reporter(enabled=not args.no_progress)
    if args.audio is not None and not args.audio.is_file():
        raise VoxtralError(f"{args.audio}: no such file")

    def build_model() -> Any:
        built = _random_model_loader(args, reporter)() if args.random_weights else _load_model(args, reporter)
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


def cmd_download(args: argparse.Namespace) -> int:
    from .loading import download

    print(download(args.repo, cache_dir=args.cache_dir))
    return 0


EPILOG_QUANTIZE = """\
examples:
  voxtral quantize mistralai/Voxtral-Mini-4B-Realtime-2602 --out voxtral-q4.gguf      # Q4_K
  voxtral quantize ./voxtral --out voxtral-q4_0.gguf --type q4_0   # the Rust project's types exactly
  voxtral quantize ./voxtral --out web/voxtral.gguf --split-size 512M   # web/voxtral-0000i-of-0000N.gguf
  voxtral transcribe talk.wav --gguf voxtral-q4.gguf

Linear weights get --type (q4_k rows that are not whole 256-value blocks get q4_0); the tied token table gets
--embeddings; norms, biases and the conv stem stay float32.  Names are the Mistral checkpoint's, as in the Rust
project's file; params.json and tekken.json go into the metadata.  On the CPU the 4-bit model runs with torch's
int4 kernel without ever expanding the weights.
"""


def _add_quantize_parser(sub: Any) -> None:
    from .gguf_file import EMBEDDING_TYPES

    qu = sub.add_parser("quantize", help="write a quantized GGUF file (Q4_0, Q4_K, Q8_0) of a checkpoint",
                        description="Quantize a checkpoint (Mistral or transformers folder, or Hub repo id) into "
                                    "a GGUF file that `voxtral transcribe --gguf` and the Rust project load.",
                        epilog=EPILOG_QUANTIZE, formatter_class=argparse.RawDescriptionHelpFormatter)
    qu.add_argument("source", metavar="SRC", help="Hub repo id or local checkpoint folder")
    qu.add_argument("--out", required=True, type=Path, metavar="FILE.gguf", help="the file to write")
    qu.add_argument("--type", choices=["q4_0", "q4_k", "q8_0"], default="q4_k",
                    help="block format of the linear weights (default: %(default)s; q4_0 is what the Rust project "
                         "writes, q8_0 is closest to the float model)")
    qu.add_argument("--embeddings", choices=EMBEDDING_TYPES, default="same",
                    help="format of the tied token table / LM head ('same': --type; default: %(default)s)")
    qu.add_argument("--split-size", type=_size, metavar="SIZE",
                    help="cut the file into shards of at most SIZE bytes (e.g. 512M, 2G): FILE-00001-of-0000N.gguf...")
    qu.add_argument("--no-tokenizer", action="store_true",
                    help="do not copy tekken.json into the file (15 MB); the file then names 'tekken.json' beside "
                         "it, or loads with --tokenizer")
    qu.add_argument("--cache-dir", help="Hub cache folder (default: the Hugging Face cache, $HF_HOME)")
    qu.add_argument("--no-progress", action="store_true", help="no progress bar (default when stderr is not a tty)")
    qu.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    from .gguf_file import write_gguf

    reporter = Reporter(enabled=not args.no_progress)
    with reporter.bar(f"quantizing to {args.type}", total=1, unit=" tensors") as update:
        files = write_gguf(args.source, args.out, qtype=args.type, embeddings=args.embeddings,
                           split_size=args.split_size, embed_tokenizer=not args.no_tokenizer,
                           cache_dir=args.cache_dir, progress=update)
    for file in files:
        reporter.info(f"wrote {file} ({file.stat().st_size / 2**20:.1f} MiB)")
    return 0


EPILOG_SERVE = """\
examples:
  voxtral serve                                   # http://127.0.0.1:8000: page, /v1/realtime, /v1/audio/...
  voxtral serve --model ./voxtral --max-streams 128 --decoder-context 2048 --host 0.0.0.0 --api-key "$KEY"

Endpoints: / (browser page), /v1/realtime (WebSocket, vLLM's realtime protocol), POST /v1/audio/transcriptions
(OpenAI's shape), GET /v1/models, /health, /metrics (Prometheus).  With an API key (--api-key or
VOXTRAL_API_KEY), /v1/* and /metrics need "Authorization: Bearer KEY"; browsers send it as the WebSocket
subprotocol api-key.KEY.  Needs the server extra: pip install 'voxtral-realtime[server]'.
"""


def _add_serve_parser(sub: Any) -> None:
    sv = sub.add_parser("serve", help="serve live captions (WebSocket), file transcription (REST) and a web page",
                        description="Run the HTTP server: every stream, live or uploaded, on one batched engine.",
                        epilog=EPILOG_SERVE, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_options(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    sv.add_argument("--port", type=_positive_int, default=8000, help="port (default: %(default)s)")
    sv.add_argument("--max-streams", type=_positive_int, default=32,
                    help="concurrent streams, live and uploads (default: %(default)s); more live ones get a "
                         "'busy' error, more uploads wait")
    sv.add_argument("--decoder-context", type=_positive_int, metavar="TOKENS",
                    help="cap each stream's decoder window at this many 80 ms tokens to bound memory "
                         "(default: the model's full window; exact for streams shorter than the cap)")
    sv.add_argument("--api-key", default=os.environ.get("VOXTRAL_API_KEY"),
                    help="require this key from clients (default: $VOXTRAL_API_KEY; none: open to all)")
    sv.add_argument("--max-upload-mb", type=_positive_float, default=100.0,
                    help="largest accepted upload in MiB (default: %(default)s)")
    sv.add_argument("--max-audio-seconds", type=_positive_float, default=7200.0,
                    help="longest accepted uploaded audio (default: %(default)s)")
    sv.add_argument("--idle-timeout", type=_positive_float, default=60.0, metavar="SECONDS",
                    help="close a WebSocket session silent for this long (default: %(default)s)")
    sv.add_argument("--web-export", type=Path, metavar="DIR",
                    help="also serve this `voxtral export web --onnxruntime-web` folder at /local: the page that "
                         "runs the model in the visitor's browser")
    sv.add_argument("--no-progress", action="store_true", help="no progress bar while loading")
    sv.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    _check_server_dependencies()
    import uvicorn

    from .server import create_app
    from .server.state import ServerLimits

    reporter = Reporter(enabled=not args.no_progress)
    limits = ServerLimits(max_streams=args.max_streams, max_upload_bytes=int(args.max_upload_mb * 2**20),
                          max_audio_seconds=args.max_audio_seconds, idle_timeout_seconds=args.idle_timeout)
    if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        reporter.info(f"warning: listening on {args.host} without an API key: anyone who can reach it can use it")
    app = create_app(lambda: _load_model(args, reporter), model_name=args.model, max_streams=args.max_streams,
                     decoder_context=args.decoder_context, api_key=args.api_key, limits=limits)
    if args.web_export is not None:
        from .web_export import mount_local

        mount_local(app, args.web_export)
    # uvicorn's own frame limit sits above the app's, so an oversized message gets the app's clear error event
    uvicorn.run(app, host=args.host, port=args.port, ws_max_size=2 * limits.max_message_bytes,
                timeout_graceful_shutdown=5)
    return 0


def _check_server_dependencies() -> None:
    import importlib.util

    needed = {"fastapi": "fastapi", "uvicorn": "uvicorn", "python_multipart": "python-multipart",
              "prometheus_client": "prometheus_client"}
    missing = [package for module, package in needed.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise VoxtralError(f"voxtral serve needs {', '.join(missing)}: pip install 'voxtral-realtime[server]'")


EPILOG_BATCH = """\
examples:
  voxtral batch recordings/ --output transcripts.jsonl                  # in this process
  voxtral batch 'calls/**/*.flac' --output calls.jsonl --delay-ms 960
  voxtral batch manifest.jsonl --output out.jsonl --ray-address auto --workers 8 --gpus-per-worker 1

INPUT is a folder (searched recursively for audio files), a glob, a JSONL manifest (one path or URL per line,
as a JSON string or an object with a "path" or "url" key) or a CSV manifest (a "path"/"url" column, or paths
in the first column); URLs are read with fsspec (s3://, gs://, https://... with the matching fsspec package).
Each file becomes one line of OUT.jsonl: {"path", "text", "words", "duration", "error"}, written as soon as
it is done.  A rerun skips the paths already in OUT.jsonl, so an interrupted run is resumed by running the
same command again.  With --ray-address, audio is decoded in Ray tasks and transcribed by --workers actors that
load the model once (pip install 'ray[data]'; "local" starts a one-machine cluster).
"""


def _add_batch_parser(sub: Any) -> None:
    from .batch import DEFAULT_STREAMS_PER_WORKER

    bt = sub.add_parser("batch", help="transcribe a corpus (folder, glob, manifest) to JSONL, resumable, on Ray",
                        description="Transcribe many files through the batched engine, in this process or on a Ray "
                                    "cluster; results are appended to a JSONL file and a rerun resumes.",
                        epilog=EPILOG_BATCH, formatter_class=argparse.RawDescriptionHelpFormatter)
    bt.add_argument("input", metavar="INPUT", help="folder, glob, or .jsonl/.csv manifest of paths or URLs")
    bt.add_argument("--output", required=True, type=Path, metavar="OUT.jsonl",
                    help="results, one JSON line per file (appended to; created if missing)")
    _add_model_options(bt)
    bt.add_argument("--random-weights", action="store_true",
                    help="the real model's shapes with random values instead of --model, in this process (a "
                         "throughput benchmark: the transcripts are noise)")
    bt.add_argument("--delay-ms", type=_delay_ms, help=DELAY_HELP)
    bt.add_argument("--streams-per-worker", type=_positive_int, default=DEFAULT_STREAMS_PER_WORKER, metavar="N",
                    help="files computed together in one engine (default: %(default)s)")
    bt.add_argument("--ray-address", metavar="ADDRESS",
                    help="run on Ray: 'auto' (the cluster this machine belongs to), 'ray://HOST:PORT', or 'local' "
                         "(start one here); without it the files are transcribed in this process")
    bt.add_argument("--workers", type=_positive_int, default=1,
                    help="transcriber actors on Ray, each holding the model (default: %(default)s)")
    bt.add_argument("--gpus-per-worker", type=float, metavar="N",
                    help="GPUs per actor (default: 1 if the cluster has GPUs, else 0)")
    bt.add_argument("--cpus-per-worker", type=_positive_float, default=1.0, metavar="N",
                    help="CPUs reserved per actor (default: %(default)s; the rest decode audio)")
    bt.add_argument("--retry-errors", action="store_true",
                    help="also redo the files whose line in OUT.jsonl holds an error")
    bt.add_argument("--no-progress", action="store_true", help="no progress bar (default when stderr is not a tty)")
    bt.set_defaults(func=cmd_batch)


def _random_model_loader(args: argparse.Namespace, reporter: Reporter) -> Callable[[], Any]:
    """Builds the full-size network with random weights on ``--device`` in ``--dtype`` (benchmarks)."""

    def build() -> Any:
        import torch

        from .api import default_device, resolve_dtype
        from .random_weights import random_model

        device = torch.device(args.device) if args.device else default_device()
        reporter.info("building the full-size model with random weights")
        return random_model(device=device, dtype=resolve_dtype(args.dtype, device))

    return build


def cmd_batch(args: argparse.Namespace) -> int:
    from .batch import BatchOptions, BatchStats, run_batch

    reporter = Reporter(enabled=not args.no_progress)
    if args.gpus_per_worker is not None and args.gpus_per_worker < 0:
        raise VoxtralError("--gpus-per-worker must be 0 or more")
    if args.ray_address is None and (args.workers != 1 or args.gpus_per_worker is not None):
        reporter.info("note: --workers and --gpus-per-worker apply on Ray only (add --ray-address)")
    load_model = None
    if args.random_weights:
        if args.ray_address is not None:
            raise VoxtralError("--random-weights runs in this process: leave out --ray-address")
        load_model = _random_model_loader(args, reporter)
    options = BatchOptions(model=args.model, device=args.device, dtype=args.dtype, delay_ms=args.delay_ms,
                           streams_per_worker=args.streams_per_worker, ray_address=args.ray_address,
                           workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                           cpus_per_worker=args.cpus_per_worker, retry_errors=args.retry_errors)
    with _batch_progress(reporter) as update:
        stats: BatchStats = run_batch(args.input, args.output, options, progress=update, load_model=load_model)
    reporter.info(stats.summary())
    return 1 if stats.failed else 0


@contextmanager
def _batch_progress(reporter: Reporter) -> Iterator[Any]:
    """Yields ``update(stats)``: a bar of files done with files/s and audio hours per wall hour."""
    if not reporter.enabled:
        yield lambda stats: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("batch"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[speed]}"),
               TimeElapsedColumn()]
    with Progress(*columns, console=reporter.console, transient=True) as progress:
        task = progress.add_task("batch", total=None, speed="")

        def update(stats: Any) -> None:
            progress.update(task, completed=stats.done, total=stats.todo,
                            speed=f"{stats.files_per_second:.1f} files/s, {stats.audio_hours_per_hour:.1f} audio h/h, "
                                  f"{stats.failed} failed")
        yield update


EPILOG_EXPORT_WEB = """\
examples:
  voxtral export web --model ./voxtral --out site/ --quant q4
  voxtral export web --model ./tiny --out site/ --quant fp32 --check talk.wav --output-format json
  voxtral export web --model ./voxtral --out site/ --onnxruntime-web npm   # the page and its runtime too
  cd site && python -m http.server 8000                   # then open http://localhost:8000/

OUT gets audio_step.onnx and decoder_step.onnx (one 80 ms streaming step each, all state as inputs/outputs),
their weights in files of at most 512 MB, tekken.json and manifest.json (sizes and sha256 of every file).
--check AUDIO runs the exported graphs with onnxruntime on AUDIO and prints what `voxtral transcribe` prints;
stderr says how many tokens equal the PyTorch model's.  Needs: pip install onnx onnxruntime onnxscript.
"""


def _add_export_parser(sub: Any) -> None:
    from .web_export import QUANTS

    ex = sub.add_parser("export", help="export the model for other runtimes (the browser)",
                        description="Export the model for other runtimes.")
    targets = ex.add_subparsers(dest="target", metavar="TARGET", required=True)
    web = targets.add_parser("web", help="ONNX graphs + manifest (+ the page) for a static web page",
                             description="Export ONNX step graphs, weight shards, tokenizer and manifest for the "
                                         "in-browser page (onnxruntime-web, WebGPU or WebAssembly).",
                             epilog=EPILOG_EXPORT_WEB, formatter_class=argparse.RawDescriptionHelpFormatter)
    web.add_argument("--model", default=os.environ.get("VOXTRAL_MODEL", DEFAULT_MODEL), metavar="REPO_OR_DIR",
                     help="Hub repo id or local checkpoint folder (default: %(default)s)")
    web.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder to write (created if missing)")
    web.add_argument("--quant", choices=QUANTS, default="q4",
                     help="weights: q4/q8 (onnxruntime MatMulNBits, blocks of 32), fp16 (stored half, computed in "
                          "float32) or fp32 (default: %(default)s)")
    web.add_argument("--decoder-context", type=_positive_int, metavar="TOKENS",
                     help="cap the decoder's attention window (80 ms tokens) below the model's to shrink the "
                          "page's KV buffers; streams shorter than this are exact (default: the model's)")
    web.add_argument("--onnxruntime-web", metavar="TGZ|DIR|npm",
                     help="also write the page, with onnxruntime-web's files from this npm tarball (npm pack "
                          "onnxruntime-web@VERSION), node_modules/onnxruntime-web folder, or 'npm': the pinned "
                          "version fetched with npm pack into ~/.cache/voxtral-realtime")
    web.add_argument("--check", type=Path, metavar="AUDIO",
                     help="after exporting, transcribe AUDIO with the exported graphs (onnxruntime, CPU)")
    web.add_argument("--delay-ms", type=_delay_ms, help=DELAY_HELP + " (for --check)")
    web.add_argument("--output-format", choices=["txt", "json"], default="txt", help="of --check (default: txt)")
    web.add_argument("--no-progress", action="store_true", help="no progress bars (default when stderr is not a tty)")
    web.set_defaults(func=cmd_export_web)


def cmd_export_web(args: argparse.Namespace) -> int:
    from . import web_export
    from .api import load

    web_export._require_onnx()  # before loading gigabytes of weights
    reporter = Reporter(enabled=not args.no_progress)
    if args.check is not None and not args.check.is_file():
        raise VoxtralError(f"{args.check}: no such file")
    if args.out.exists() and not args.out.is_dir():
        raise VoxtralError(f"{args.out}: exists and is not a folder")
    with reporter.bar("loading model", total=1, unit=" tensors") as update:
        # export traces float32 on the CPU whatever the machine has: the graphs must not depend on it
        model = load(args.model, device="cpu", dtype="f32", progress=update)
    with reporter.bar("exporting", total=7, unit=" stages") as update:
        manifest = web_export.export_web(model, args.out, quant=args.quant, decoder_context=args.decoder_context,
                                         progress=lambda done, total, what: update(done, total))
    if args.onnxruntime_web:
        web_export.copy_page(args.out, args.onnxruntime_web)
    total = sum(f["bytes"] for f in manifest["files"])
    reporter.info(f"wrote {args.out}: {len(manifest['files'])} files, {total / 1e6:.1f} MB ({args.quant})")
    if args.check is None:
        return 0
    exported = web_export.WebExport(args.out)
    result = exported.transcribe(args.check, delay_ms=args.delay_ms)
    reference = model.transcribe(args.check, delay_ms=args.delay_ms).tokens
    same = sum(a == b for a, b in zip(result.tokens, reference))
    reporter.info(f"check: {same}/{max(len(reference), len(result.tokens))} tokens equal to the PyTorch model's"
                  + (" (identical)" if result.tokens == reference else ""))
    if args.output_format == "json":
        print(json.dumps({"file": str(args.check), **result.to_dict()}, ensure_ascii=False, indent=2))
    else:
        from .writers import WRITERS

        print(WRITERS["txt"](result), end="", flush=True)
    return 0



def _dispatch(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except VoxtralError as err:
        Reporter(enabled=False).error(str(err))
        return 1
    except ValueError as err:  # API argument errors (e.g. a delay the model does not support)
        Reporter(enabled=False).error(str(err))
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return _dispatch(args)


def rust_compat_main(argv: Sequence[str] | None = None) -> int:
    """``voxtral-transcribe --audio FILE --model DIR``: the command line of the Rust project, on this package."""
    parser = argparse.ArgumentParser(
        prog="voxtral-transcribe",
        description="Transcribe audio files (command-line compatible with voxtral-mini-realtime-rs). "
                    "See `voxtral transcribe --help` for the full command.")
    parser.add_argument("--audio", action="append", required=True, metavar="FILE",
                        help="audio file (repeat for several)")
    _add_model_options(parser)
    _add_gguf_options(parser)
    parser.add_argument("--delay-ms", type=_delay_ms, help=DELAY_HELP)
    parser.add_argument("--output-format", choices=["txt", "json"], default="txt")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    args.files, args.output_dir, args.func = args.audio, None, cmd_transcribe
    return _dispatch(args)


if __name__ == "__main__":
    sys.exit(main())
