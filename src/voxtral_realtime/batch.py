"""Corpus transcription: many files through the batched engine, results appended to a JSONL file.

``voxtral batch INPUT --output OUT.jsonl`` lists the inputs (a folder, a glob, or a JSONL/CSV manifest of paths
or URLs that fsspec reads), drops those already recorded in OUT.jsonl, and transcribes the rest:

* in-process (no Ray, or no ``--ray-address``): a thread decodes the next group of files while the model
  transcribes the current one;
* on Ray (``--ray-address auto``, or ``local`` for a throwaway one-machine cluster): a Ray Data pipeline decodes
  audio in CPU tasks and transcribes on ``--workers`` actors that each load the model once and keep it.

Either way a group of files goes through one :class:`~.engine.Engine` together (one session per file: push all
of its audio, one ``run()`` for the whole group, then ``finish()``), and every result becomes one JSON line
``{path, text, words, duration, error}``, written and flushed by the driver as soon as it arrives, so a run that
is killed loses at most the files in flight.  A file that cannot be read or transcribed gets a line with its
``error`` and the run goes on.  A rerun skips every path already in the output (``retry_errors`` re-does those
whose line holds an error; the last line for a path is the one that counts).
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .audio import load_audio
from .errors import AudioError, VoxtralError, first_line

if TYPE_CHECKING:
    from .api import Model
    from .transcription import Transcription

#: Suffixes taken from a folder (a manifest or a glob lists files explicitly and is not filtered).
AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".wma", ".aif",
                            ".aiff", ".webm", ".mp4", ".mkv", ".mov", ".avi"})
MANIFEST_SUFFIXES = (".jsonl", ".csv")
#: Manifest columns / keys naming the audio, in order of preference ("audio_filepath": NeMo's manifests).
MANIFEST_KEYS = ("path", "url", "audio_filepath", "audio", "file", "filename")
#: Files per engine group (streams computed together) when none is given: enough rows to fill a GPU step.
DEFAULT_STREAMS_PER_WORKER = 32
#: Times a group is retried on Ray after its actor died (not after an exception: those become error lines).
ACTOR_TASK_RETRIES = 3


@dataclass
class BatchOptions:
    """What :func:`run_batch` needs besides its input and output."""

    model: str | os.PathLike[str]
    device: str | None = None
    dtype: str | None = None
    delay_ms: int | None = None
    #: files computed together by one engine (its ``max_streams``)
    streams_per_worker: int = DEFAULT_STREAMS_PER_WORKER
    #: None: in-process.  "auto" or "ray://host:port": an existing cluster; "local": start one on this machine.
    ray_address: str | None = None
    workers: int = 1
    #: None: 1 if the cluster has GPUs, else 0
    gpus_per_worker: float | None = None
    cpus_per_worker: float = 1.0
    retry_errors: bool = False
    #: the actor class (a subclass of :class:`RayTranscriber`; tests inject faults this way)
    ray_transcriber: type | None = None


@dataclass
class BatchStats:
    """Counts and throughput of one run (``skipped``: already in the output before it started)."""

    inputs: int = 0
    skipped: int = 0
    done: int = 0
    failed: int = 0
    audio_seconds: float = 0.0
    first_error: str | None = None  # "path: message" of the first failed file, for the summary
    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None

    @property
    def todo(self) -> int:
        return self.inputs - self.skipped

    @property
    def wall_seconds(self) -> float:
        return (self.finished if self.finished is not None else time.perf_counter()) - self.started

    @property
    def files_per_second(self) -> float:
        return self.done / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def audio_hours_per_hour(self) -> float:
        """Hours of audio transcribed per hour of wall time (the reciprocal of the real-time factor)."""
        return self.audio_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def summary(self) -> str:
        return (f"{self.done} files transcribed ({self.failed} failed), {self.skipped} already done, "
                f"{self.audio_seconds / 3600:.3f} h of audio in {self.wall_seconds:.1f} s: "
                f"{self.files_per_second:.2f} files/s, {self.audio_hours_per_hour:.1f} audio hours per wall hour"
                + (f"; first error: {self.first_error}" if self.first_error else ""))


# -- inputs -------------------------------------------------------------------------------------------------------


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def list_inputs(spec: str | os.PathLike[str]) -> list[str]:
    """The audio paths/URLs that ``spec`` names: a folder (searched recursively for audio suffixes), a glob, a
    JSONL or CSV manifest, or one file.  Duplicates are dropped; order is kept (sorted for folders and globs)."""
    spec = os.fspath(spec)
    if spec.lower().endswith(MANIFEST_SUFFIXES):
        paths = _read_manifest(spec)
    elif any(ch in spec for ch in "*?["):
        paths = _glob(spec)
    elif os.path.isdir(spec):
        paths = sorted(str(p) for p in Path(spec).rglob("*")
                       if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES and not p.name.startswith("."))
    elif os.path.isfile(spec) or _is_url(spec):
        paths = [spec]
    else:
        raise VoxtralError(f"{spec}: no such file, folder, glob match or manifest")
    return list(dict.fromkeys(paths))


def _glob(pattern: str) -> list[str]:
    if not _is_url(pattern):
        return sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    import fsspec

    fs, _ = fsspec.core.url_to_fs(pattern)
    protocol = pattern.split("://", 1)[0]
    return sorted(f"{protocol}://{p}" for p in fs.glob(pattern) if fs.isfile(p))


def _read_manifest(spec: str) -> list[str]:
    import fsspec

    try:
        with fsspec.open(spec, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, ValueError) as exc:
        raise VoxtralError(f"{spec}: cannot read the manifest ({first_line(exc)})") from None
    entries = _jsonl_entries(spec, text) if spec.lower().endswith(".jsonl") else _csv_entries(text)
    # relative paths in a local manifest are relative to the manifest, so a corpus folder can be moved whole
    base = None if _is_url(spec) else Path(spec).resolve().parent
    return [e if base is None or _is_url(e) or os.path.isabs(e) else str(base / e) for e in entries]


def _jsonl_entries(spec: str, text: str) -> list[str]:
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            raise VoxtralError(f"{spec}:{number}: not a JSON line") from None
        if isinstance(item, dict):
            item = next((item[k] for k in MANIFEST_KEYS if isinstance(item.get(k), str)), None)
        if not isinstance(item, str):
            raise VoxtralError(f"{spec}:{number}: expected a string or an object with one of the keys "
                               f"{', '.join(MANIFEST_KEYS)}")
        entries.append(item)
    return entries


def _csv_entries(text: str) -> list[str]:
    rows = [row for row in csv.reader(io.StringIO(text)) if row and any(cell.strip() for cell in row)]
    if not rows:
        return []
    header = [cell.strip().lower() for cell in rows[0]]
    column = next((header.index(k) for k in MANIFEST_KEYS if k in header), None)
    if column is None:  # no header naming the column: the first column of every row is a path
        return [row[0].strip() for row in rows]
    return [row[column].strip() for row in rows[1:] if len(row) > column and row[column].strip()]


def decode(path: str) -> np.ndarray:
    """16 kHz mono float32 samples of a local file or of anything fsspec opens; :class:`AudioError` if not."""
    if not _is_url(path):
        return load_audio(path.removeprefix("file://"))
    import fsspec

    try:
        with fsspec.open(path, "rb") as f:
            data = f.read()
    except Exception as exc:  # noqa: BLE001 - every fsspec backend has its own errors
        raise AudioError(f"{path}: cannot read ({first_line(exc)})") from None
    return load_audio(data)



def longest_first(paths: list[str]) -> list[str]:
    """Missing local files first (their error lines come at once), then local files by size, largest first, then
    URLs (sizes unknown) in their order.

    A group of files runs until its longest file is done, so files of similar length belong together; and with
    several workers, handing out the long files first keeps one long file from running alone at the end."""
    def key(path: str) -> tuple[int, int]:
        if _is_url(path):
            return (2, 0)
        try:
            return (1, -os.path.getsize(path.removeprefix("file://")))
        except OSError:
            return (0, 0)

    return sorted(paths, key=key)


# -- output -------------------------------------------------------------------------------------------------------


def result_record(path: str, result: Transcription) -> dict[str, Any]:
    words = [{"text": w.text, "start": round(w.start, 3), "end": round(w.end, 3)} for w in result.words]
    return {"path": path, "text": result.text, "words": words, "duration": result.duration, "error": None}


def error_record(path: str, error: BaseException, duration: float | None = None) -> dict[str, Any]:
    message = str(error) if isinstance(error, VoxtralError) else f"{type(error).__name__}: {first_line(error)}"
    return {"path": path, "text": None, "words": [], "duration": duration, "error": message}


def read_done(output: str | os.PathLike[str], *, retry_errors: bool = False) -> set[str]:
    """Paths already recorded in ``output`` (the last line for a path wins), without those that failed when
    ``retry_errors``.  A truncated last line (a killed run) is ignored."""
    status: dict[str, bool] = {}
    try:
        with open(output, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("path"), str):
                    status[record["path"]] = record.get("error") is None
    except FileNotFoundError:
        return set()
    return {path for path, ok in status.items() if ok or not retry_errors}


def _open_for_append(output: Path):
    """Open ``output`` to append lines, first cutting a partial last line left by a killed run (it would
    otherwise glue onto the next record)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.exists() and output.stat().st_size:
        with open(output, "rb+") as f:
            end = f.seek(0, os.SEEK_END)
            f.seek(end - 1)
            if f.read(1) != b"\n":
                # read backwards, a block at a time: the output of a large corpus need not fit in memory
                position = end
                while position > 0:
                    block = min(position, 1 << 16)
                    position -= block
                    f.seek(position)
                    newline = f.read(block).rfind(b"\n")
                    if newline >= 0:
                        f.truncate(position + newline + 1)
                        break
                else:
                    f.truncate(0)
    return open(output, "a", encoding="utf-8")


