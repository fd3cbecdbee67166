"""``voxtral bench --device cpu``: what a quantized model costs on this machine's CPU, against its memory bandwidth
(docs/performance.md, "On the CPU", defines each column).

Each (quantization type, thread count) is measured in a fresh process (:func:`measure_fresh`) holding that model
alone, so its peak resident memory is the model's; full-size random weights are written as a quantized GGUF one
tensor at a time and cached, so the float model never exists.  In that process :func:`measure` times the decoder
step, live compute, a stream at real-time pace (:func:`live_paced`), one file offline and peak memory.
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import resource
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..streaming import StreamingSession
from .benchmark import GIB, bench_file, bench_step, decode_weight_bytes

CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "voxtral-realtime"
STEP_CONTEXT = 400  # tokens already in the stream for the decoder-step measurement (32 s)
LIVE_COMPUTE_SECONDS = 10.0


def read_bandwidth(threads: int, nbytes: int | None = None) -> float:
    """Memory-read bandwidth in GB/s at ``threads`` threads: the best of five sums over a buffer far larger than
    any cache (4 GiB, or an eighth of the machine's memory if less)."""
    if nbytes is None:
        nbytes = min(4 * GIB, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 8)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buffer = torch.ones(nbytes // 4)
        buffer.sum()
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            buffer.sum()
            best = min(best, time.perf_counter() - started)
        return buffer.numel() * 4 / best / 1e9
    finally:
        torch.set_num_threads(previous)


def random_gguf(qtype: str, cache_dir: Path = CACHE_DIR) -> Path:
    """The full-size model with random weights as a ``qtype`` GGUF, written once into ``cache_dir`` (tensor by
    tensor, never the float model) and reused."""
    import tempfile

    from ..config import FULL_SIZE_PARAMS, ModelConfig
    from .random_weights import AUDIO_BLOCK, write_random_gguf, write_tekken_json

    path = cache_dir / f"random-full-{qtype}.gguf"
    if path.is_file():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.gguf")  # a killed write leaves no file that looks complete
    with tempfile.TemporaryDirectory() as folder:
        tekken = write_tekken_json(Path(folder) / "tekken.json")
        config = ModelConfig.from_params_json(FULL_SIZE_PARAMS, dict(AUDIO_BLOCK))
        write_random_gguf(config, FULL_SIZE_PARAMS, tekken, partial, qtype=qtype)
    partial.rename(path)
    return path


def memory_gib() -> dict[str, float]:
    """This process's resident memory now and at its peak (VmRSS, VmHWM), GiB."""
    status = Path("/proc/self/status")
    if status.is_file():
        fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        return {"rss_gib": int(fields["VmRSS"].split()[0]) / 2**20,
                "peak_rss_gib": int(fields["VmHWM"].split()[0]) / 2**20}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
    return {"rss_gib": float("nan"), "peak_rss_gib": peak / GIB}


def usable_cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


@dataclass(frozen=True)
class CpuRun:
    """One measurement: this model file at this many threads."""

    model: str
    qtype: str
    threads: int
    audio: np.ndarray  # the offline file
    stream_seconds: float
    delay_ms: int | None = None
    dtype: str | None = None


def measure_fresh(run: CpuRun) -> dict[str, Any]:
    """:func:`measure` in a new interpreter, so that its peak memory is this model's alone."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(measure, run).result()
        except BrokenProcessPool:
            return {"qtype": run.qtype, "threads": run.threads, "error": "the process died (out of memory?)"}
        except Exception as exc:  # noqa: BLE001 - one failing model must not lose the rows measured before it
            return {"qtype": run.qtype, "threads": run.threads, "error": f"{type(exc).__name__}: {exc}"}


def measure(run: CpuRun) -> dict[str, Any]:
    """Every CPU number of one model at one thread count (module docstring), in this process."""
    torch.set_num_threads(run.threads)  # before anything runs: onnxruntime sizes its pool from it at first use
    import voxtral_realtime

    from ..quantization import CpuInt4Linear, OnnxQuantizedLinear

    started = time.perf_counter()
    model = voxtral_realtime.load(run.model, device="cpu", dtype=run.dtype)
    out: dict[str, Any] = {"qtype": run.qtype, "threads": run.threads, "model": run.model,
                           "load_s": time.perf_counter() - started,
                           "rss_after_load_gib": memory_gib()["rss_gib"]}
    layers = {type(m) for m in model.network.modules()}
    out["kernel"] = ("onnxruntime MatMulNBits" if OnnxQuantizedLinear in layers else
                     "torch int4" if CpuInt4Linear in layers else "torch")
    out["decode_weight_gb"] = decode_weight_bytes(model) / 1e9
    step = bench_step(model, 1, STEP_CONTEXT)
    out["decoder_step_ms"] = step["ms_per_step"]
    sample_rate = model.config.audio.sample_rate
    stream_audio = np.resize(run.audio, int(run.stream_seconds * sample_rate))
    live_compute(model, stream_audio[: sample_rate], delay_ms=run.delay_ms)  # warm-up
    out["live_compute"] = live_compute(model, stream_audio[: int(LIVE_COMPUTE_SECONDS * sample_rate)],
                                       delay_ms=run.delay_ms)
    out["live"] = live_paced(model, stream_audio, delay_ms=run.delay_ms)
    out["file"] = bench_file(model, run.audio, delay_ms=run.delay_ms, warmup_seconds=2.0)
    # getrusage's peak (bench_file's) survives exec: it can be the spawning process's; VmHWM below is this one's
    for dropped in ("token_ids", "peak_cpu_rss_gib"):
        out["file"].pop(dropped)
    out.update(memory_gib())
    return out


def live_compute(model: Any, audio: np.ndarray, *, delay_ms: int | None = None) -> dict[str, Any]:
    """One stream fed 80 ms at a time, each piece computed before the next (as fast as it goes): what a live
    step costs, by stage."""
    step = model.config.audio.samples_per_token
    session = model.stream(delay_ms=delay_ms)
    engine = session.engine
    engine.stage_seconds = {}
    pieces = len(audio) // step
    started = time.perf_counter()
    for k in range(pieces):
        session.feed(audio[k * step:(k + 1) * step])
    total = time.perf_counter() - started
    engine.stage_seconds, stages = None, engine.stage_seconds
    session.close()
    return {"audio_s": pieces * step / model.config.audio.sample_rate, "steps": pieces,
            "ms_per_step": 1000 * total / pieces, "encoder_ms_per_step": 1000 * stages.get("encode", 0.0) / pieces,
            "decoder_ms_per_step": 1000 * stages.get("decode", 0.0) / pieces}


class _DecisionTimes(StreamingSession):
    """A session that notes when each of its tokens was decided."""

    def __init__(self, *args: Any, clock: Callable[[], float], **kwargs: Any) -> None:
        self.clock = clock
        self.decided: list[float] = []
        super().__init__(*args, **kwargs)

    def on_token(self, slot: Any, token: int) -> bool:
        self.decided.append(self.clock())
        return super().on_token(slot, token)


def live_paced(model: Any, audio: np.ndarray, *, delay_ms: int | None = None,
               clock: Callable[[], float] = time.perf_counter,
               sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """One stream fed at real-time pace: 80 ms chunk k is released at ``(k + 1) x 80 ms`` on the wall clock, and
    whatever has been released is fed (several chunks at once if the model fell behind).

    A token's latency runs from when the audio that decides it (its 80 ms and the delay after it) has fully
    arrived to when it is decided: what the model adds beyond the delay.  Only tokens decided by real audio count
    (not the closing padding).  The backlog is how long after the last chunk arrived the stream had caught up."""
    cfg = model.config.audio
    step, tick = cfg.samples_per_token, cfg.samples_per_token / cfg.sample_rate
    chunks = len(audio) // step
    session = _DecisionTimes(model, delay_ms=delay_ms, track_latency=False, clock=clock)
    fed = 0
    compute = 0.0
    feeds = 0
    start = clock()
    while fed < chunks:
        due = start + (fed + 1) * tick
        if clock() < due:
            sleep(due - clock())
        arrived = min(chunks, int((clock() - start) / tick + 1e-9))
        began = clock()
        session.feed(audio[fed * step:arrived * step])
        compute += clock() - began
        fed, feeds = arrived, feeds + 1
    backlog = clock() - (start + chunks * tick)
    decided = session.decided
    session.close()
    by_real_audio = [i for i in range(len(decided)) if (i + session.delay_tokens + 1) <= chunks]
    latency_ms = np.array([1000 * (decided[i] - (start + (i + session.delay_tokens + 1) * tick))
                           for i in by_real_audio])
    seconds = chunks * tick
    result = {
        "audio_s": seconds, "delay_ms": session.delay_ms, "tick_ms": 1000 * tick, "feeds": feeds,
        "compute_ms_per_step": 1000 * compute / chunks, "rtf": compute / seconds,
        "final_backlog_ms": 1000 * max(0.0, backlog), "tokens": len(by_real_audio),
        "token_latency_ms_p50": float(np.percentile(latency_ms, 50)) if len(latency_ms) else None,
        "token_latency_ms_p99": float(np.percentile(latency_ms, 99)) if len(latency_ms) else None,
        "token_latency_ms_max": float(latency_ms.max()) if len(latency_ms) else None,
    }
    # falling behind at any steady rate leaves seconds of work queued at the end of a long stream
    result["keeps_up"] = result["final_backlog_ms"] <= 2 * result["tick_ms"]
    return result


def environment(command: str) -> dict[str, Any]:
    """The machine, the software and the command."""
    import onnxruntime

    from .. import cpu_kernels

    return {"command": command, "device": "cpu", "cpu": cpu_name(), "logical_cpus": os.cpu_count(),
            "usable_cpus": usable_cpus(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "cpu_kernel": "onnxruntime" if cpu_kernels.available() else "torch",
            "python": platform.python_version()}


def add_floor(run: dict[str, Any], bandwidth_gb_per_s: float) -> None:
    """The decoder step's memory floor at the measured bandwidth, and the step against it."""
    if "error" in run:
        return
    run["read_gb_per_s"] = bandwidth_gb_per_s
    run["step_floor_ms"] = 1000 * run["decode_weight_gb"] / bandwidth_gb_per_s
    run["step_x_floor"] = run["decoder_step_ms"] / run["step_floor_ms"]


def print_report(report: dict[str, Any]) -> None:
    """The CPU report as tables on stdout."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    console.print(f"{report['cpu']} ({report['usable_cpus']} CPUs)  torch {report['torch']}  onnxruntime "
                  f"{report['onnxruntime']}  model: {report['model']}")
    bandwidth = ", ".join(f"{t} threads {gb:.1f} GB/s" for t, gb in report["read_gb_per_s"].items())
    console.print(f"memory-read bandwidth: {bandwidth}")
    runs = [r for r in report["runs"] if "error" not in r]
    table = Table(title="decoder step (one stream, 400 tokens in) against the memory floor")
    for column in ("quant", "threads", "kernel", "GB/step", "GB/s read", "floor ms", "step ms", "x floor"):
        table.add_column(column, justify="right")
    for r in runs:
        table.add_row(r["qtype"], str(r["threads"]), r["kernel"], _fmt(r["decode_weight_gb"]),
                      _fmt(r["read_gb_per_s"], 1), _fmt(r["step_floor_ms"], 1), _fmt(r["decoder_step_ms"], 1),
                      _fmt(r["step_x_floor"]))
    console.print(table)
    table = Table(title="live (80 ms steps) and offline")
    for column in ("quant", "threads", "enc ms/step", "live ms/step", "paced ms/step", "paced RTF",
                   "latency p50/p99", "backlog ms", "keeps up", "file RTF", "peak RSS GiB"):
        table.add_column(column, justify="right")
    for r in runs:
        live, paced = r["live_compute"], r["live"]
        table.add_row(r["qtype"], str(r["threads"]), _fmt(live["encoder_ms_per_step"], 1),
                      _fmt(live["ms_per_step"], 1), _fmt(paced["compute_ms_per_step"], 1), _fmt(paced["rtf"]),
                      f"{_fmt(paced['token_latency_ms_p50'], 0)}/{_fmt(paced['token_latency_ms_p99'], 0)}",
                      _fmt(paced["final_backlog_ms"], 0), "yes" if paced["keeps_up"] else "no",
                      _fmt(r["file"]["rtf"]), _fmt(r["peak_rss_gib"]))
    console.print(table)
    console.print("enc/live ms/step: one stream fed 80 ms at a time as fast as it goes; paced: fed at real-time "
                  "pace; latency: ms from the arrival of a token's audio (its 80 ms and the delay) to its decision")
    for r in report["runs"]:
        if "error" in r:
            console.print(f"{r['qtype']} at {r['threads']} threads: failed: {r['error']}")
    crisp = report.get("crispasr")
    if crisp is None:
        return
    if "error" in crisp:
        console.print(f"CrispASR: {crisp['error']}")
        return
    table = Table(title=f"CrispASR {crisp['version']} ({crisp['qtype']}, its own converter), same machine and run")
    for column in ("threads", "decoder step ms", "offline RTF", "live RTF (80 ms feeds)", "ours / its step"):
        table.add_column(column, justify="right")
    for c in crisp["runs"]:
        ours = [r["decoder_step_ms"] for r in runs if r["threads"] == c["threads"]]
        ratio = ", ".join(f"{ms / c['decoder_step_ms']:.2f}" for ms in ours) if c.get("decoder_step_ms") else "-"
        table.add_row(str(c["threads"]), _fmt(c.get("decoder_step_ms"), 1), _fmt(c.get("offline_rtf")),
                      _fmt(c.get("live_rtf")), ratio)
    console.print(table)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
