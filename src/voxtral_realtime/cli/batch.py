"""``voxtral batch``: a corpus to JSONL, resumable, in this process or on Ray (:mod:`..batch`)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..batch import DEFAULT_STREAMS_PER_WORKER, BatchOptions, BatchStats, run_batch
from ..errors import VoxtralError
from .common import DELAY_HELP, Reporter, add_model_options, delay_ms, positive_float, positive_int, random_model_loader

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

def add_parser(sub: Any) -> None:
    bt = sub.add_parser("batch", help="transcribe a corpus (folder, glob, manifest) to JSONL, resumable, on Ray",
                        description="Transcribe many files through the batched engine, in this process or on a Ray "
                                    "cluster; results are appended to a JSONL file and a rerun resumes.",
                        epilog=EPILOG_BATCH, formatter_class=argparse.RawDescriptionHelpFormatter)
    bt.add_argument("input", metavar="INPUT", help="folder, glob, or .jsonl/.csv manifest of paths or URLs")
    bt.add_argument("--output", required=True, type=Path, metavar="OUT.jsonl",
                    help="results, one JSON line per file (appended to; created if missing)")
    add_model_options(bt)
    bt.add_argument("--random-weights", action="store_true",
                    help="the real model's shapes with random values instead of --model, in this process (a "
                         "throughput benchmark: the transcripts are noise)")
    bt.add_argument("--delay-ms", type=delay_ms, help=DELAY_HELP)
    bt.add_argument("--streams-per-worker", type=positive_int, default=DEFAULT_STREAMS_PER_WORKER, metavar="N",
                    help="files computed together in one engine (default: %(default)s)")
    bt.add_argument("--ray-address", metavar="ADDRESS",
                    help="run on Ray: 'auto' (the cluster this machine belongs to), 'ray://HOST:PORT', or 'local' "
                         "(start one here); without it the files are transcribed in this process")
    bt.add_argument("--workers", type=positive_int, default=1,
                    help="transcriber actors on Ray, each holding the model (default: %(default)s)")
    bt.add_argument("--gpus-per-worker", type=float, metavar="N",
                    help="GPUs per actor (default: 1 if the cluster has GPUs, else 0)")
    bt.add_argument("--cpus-per-worker", type=positive_float, default=1.0, metavar="N",
                    help="CPUs reserved per actor (default: %(default)s; the rest decode audio)")
    bt.add_argument("--retry-errors", action="store_true",
                    help="also redo the files whose line in OUT.jsonl holds an error")
    bt.add_argument("--no-progress", action="store_true", help="no progress bar (default when stderr is not a tty)")
    bt.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    reporter = Reporter(enabled=not args.no_progress)
    if args.gpus_per_worker is not None and args.gpus_per_worker < 0:
        raise VoxtralError("--gpus-per-worker must be 0 or more")
    if args.ray_address is None and (args.workers != 1 or args.gpus_per_worker is not None):
        reporter.info("note: --workers and --gpus-per-worker apply on Ray only (add --ray-address)")
    load_model = None
    if args.random_weights:
        if args.ray_address is not None:
            raise VoxtralError("--random-weights runs in this process: leave out --ray-address")
        load_model = random_model_loader(args, reporter)
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

    columns = [TextColumn("batch"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[speed]}"),
               TimeElapsedColumn()]
    with Progress(*columns, console=reporter.console, transient=True) as progress:
        task = progress.add_task("batch", total=None, speed="")

        def update(stats: Any) -> None:
            progress.update(task, completed=stats.done, total=stats.todo,
                            speed=f"{stats.files_per_second:.1f} files/s, {stats.audio_hours_per_hour:.1f} audio h/h, "
                                  f"{stats.failed} failed")
        yield update