# -- transcription ------------------------------------------------------------------------------------------------


class GroupTranscriber:
    """Transcribes groups of decoded files through one batched engine kept for the model's lifetime.

    A group is one session per file on the shared engine: every file's audio is pushed and its input ended
    (``end_input()`` queues the closing silence, the delay plus 11 steps), then each ``engine.run()`` computes all
    of them together, the closing steps included, until every session's ``complete()`` says it is done.  Calling
    ``finish()`` one session after the other would run those closing steps one stream at a time instead, which
    for short files is most of the work.
    """

    def __init__(self, model: Model, *, streams: int, delay_ms: int | None = None) -> None:
        self.model = model
        self.delay_ms = delay_ms
        self.engine = model.engine(max_streams=streams)

    def transcribe(self, items: list[tuple[str, np.ndarray]]) -> list[dict[str, Any]]:
        records = []
        for start in range(0, len(items), self.engine.max_streams):
            records.extend(self._group(items[start:start + self.engine.max_streams]))
        return records

    def _group(self, items: list[tuple[str, np.ndarray]]) -> list[dict[str, Any]]:
        sessions = []
        try:
            for _, samples in items:
                session = self.model.stream(delay_ms=self.delay_ms, engine=self.engine)
                sessions.append(session)
                session.push(samples)
                session.end_input()
            running = sessions
            while running:
                self.engine.run()
                running = [s for s in running if not s.complete()]
            return [result_record(path, s.transcription) for (path, _), s in zip(items, sessions)]
        except Exception as exc:  # noqa: BLE001 - one bad file must not fail the others: find it alone
            for session in sessions:
                session.close()
            if len(items) == 1:
                path, samples = items[0]
                return [error_record(path, exc, duration=len(samples) / self.model.config.audio.sample_rate)]
            return [record for item in items for record in self._group([item])]


