"""``voxtral transcribe``: audio files to text, subtitles or JSON (and ``voxtral-transcribe``, the Rust
project's command line)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..audio import load_audio
from ..errors import VoxtralError
from ..writers import WRITERS
from .common import (DELAY_HELP, BacklogWarning, Reporter, add_gguf_options, add_model_options, add_revision_option,
                     delay_ms, load_model)

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

def add_parser(sub: Any) -> None:
    tr = sub.add_parser("transcribe", help="transcribe audio files",
                        description="Transcribe audio files with the whole-file (offline) protocol.",
                        epilog=EPILOG_TRANSCRIBE, formatter_class=argparse.RawDescriptionHelpFormatter)
    tr.add_argument("files", nargs="+", metavar="FILE", help="audio or video files")
    add_model_options(tr)
    add_revision_option(tr)
    add_gguf_options(tr)
    tr.add_argument("--delay-ms", type=delay_ms, help=DELAY_HELP)
    tr.add_argument("--output-format", choices=["txt", "json", "srt", "vtt"], default="txt",
                    help="txt: the transcript; json: text, tokens, timed words and segments; srt/vtt: subtitles "
                         "(default: txt)")
    tr.add_argument("--realtime", action="store_true",
                    help="replay each file at 1x speed through a live session: text appears as it is decided, "
                         "then each word's latency is printed on stderr")
    tr.add_argument("--output-dir", type=Path,
                    help="write FILE's transcript to OUTPUT_DIR/<name>.<format> instead of stdout")
    tr.add_argument("--no-progress", action="store_true", help="no progress bars (default when stderr is not a tty)")
    tr.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
    model = load_model(args, reporter, warm_up=True)
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

    samples = load_audio(path)
    session = model.stream(delay_ms=delay_ms)
    step = model.config.audio.samples_per_token
    backlog = BacklogWarning(reporter)
    started = time.perf_counter()
    for start in range(0, len(samples), step):
        wait = started + start / model.config.audio.sample_rate - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        backlog.check(-wait)  # how long ago this audio would have arrived from a microphone
        print(session.feed(samples[start:start + step]), end="", flush=True)
    print(session.finish(), flush=True)
    result = session.transcription
    if result.words:
        reporter.info(f"{'start':<9} {'latency':>10}  word")
    for word in result.words:
        late = f"{1000 * word.latency:.0f} ms" if word.latency is not None else "-"
        reporter.info(f"{f'{word.start:.2f} s':<9} {late:>10}  {word.text}")
    latencies = sorted(w.latency for w in result.words if w.latency is not None)
    if latencies:
        p50, p99 = latencies[len(latencies) // 2], latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        reporter.info(f"{len(latencies)} words; decided this long after their audio + the {result.delay_ms} ms "
                      f"delay had arrived: p50 {1000 * p50:.0f} ms, p99 {1000 * p99:.0f} ms")
    return result


def rust_compat_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``voxtral-transcribe --audio FILE --model DIR`` (the Rust project's command line) as transcribe's options."""
    parser = argparse.ArgumentParser(
        prog="voxtral-transcribe",
        description="Transcribe audio files (command-line compatible with voxtral-mini-realtime-rs). "
                    "See `voxtral transcribe --help` for the full command.")
    parser.add_argument("--audio", action="append", required=True, metavar="FILE",
                        help="audio file (repeat for several)")
    add_model_options(parser)
    add_gguf_options(parser)
    parser.add_argument("--delay-ms", type=delay_ms, help=DELAY_HELP)
    parser.add_argument("--output-format", choices=["txt", "json"], default="txt")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    args.files, args.output_dir, args.func = args.audio, None, run
    return args
