"""The full-size model (random weights) through `voxtral export web`: export time per phase, file sizes per graph
against the arithmetic of `estimate_export_bytes`, and onnxruntime time per audio step and per decoder step on the
CPU and, where onnxruntime has it, with CUDAExecutionProvider.

    python3 bench/web_export_full.py --quant q4 --out /tmp/web-q4 --json bench/results/web_export_q4.json

The JSON is rewritten after every phase (build, each export stage, sizes, each timing), so a run cut short keeps
what it measured; ``--budget-s`` (seconds from the process's start) stops the timing loops in time for an outside
limit.  CUDA (only with an onnxruntime that has CUDAExecutionProvider, i.e. onnxruntime-gpu) is timed first and
twice: ``cuda_iobinding`` keeps the state on the GPU between steps (the samples, token and positions go up, the
12 KB audio embedding and the next token come down), ``cuda_numpy`` feeds numpy arrays to ``session.run`` as the
CPU path does (every step copies the whole state, 2.1 GB at full size, host -> device and back: in the time).
Every phase records wall, user and system seconds: the export is single-threaded throughout, and where first
touches of memory are slow (a VM) system time dominates; ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` cut the
export by a third on such a machine.

Needs about 55 GB of memory for the float32 model, its traced graphs and the quantizer's copies, and the disk for
the float32 graphs in a temporary folder (19 GB) plus the export (2.8 GB in q4).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voxtral_realtime.api import Model
from voxtral_realtime.benchmarking.random_weights import AUDIO_BLOCK, random_network, write_tekken_json
from voxtral_realtime.browser import estimate_export_bytes, export_web
from voxtral_realtime.browser.runner import GraphState
from voxtral_realtime.config import ModelConfig, full_size_config
from voxtral_realtime.errors import first_line
from voxtral_realtime.tokenizer import Tokenizer

#: the first calls of each graph, not counted (allocations, kernel choices); every step feeds 80 ms of noise to the
#: audio graph, then its embedding with token 32 to the decoder graph
WARMUP_STEPS = 2


def _process_age_s() -> float:
    """Seconds since this process started (Linux; 0 elsewhere): interpreter start and imports included."""
    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks
        with open("/proc/uptime") as f:
            return float(f.read().split()[0]) - started / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


class Phases:
    """Wall, user and system seconds of each phase (user + system over wall near 1: one thread busy; system
    time is mostly the kernel mapping fresh pages for large buffers), the peak resident memory after it, and
    the JSON rewritten after each."""

    def __init__(self, report: dict, path: Path | None) -> None:
        self.report, self.path = report, path
        report.setdefault("phases", [])
        report["startup_s"] = round(_process_age_s(), 1)
        self.started = time.perf_counter() - report["startup_s"]  # elapsed times count from the process's start
        self.restart()

    @staticmethod
    def _clocks() -> tuple[float, float, float]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), usage.ru_utime, usage.ru_stime

    def restart(self) -> None:
        self._last = self._clocks()

    def done(self, name: str) -> float:
        now = self._clocks()
        spent, user, system = (a - b for a, b in zip(now, self._last))
        self.report["phases"].append({"phase": name, "wall_s": round(spent, 2), "user_s": round(user, 2),
                                      "sys_s": round(system, 2),
                                      "threads_busy": round((user + system) / max(spent, 1e-9), 2),
                                      "peak_rss_gb": round(_peak_rss_gb(), 2),
                                      "elapsed_s": round(now[0] - self.started, 1)})
        self._last = now
        print(f"[{now[0] - self.started:6.0f} s] {name}: {spent:.1f} s (user {user:.1f}, sys {system:.1f})",
              flush=True)
        self.write()
        return spent

    def write(self) -> None:
        self.report["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        scratch = self.path.with_name(self.path.name + ".partial")
        scratch.write_text(json.dumps(self.report, indent=2) + "\n")
        os.replace(scratch, self.path)


def _audio_feeds(rng: np.random.Generator, window: int, step: int) -> dict[str, np.ndarray]:
    return {"samples": (0.1 * rng.standard_normal(window)).astype(np.float32),
            "position": np.array([4 * step], np.int64)}


def _decoder_feeds(step: int) -> dict[str, np.ndarray]:
    return {"token": np.array([32], np.int64), "position": np.array([step], np.int64),
            "delay": np.array([6.0], np.float32)}


def _summary(audio_times: list[float], decoder_times: list[float], tokens: list[int],
             embeddings: list[np.ndarray]) -> dict[str, Any]:
    audio_ms, decoder_ms = 1000 * np.array(audio_times[WARMUP_STEPS:]), 1000 * np.array(decoder_times[WARMUP_STEPS:])
    return {"audio_step_ms": float(np.median(audio_ms)), "decoder_step_ms": float(np.median(decoder_ms)),
            "audio_step_ms_min": float(audio_ms.min()), "decoder_step_ms_min": float(decoder_ms.min()),
            "first_audio_step_ms": 1000 * audio_times[0], "first_decoder_step_ms": 1000 * decoder_times[0],
            "steps": len(audio_ms), "real_time_factor": float(np.median(audio_ms) + np.median(decoder_ms)) / 80,
            "next_tokens": tokens, "embeddings": embeddings}


def time_numpy(sessions: dict[str, Any], manifest: dict, steps: int, deadline: float) -> dict[str, Any]:
    """``steps`` (+ warm-up) audio and decoder steps through ``session.run`` with numpy feeds and results, the
    state carried in numpy arrays (as :class:`voxtral_realtime.browser.OnnxEngine` does); fewer steps past ``deadline``
    (a ``time.perf_counter`` value)."""
    audio, decoder = sessions["audio"], sessions["decoder"]
    graphs = manifest["graphs"]
    audio_out, decoder_out = [o.name for o in audio.get_outputs()], [o.name for o in decoder.get_outputs()]
    audio_state, decoder_state = GraphState(graphs["audio"]), GraphState(graphs["decoder"])
    rng = np.random.default_rng(0)
    audio_times, decoder_times, tokens, embeddings = [], [], [], []
    for step in range(steps + WARMUP_STEPS):
        if step > WARMUP_STEPS and time.perf_counter() > deadline:
            break
        feeds = {**_audio_feeds(rng, manifest["audio"]["step_window"], step), **audio_state.values}
        t = time.perf_counter()
        results = audio.run(audio_out, feeds)
        audio_times.append(time.perf_counter() - t)
        audio_state.update(audio_out, results)
        feeds = {**_decoder_feeds(step), "audio": dict(zip(audio_out, results))["embedding"], **decoder_state.values}
        t = time.perf_counter()
        results = decoder.run(decoder_out, feeds)
        decoder_times.append(time.perf_counter() - t)
        decoder_state.update(decoder_out, results)
        tokens.append(int(dict(zip(decoder_out, results))["next_token"][0]))
        embeddings.append(feeds["audio"].reshape(-1))
    return _summary(audio_times, decoder_times, tokens, embeddings)


def _run_bound(session, host_feeds: dict, device_feeds: dict, output_names: list[str], host_output: str,
               device: str) -> dict:
    """One ``run_with_iobinding``: host inputs copied in, device values bound as they are, every output left on
    ``device`` except ``host_output``."""
    binding = session.io_binding()
    for name, value in host_feeds.items():
        binding.bind_cpu_input(name, value)
    for name, value in device_feeds.items():
        binding.bind_ortvalue_input(name, value)
    for name in output_names:
        binding.bind_output(name, "cpu" if name == host_output else device, 0)
    session.run_with_iobinding(binding)
    return dict(zip(output_names, binding.get_outputs()))


def time_bound(ort: Any, sessions: dict[str, Any], manifest: dict, steps: int, deadline: float,
               device: str) -> dict[str, Any]:
    """As :func:`time_numpy`, with the state kept on ``device`` ("cuda" or "cpu") between steps through IO
    binding: each step the small inputs go up, and the audio embedding (12 KB at full size, read back to compare
    the providers) and the next token come down."""
    audio, decoder = sessions["audio"], sessions["decoder"]
    graphs = manifest["graphs"]
    audio_out, decoder_out = [o.name for o in audio.get_outputs()], [o.name for o in decoder.get_outputs()]
    audio_state, decoder_state = GraphState(graphs["audio"]), GraphState(graphs["decoder"])
    for state in (audio_state, decoder_state):  # on the device from the start
        state.values = {name: ort.OrtValue.ortvalue_from_numpy(value, device, 0) for name, value in state.values.items()}
    rng = np.random.default_rng(0)
    audio_times, decoder_times, tokens, embeddings = [], [], [], []
    for step in range(steps + WARMUP_STEPS):
        if step > WARMUP_STEPS and time.perf_counter() > deadline:
            break
        feeds = _audio_feeds(rng, manifest["audio"]["step_window"], step)
        t = time.perf_counter()
        outputs = _run_bound(audio, feeds, audio_state.values, audio_out, "embedding", device)
        audio_times.append(time.perf_counter() - t)
        audio_state.update(list(outputs), list(outputs.values()))
        outputs_embedding = outputs["embedding"].numpy()
        feeds = _decoder_feeds(step)
        t = time.perf_counter()
        outputs = _run_bound(decoder, feeds, {"audio": outputs["embedding"], **decoder_state.values}, decoder_out,
                             "next_token", device)
        token = int(outputs["next_token"].numpy()[0])
        decoder_times.append(time.perf_counter() - t)
        decoder_state.update(list(outputs), list(outputs.values()))
        tokens.append(token)
        embeddings.append(outputs_embedding.reshape(-1))
    return _summary(audio_times, decoder_times, tokens, embeddings)


def load_sessions(ort: Any, folder: Path, manifest: dict, providers: list[Any]) -> tuple[dict[str, Any], str]:
    """Both graphs' sessions on ``providers``, and what onnxruntime printed or warned meanwhile (it prints, or
    warns, rather than raises, when it leaves out a provider it could not create)."""
    import warnings

    printed = io.StringIO()
    sessions = {}
    with contextlib.redirect_stdout(printed), warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        for key, graph in manifest["graphs"].items():
            sessions[key] = ort.InferenceSession(str(folder / graph["file"]), ort.SessionOptions(),
                                                 providers=providers)
    text = printed.getvalue() + "".join(f"warning: {w.message}\n" for w in warned)
    if text:
        print(text, end="", flush=True)
    return sessions, text


def _cuda_sessions(ort: Any, folder: Path, manifest: dict, entry: dict[str, Any]) -> dict[str, Any] | None:
    """Both graphs' sessions with CUDAExecutionProvider, or None with what went wrong in ``entry``."""
    try:
        sessions, printed = load_sessions(ort, folder, manifest, [("CUDAExecutionProvider", {"device_id": 0}),
                                                                  "CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - recorded: the run goes on to the CPU timing
        entry["error"] = f"{type(exc).__name__}: {first_line(exc)}"
        entry["traceback"] = traceback.format_exc()[-4000:]
        return None
    entry["providers"] = {key: s.get_providers() for key, s in sessions.items()}
    if printed:
        entry["printed"] = printed[-4000:]
    if any("CUDAExecutionProvider" not in p for p in entry["providers"].values()):
        entry["error"] = "onnxruntime left CUDAExecutionProvider out (see printed, and the log)"
        return None
    return sessions


def _compare(result: dict[str, Any], reference: dict[str, Any], embeddings: list[np.ndarray],
             reference_embeddings: list[np.ndarray]) -> None:
    """Record how far ``result``'s audio embeddings and tokens are from ``reference``'s, step by step (both runs
    fed the same samples)."""
    common = min(len(embeddings), len(reference_embeddings))
    if not common:
        return
    diff = max(float(np.abs(a - b).max()) for a, b in zip(embeddings[:common], reference_embeddings[:common]))
    scale = max(float(np.abs(b).max()) for b in reference_embeddings[:common])
    result["embedding_max_abs_diff_vs_cpu"] = diff
    result["embedding_max_abs_cpu"] = scale
    tokens = list(zip(result["next_tokens"], reference["next_tokens"]))
    result["next_tokens_same_as_cpu"] = sum(a == b for a, b in tokens) / len(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quant", default="q4")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20,
                        help="timed steps of each graph (after 2 warm-up steps), CUDA with IO binding")
    parser.add_argument("--cpu-steps", type=int, help="timed steps on the CPU (default: --steps; 0: skip)")
    parser.add_argument("--cuda-numpy-steps", type=int,
                        help="timed CUDA steps with numpy feeds (default: --steps; 0: skip)")
    parser.add_argument("--bound-cpu-steps", type=int, default=0,
                        help="also time the IO-binding path on the CPU (a check of that code without a GPU)")
    parser.add_argument("--decoder-context", type=int, help="as `voxtral export web --decoder-context`")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="after this many seconds from the process's start, time no more steps (a timing "
                             "loop stops early, later ones are skipped): the JSON is complete before an outside "
                             "time limit")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--params", type=Path, help="a params.json of other shapes (a quick trial of this script)")
    args = parser.parse_args()
    cpu_steps = args.steps if args.cpu_steps is None else args.cpu_steps
    cuda_numpy_steps = args.steps if args.cuda_numpy_steps is None else args.cuda_numpy_steps

    import onnxruntime as ort

    report: dict[str, Any] = {
        "command": " ".join(sys.argv), "quant": args.quant, "decoder_context": args.decoder_context,
        "params": str(args.params) if args.params else "full size (config.FULL_SIZE_PARAMS)",
        "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "machine": platform.node(),
        "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "onnxruntime": ort.__version__, "onnxruntime_providers": ort.get_available_providers(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "env": {k: os.environ[k] for k in ("GLIBC_TUNABLES", "OMP_NUM_THREADS", "TMPDIR") if k in os.environ},
        "note": "random weights; onnxruntime default threads; step times are medians after 2 warm-up steps",
    }
    phases = Phases(report, args.json)
    deadline = phases.started + args.budget_s  # from the process's start
    phases.write()

    tekken_dir = tempfile.mkdtemp(prefix="voxtral-tekken-")
    config = (ModelConfig.from_params_json(json.loads(args.params.read_text()), dict(AUDIO_BLOCK)) if args.params
              else full_size_config())
    report["layers"] = {"decoder": config.decoder.n_layers, "encoder": config.encoder.n_layers}
    report["estimated_bytes"] = estimate_export_bytes(config, args.quant, decoder_context=args.decoder_context)
    network = random_network(config, device="cpu", dtype=torch.float32, seed=0)
    model = Model(network, Tokenizer(write_tekken_json(Path(tekken_dir) / "tekken.json")), source="random-full-size")
    report["build_s"] = phases.done("build the float32 model")

    export_started = time.perf_counter()
    manifest = export_web(model, args.out, quant=args.quant, decoder_context=args.decoder_context,
                          progress=lambda done, total, what: phases.done(f"export {done}/{total}: {what}"))
    report["export_s"] = time.perf_counter() - export_started
    del model, network
    files = {f["name"]: f["bytes"] for f in manifest["files"]}
    report["files"] = files
    measured = {key: sum(b for n, b in files.items() if n.startswith(stem + "."))
                for key, stem in (("audio_graph", "audio_step"), ("decoder_graph", "decoder_step"))}
    report["measured_bytes"] = {**measured, "download": sum(measured.values())}
    report["largest_file_bytes"] = max(files.values())
    if args.quant == "q4":
        report["q4_target_bytes"] = 3_000_000_000
        report["q4_within_target"] = report["measured_bytes"]["download"] <= 3_000_000_000
    print(json.dumps({k: report[k] for k in ("measured_bytes", "estimated_bytes", "largest_file_bytes")}),
          flush=True)
    phases.write()

    # CUDA first (what this run is for where there is a GPU), then the CPU, the slower part at full size
    runs: dict[str, Any] = {}
    report["onnxruntime_runs"] = runs
    embeddings: dict[str, list[np.ndarray]] = {}  # each run's audio embeddings, to compare the providers

    def timed(name: str, steps: int, timer: Any, note: str) -> None:
        if time.perf_counter() > deadline:
            runs[name] = {"skipped": f"past --budget-s {args.budget_s:g}"}
            phases.write()
            return
        try:
            result = timer(steps)
            embeddings[name] = result.pop("embeddings")
            if name != "cpu" and "cpu" in embeddings:
                _compare(result, runs["cpu"], embeddings[name], embeddings["cpu"])
            runs[name] = {**result, "note": note}
        except Exception as exc:  # noqa: BLE001 - recorded: the run goes on to the next measurement
            runs[name] = {"error": f"{type(exc).__name__}: {first_line(exc)}",
                          "traceback": traceback.format_exc()[-4000:]}
        phases.done(f"onnxruntime {name} x{steps}")

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        runs["cuda_load"] = {"error": "this onnxruntime has no CUDAExecutionProvider"}
        phases.write()
    elif time.perf_counter() > deadline:
        runs["cuda_load"] = {"skipped": f"past --budget-s {args.budget_s:g}"}
        phases.write()
    else:
        phases.restart()
        runs["cuda_load"] = entry = {}
        cuda_sessions = _cuda_sessions(ort, args.out, manifest, entry)
        if cuda_sessions is None and hasattr(ort, "preload_dlls") and time.perf_counter() < deadline:
            # onnxruntime's own search for the CUDA and cuDNN libraries (nvidia-* wheels), then once more
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                try:
                    ort.preload_dlls()
                except Exception as exc:  # noqa: BLE001 - recorded
                    print(f"preload_dlls: {type(exc).__name__}: {first_line(exc)}")
            runs["cuda_load"] = entry = {"first_try": entry, "preload_dlls": printed.getvalue()[-4000:]}
            cuda_sessions = _cuda_sessions(ort, args.out, manifest, entry)
        entry["load_s"] = phases.done("onnxruntime CUDA sessions")
        if cuda_sessions is not None and args.steps > 0:
            timed("cuda_iobinding", args.steps,
                  lambda n: time_bound(ort, cuda_sessions, manifest, n, deadline, "cuda"),
                  "IO binding: the state stays on the GPU; each step the samples, token and positions go up and "
                  "the audio embedding and next token come down (included)")
        if cuda_sessions is not None and cuda_numpy_steps > 0:
            timed("cuda_numpy", cuda_numpy_steps, lambda n: time_numpy(cuda_sessions, manifest, n, deadline),
                  "session.run with numpy feeds and results: every step copies the whole state host -> device "
                  "and back, included in the times")
        cuda_sessions = None

    if cpu_steps > 0 and time.perf_counter() < deadline:
        phases.restart()
        cpu_sessions, _ = load_sessions(ort, args.out, manifest, ["CPUExecutionProvider"])
        report["session_load_s"] = phases.done("onnxruntime CPU sessions")
        timed("cpu", cpu_steps, lambda n: time_numpy(cpu_sessions, manifest, n, deadline),
              "session.run with numpy feeds, onnxruntime's default threads")
        if "audio_step_ms" in runs["cpu"]:
            report["onnxruntime_cpu_audio_step_ms"] = runs["cpu"]["audio_step_ms"]
            report["onnxruntime_cpu_decoder_step_ms"] = runs["cpu"]["decoder_step_ms"]
            report["real_time_factor_cpu"] = runs["cpu"]["real_time_factor"]
            for name in ("cuda_iobinding", "cuda_numpy"):
                if name in embeddings:
                    _compare(runs[name], runs["cpu"], embeddings[name], embeddings["cpu"])
        if args.bound_cpu_steps > 0:  # the IO-binding path on the CPU: a check of that code where no GPU is
            timed("cpu_iobinding", args.bound_cpu_steps,
                  lambda n: time_bound(ort, cpu_sessions, manifest, n, deadline, "cpu"), "IO binding on the CPU")
        cpu_sessions = None
    elif cpu_steps > 0:
        runs["cpu"] = {"skipped": f"past --budget-s {args.budget_s:g}"}
    report["finished"] = True
    phases.write()
    print(json.dumps({k: v for k, v in report.items() if k != "files"}, indent=2), flush=True)


if __name__ == "__main__":
    main()