def _decode_or_error(path: str) -> tuple[np.ndarray | None, dict[str, Any] | None]:
    try:
        return decode(path), None
    except Exception as exc:  # noqa: BLE001 - a file that cannot be decoded is recorded, never fatal
        return None, error_record(path, exc)


def local_results(paths: list[str], model: Model, options: BatchOptions) -> Iterator[dict[str, Any]]:
    """Records for ``paths`` computed in this process; the next group is decoded while the current one runs."""
    transcriber = GroupTranscriber(model, streams=options.streams_per_worker, delay_ms=options.delay_ms)
    size = options.streams_per_worker
    groups = [paths[i:i + size] for i in range(0, len(paths), size)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="voxtral-decode") as pool:
        def submit(group: list[str]) -> Future:
            return pool.submit(lambda: [(p, *_decode_or_error(p)) for p in group])

        pending = submit(groups[0]) if groups else None
        for index in range(len(groups)):
            decoded = pending.result()
            pending = submit(groups[index + 1]) if index + 1 < len(groups) else None
            yield from (error for _, _, error in decoded if error is not None)
            yield from transcriber.transcribe([(p, samples) for p, samples, error in decoded if error is None])


# -- Ray ----------------------------------------------------------------------------------------------------------


def _decode_row(row: dict[str, Any]) -> dict[str, Any]:
    """Ray Data CPU task: one path -> its samples as float32 bytes (ragged arrays travel badly), or an error."""
    samples, error = _decode_or_error(row["path"])
    return {"path": row["path"], "pcm": b"" if samples is None else samples.tobytes(),
            "error": "" if error is None else json.dumps(error)}  # not None: an all-null column turns into NaN


