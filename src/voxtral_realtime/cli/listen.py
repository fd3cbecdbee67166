"""``voxtral listen``: live captions from the microphone."""

from __future__ import annotations

import argparse
import queue
import signal
import threading
from typing import Any

from ..audio import StreamResampler
from ..errors import VoxtralError, first_line
from .common import (DELAY_HELP, BacklogWarning, Reporter, add_model_options, add_revision_option, delay_ms,
                     load_model)


def add_parser(sub: Any) -> None:
    li = sub.add_parser("listen", help="live captions from the microphone",
                        description="Transcribe the default input device live; Ctrl-C ends and prints the final "
                                    "text.  Needs PortAudio (Debian/Ubuntu: apt install libportaudio2).",
                        epilog="example:\n  voxtral listen --delay-ms 240        # faster captions, a little "
                               "less accurate", formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(li)
    add_revision_option(li)
    li.add_argument("--delay-ms", type=delay_ms, help=DELAY_HELP)
    li.add_argument("--input-device", help="input device name or index (default: the system default; "
                                           "`python -m sounddevice` lists them)")
    li.add_argument("--no-progress", action="store_true", help="no progress bar while loading")
    li.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    reporter = Reporter(enabled=not args.no_progress)
    sd = _import_sounddevice()
    device = int(args.input_device) if args.input_device and args.input_device.isdigit() else args.input_device
    try:
        info = sd.query_devices(device, kind="input")
    except Exception as exc:  # noqa: BLE001 - sounddevice raises ValueError / PortAudioError for no such device
        raise VoxtralError(f"no audio input device{f' {device!r}' if device is not None else ''} "
                           f"({first_line(exc)}); plug in a microphone or pick one with --input-device") from None
    rate = int(info["default_samplerate"])
    model = load_model(args, reporter, warm_up=True)
    session = model.stream(delay_ms=args.delay_ms, continue_after_eos=True)
    resampler = StreamResampler(rate)
    chunks: queue.Queue = queue.Queue()
    block = int(rate * 0.08)
    backlog = BacklogWarning(reporter)

    def on_audio(indata: Any, frames: int, time_info: Any, status: Any) -> None:
        chunks.put(indata.mean(axis=1) if indata.ndim == 2 else indata.copy())

    # Ctrl-C sets a flag instead of raising, so it never lands in the middle of a model step.
    stop = threading.Event()
    previous_handler = signal.signal(signal.SIGINT, lambda *_: stop.set())
    reporter.info(f"listening on {info['name']} ({rate} Hz); Ctrl-C to stop")
    try:
        with sd.InputStream(samplerate=rate, channels=1, dtype="float32", device=device, callback=on_audio,
                            blocksize=block):
            while not stop.is_set():
                try:
                    chunk = chunks.get(timeout=0.1)
                except queue.Empty:
                    continue
                print(session.feed(resampler.push(chunk)), end="", flush=True)
                backlog.check(chunks.qsize() * block / rate)
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
