"""What the subcommands share: option types and option groups, loading the model, progress and messages."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, DownloadColumn, Progress, ProgressColumn, SpinnerColumn, Task, TaskID, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn)
from rich.text import Text

from ..api import default_device, load, resolve_dtype
from ..benchmarking.random_weights import random_model
from ..config import SUPPORTED_DELAYS_MS
from ..errors import UsageError
from ..gguf_file import parse_size
from ..loading import DEFAULT_MODEL
from ..quantization import FORMATS

DELAY_HELP = ("how far the model may look ahead before deciding a word, in ms: 80..1200 in steps of 80, or 2400; "
              "longer is more accurate, shorter is more immediate (default: the model's own, 480)")


def delay_ms(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of milliseconds") from None
    if value not in SUPPORTED_DELAYS_MS:
        raise argparse.ArgumentTypeError(f"{value} ms is not a delay the model supports (80..1200 in steps of 80, "
                                         "or 2400)")
    return value


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive whole numbers, e.g. 1,64,256")
    return values


def positive_int(text: str) -> int:
    values = int_list(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give one positive whole number")
    return values[0]


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number")
    return value


def quant_list(text: str) -> list[str]:
    types = [t.strip().lower() for t in text.split(",") if t.strip()]
    unknown = [t for t in types if t not in FORMATS]
    if unknown or not types:
        raise argparse.ArgumentTypeError(f"unknown quantization {', '.join(unknown) or text!r}; "
                                         f"use {', '.join(FORMATS)}")
    return types


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=os.environ.get("VOXTRAL_MODEL", DEFAULT_MODEL), metavar="REPO_OR_DIR",
                        help="Hub repo id, local checkpoint folder or GGUF file (default: %(default)s)")
    parser.add_argument("--device", help="cuda, cuda:1, cpu, mps (default: the GPU if there is one, else cpu)")
    parser.add_argument("--dtype", choices=["bf16", "f16", "f32"],
                        help="weight precision (default: bf16 on CUDA, f16 on mps, f32 on cpu)")


def add_revision_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--revision", help="branch, tag or commit of a Hub model (default: its main branch)")


def add_gguf_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gguf", metavar="FILE",
                        help="a GGUF model (voxtral quantize's or the Rust project's; a shard set by any shard or "
                             "its folder) instead of --model")
    parser.add_argument("--tokenizer", metavar="TEKKEN_JSON",
                        help="tekken.json for a GGUF file that carries none (the Rust project's files)")


def size(text: str) -> int:
    try:
        return parse_size(text)
    except UsageError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


class Reporter:
    """Progress bars on stderr (only when it is a terminal, unless asked) and one-line messages."""
    def __init__(self, enabled: bool) -> None:
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

        columns = [TextColumn("{task.description}"), BarColumn(),
                   TextColumn("{task.completed:.0f}/{task.total:.0f}" + unit), TimeElapsedColumn(),
                   TimeRemainingColumn()]
        with Progress(*columns, console=self.console, transient=True) as progress:
            task = progress.add_task(description, total=total)
            yield lambda done, total: progress.update(task, completed=done, total=total)

    @contextmanager
    def stages(self) -> Iterator[Stages]:
        """One transient line for a sequence of stages: a download's bar, counted work, or just the stage's name."""
        if not self.enabled:
            yield Stages(None)
            return
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), _StageAmount(),
                      console=self.console, transient=True) as progress:
            yield Stages(progress)


class BacklogWarning:
    """Says so, in one line, when live audio waits longer and longer for the model (this device computes it slower
    than it arrives) instead of falling behind silently: when the wait first passes ``threshold`` seconds, then
    each time it has doubled since the last warning."""

    def __init__(self, reporter: Reporter, threshold: float = 1.0) -> None:
        self.reporter, self.next_warning = reporter, threshold

    def check(self, backlog_seconds: float) -> None:
        if backlog_seconds > self.next_warning:
            self.reporter.info(f"warning: not keeping up: {backlog_seconds:.1f} s of audio is waiting for the model, "
                               "so the text comes later and later (a GPU, or a quantized model on the CPU, keeps up)")
            self.next_warning = 2 * backlog_seconds


class Stages:
    """What :meth:`Reporter.stages` yields: ``stage(name)`` starts a stage, ``transfer(done, total)`` and
    ``tensors(done, total)`` report its progress (a download's bytes, with rate and time left; or tensors loaded)."""

    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress
        self._task: TaskID | None = None

    def stage(self, name: str, unit: str = "") -> None:
        if self._progress is None:
            return
        if self._task is None:
            self._task = self._progress.add_task(name, total=None, unit=unit)
        else:
            self._progress.reset(self._task, description=name, total=None, unit=unit)

    def transfer(self, done: int, total: int) -> None:
        self._update("bytes", done, total)

    def tensors(self, done: int, total: int) -> None:
        self._update("tensors", done, total)

    def _update(self, unit: str, done: int, total: int) -> None:
        if self._progress is None:
            return
        if self._task is None or self._progress.tasks[self._task].fields.get("unit") != unit:
            self.stage("downloading" if unit == "bytes" else "loading", unit)
        self._progress.update(self._task, completed=done, total=total)


class _StageAmount(ProgressColumn):
    """Bytes, rate and time left for a download; "done/total unit" for counted work; nothing for a bare stage."""

    def __init__(self) -> None:
        super().__init__()
        self._download = (DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "")
        if unit == "bytes":
            return Text(" ").join(column.render(task) for column in self._download)
        if unit and task.total is not None:
            return Text(f"{task.completed:.0f}/{task.total:.0f} {unit}")
        return Text("")


def load_model(args: argparse.Namespace, reporter: Reporter, *, warm_up: bool = False) -> Any:
    """The model of ``--model``/``--gguf``, downloaded first when it is a Hub repo not in the cache; ``warm_up``:
    also capture the CUDA graphs transcription uses, so that every stage to the first text shows on the terminal."""
    model = getattr(args, "gguf", None) or args.model
    with reporter.stages() as stages:
        loaded = load(model, device=args.device, dtype=args.dtype, revision=getattr(args, "revision", None),
                      progress=stages.tensors, download_progress=stages.transfer, status=stages.stage,
                      tokenizer=getattr(args, "tokenizer", None))
        if warm_up and loaded.device.type == "cuda":
            stages.stage("capturing CUDA graphs")
            loaded.warm_up()
    return loaded


def random_model_loader(args: argparse.Namespace, reporter: Reporter) -> Callable[[], Any]:
    """Builds the full-size network with random weights on ``--device`` in ``--dtype`` (benchmarks)."""
    def build() -> Any:

        device = torch.device(args.device) if args.device else default_device()
        reporter.info("building the full-size model with random weights")
        return random_model(device=device, dtype=resolve_dtype(args.dtype, device))

    return build