class RayTranscriber:
    """Ray Data actor: loads the model once, then transcribes each batch of decoded rows as one engine group."""

    def __init__(self, model: str, device: str | None, dtype: str | None, delay_ms: int | None,
                 streams: int) -> None:
        from .api import load

        self.transcriber = GroupTranscriber(load(model, device=device, dtype=dtype), streams=streams,
                                            delay_ms=delay_ms)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records, items = [], []
        for path, pcm, error in zip(batch["path"], batch["pcm"], batch["error"]):
            if error:
                records.append(json.loads(error))
            else:
                items.append((str(path), np.frombuffer(pcm, dtype=np.float32)))
        records.extend(self.transcriber.transcribe(items))
        # one JSON column: nested, ragged word lists need no Arrow schema that way
        return {"record": np.array([json.dumps(r, ensure_ascii=False) for r in records], dtype=object)}


def ray_results(paths: list[str], options: BatchOptions) -> Iterator[dict[str, Any]]:
    """Records for ``paths`` from a Ray Data pipeline (decode tasks -> transcriber actors), as they complete."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise VoxtralError("--ray-address needs Ray: pip install 'ray[data]'") from None
    if not ray.is_initialized():
        ray.init(address=None if options.ray_address == "local" else options.ray_address,
                 log_to_driver=False, include_dashboard=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours is on stderr already
    gpus = options.gpus_per_worker
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    size = options.streams_per_worker
    dataset = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=max(1, -(-len(paths) // size)))
    dataset = dataset.map(_decode_row, num_cpus=1)
    dataset = dataset.map_batches(
        options.ray_transcriber or RayTranscriber, batch_size=size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=options.workers), num_gpus=gpus, num_cpus=options.cpus_per_worker,
        fn_constructor_kwargs={"model": os.fspath(options.model), "device": options.device, "dtype": options.dtype,
                               "delay_ms": options.delay_ms, "streams": size},
        # a dead actor is restarted and its group retried, but not forever: a file that kills the process each
        # time would otherwise keep the run going round in circles
        max_task_retries=ACTOR_TASK_RETRIES)
    try:
        for row in dataset.iter_rows():
            yield json.loads(row["record"])
    except Exception as exc:  # what was written stays; the message says how to go on
        raise VoxtralError(f"the Ray pipeline stopped ({first_line(exc)}); the files done so far are in the "
                           "output: run the same command again to resume") from exc


# -- the run ------------------------------------------------------------------------------------------------------


def run_batch(inputs: str | os.PathLike[str] | Iterable[str], output: str | os.PathLike[str], options: BatchOptions,
              *, progress: Callable[[BatchStats], None] | None = None,
              load_model: Callable[[], Model] | None = None) -> BatchStats:
    """Transcribe every input not yet in ``output`` and append one JSON line per file; returns the counts.

    ``inputs``: a folder, glob or manifest (:func:`list_inputs`), or the paths themselves.  ``progress`` is
    called with the running counts after each record.  ``load_model`` replaces loading ``options.model`` for
    the in-process path (the model is loaded only if there is something to do).
    """
    paths = list_inputs(inputs) if isinstance(inputs, (str, os.PathLike)) else list(dict.fromkeys(inputs))
    output = Path(output)
    done = read_done(output, retry_errors=options.retry_errors)
    todo = longest_first([p for p in paths if p not in done])
    stats = BatchStats(inputs=len(paths), skipped=len(paths) - len(todo))
    if progress:
        progress(stats)
    if todo:
        if options.ray_address:
            records = ray_results(todo, options)
        else:
            if load_model is None:
                from .api import load

                def load_model() -> Model:
                    return load(options.model, device=options.device, dtype=options.dtype)
            records = local_results(todo, load_model(), options)
        wanted = set(todo)
        with _open_for_append(output) as out:
            for record in records:
                if record["path"] not in wanted:  # a retried Ray task may repeat a record: keep the first
                    continue
                wanted.discard(record["path"])
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()  # a killed run keeps every line written so far
                stats.done += 1
                stats.failed += record["error"] is not None
                if record["error"] is not None and stats.first_error is None:
                    stats.first_error = f"{record['path']}: {record['error']}"
                stats.audio_seconds += record["duration"] or 0.0
                if progress:
                    progress(stats)
    stats.finished = time.perf_counter()
    return stats
