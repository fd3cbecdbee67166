"""``voxtral bench``: how fast each path runs, against the memory-bandwidth floor and the reference implementation.

Every measurement goes through the same public pieces users run (:class:`.api.Model`, :class:`.engine.Engine`);
the harness only adds clocks.  On CUDA each timed region ends with a device synchronisation.

* :func:`bench_file`: one file through a session fed as ``transcribe`` feeds it: encode and decode time,
  ms per decoder step, real-time factor, tokens/s, peak memory, achieved GB/s.
* :func:`bench_step`: the batched decoder step alone at B streams with C tokens of context each: host wall time
  per step (what a stream sees) and the replayed CUDA graph's device time (what the GPU does).
* :func:`bench_streams`: N live streams, 80 ms of audio each per tick, on a virtual clock: tick k's audio arrives
  at k x 80 ms, and its work starts when both that audio and the previous tick's work are done.  Ticks run
  back to back (no sleeping), so latency = queueing + compute, exactly as if the audio came in real time.
* :func:`bench_transformers`: ``VoxtralRealtimeForConditionalGeneration.generate`` with the same weights.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..api import Model
from ..engine import Engine, Slot
from ..protocol import padded_audio, prompt_ids

GIB = 2**30


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Free what a finished measurement held (sessions and slots reference each other: collect the cycles)."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def copy_bandwidth(device: torch.device, nbytes: int = GIB) -> float | None:
    """Device copy bandwidth in GB/s (bytes read + written per second), best of 10; None on the CPU."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = math.inf
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1000)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / best / 1e9


def decode_weight_bytes(model: Model) -> int:
    """Bytes of weights one decoder step reads: the decoder layers, the final norm and the (tied) LM head (for a
    quantized model: its packed weights, scales and offsets).  A CPU layer on onnxruntime holds its weight out of
    torch's sight (counted as the file holds it); what it keeps for token-table lookups is read a row at a time."""
    from ..cpu_kernels import OnnxQuantizedLinear

    decoder = model.network.decoder
    onnx_layers = [m for m in decoder.modules() if isinstance(m, OnnxQuantizedLinear)]
    lookup_only = {id(t) for m in onnx_layers for t in (m.blob, m.row_scales) if t is not None}
    tensors = {id(t): t for t in [*decoder.parameters(), *decoder.buffers()]
               if t is not None and id(t) not in lookup_only}
    return sum(t.numel() * t.element_size() for t in tensors.values()) + sum(m.weight_bytes for m in onnx_layers)


def bench_quantized(model: Model, qtype: str, audio: np.ndarray, step_batches: list[int], step_context: int, *,
                    delay_ms: int | None = None) -> dict[str, Any]:
    """``model`` quantized in place to ``qtype``, then the one-file and decoder-step measurements."""
    from ..quantization import quantize_network

    device = model.device
    quantize_network(model.network, qtype)
    release(device)
    out: dict[str, Any] = {"qtype": qtype, "decode_weight_gb": decode_weight_bytes(model) / 1e9}
    if device.type == "cuda":
        out["model_gpu_gib"] = torch.cuda.memory_allocated(device) / GIB
    out["file"] = bench_file(model, audio, delay_ms=delay_ms)
    out["steps"] = [bench_step(model, b, step_context) for b in step_batches]
    return out


def _peak_memory(device: torch.device) -> dict[str, float]:
    out = {"peak_cpu_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}
    if device.type == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    return out


def bench_file(model: Model, audio: np.ndarray, *, delay_ms: int | None = None,
               warmup_seconds: float = 12.0) -> dict[str, Any]:
    """One file through a session (the ``transcribe`` path), after a warm-up that compiles the kernels and captures
    the graphs of every encoder call size, which a process's first file pays for once."""
    device = model.device
    model.transcribe(audio[: int(16000 * warmup_seconds)], delay_ms=delay_ms)
    session = model.stream(delay_ms=delay_ms)
    engine = session.engine
    engine.capture_graphs()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    engine.stage_seconds = {}
    calls_before = engine.decode_calls
    _sync(device)
    started = time.perf_counter()
    session.feed_all(audio, piece=model.transcription_piece)
    _sync(device)
    total = time.perf_counter() - started
    engine.stage_seconds, stages = None, engine.stage_seconds
    steps = engine.decode_calls - calls_before
    seconds = len(audio) / model.config.audio.sample_rate
    decode = stages.get("decode", 0.0)
    ms_per_step = 1000 * decode / max(1, steps)
    return {
        "audio_s": seconds, "total_s": total, "encode_s": stages.get("encode", 0.0), "decode_s": decode,
        "decode_steps": steps, "ms_per_step": ms_per_step, "rtf": total / seconds,
        "tokens": len(session.tokens), "tokens_per_s": len(session.tokens) / total,
        "decode_gb_per_s": decode_weight_bytes(model) / (ms_per_step / 1000) / 1e9,
        **_peak_memory(device), "token_ids": session.tokens,
    }


class _Sink:
    """A slot client that keeps decoding and remembers nothing (the step benchmark's streams)."""

    def on_token(self, slot: Slot, token: int) -> bool:
        return True


def bench_step(model: Model, batch: int, context: int, *, steps: int = 50) -> dict[str, Any]:
    """The batched decoder step at ``batch`` streams, each ``context`` tokens into its stream."""
    network, device = model.network, model.device
    engine = Engine(network, max_streams=batch, decoder_context=context + steps + 16, compile=model.compile)
    slots = [engine.attach(_Sink()) for _ in range(batch)]
    zero = torch.zeros(network.config.decoder.dim, device=device, dtype=network.dtype)
    cache = engine.decoder_cache
    cache.reserve(context + steps + 8)
    held = torch.arange(max(0, context - cache.window), context, device=device)  # what a real stream would hold
    cache.positions[:, held % cache.capacity] = held
    for slot in slots:
        slot.prompt, slot.position = [], context
        slot.embeddings.extend([zero] * (steps + 3))
    for _ in range(3):  # eager, capture, replay
        engine._step(slots)
    _sync(device)
    started = time.perf_counter()
    pending = None
    for _ in range(steps):  # pipelined, as Engine.run does it
        launched = engine._launch_step(slots)
        if pending is not None:
            engine._complete_step(pending)
        pending = launched
    engine._complete_step(pending)
    _sync(device)
    wall_ms = 1000 * (time.perf_counter() - started) / steps
    out: dict[str, Any] = {"batch": batch, "context": context, "ms_per_step": wall_ms}
    graphs = engine._graphs
    if graphs is not None:
        graph = graphs.graph(("decode", engine._rows(slots), 1))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            graph.replay()
        end.record()
        end.synchronize()
        out["gpu_ms_per_step"] = start.elapsed_time(end) / steps
    kv = batch * min(context, engine.decoder_cache.window) * engine.decoder_cache.bytes_per_row() \
        // engine.decoder_cache.positions.shape[1]
    out["bytes_per_step"] = decode_weight_bytes(model) + kv
    out["gb_per_s"] = out["bytes_per_step"] / (out.get("gpu_ms_per_step", wall_ms) / 1000) / 1e9
    del engine, slots
    release(device)
    return out


@dataclass
class _LiveStream:
    session: Any
    audio: np.ndarray
    join_tick: int
    first_token_tick: int | None = None
    tokens_seen: int = 0


def bench_streams(model: Model, n_streams: int, *, seconds: float, delay_ms: int | None = None,
                  join_ticks: int = 25, audio_source: Callable[[float, int], np.ndarray] | None = None,
                  ) -> dict[str, Any]:
    """``n_streams`` live streams of ``seconds`` each, joining over the first ``join_ticks`` ticks."""
    from .signals import speechlike

    audio_source = audio_source or speechlike
    cfg = model.config.audio
    step = cfg.samples_per_token
    tick_s = step / cfg.sample_rate
    n_ticks = int(seconds / tick_s)
    delay_tokens = cfg.delay_tokens(delay_ms)
    context = len(prompt_ids(model.tokenizer, cfg, delay_tokens)) + n_ticks + join_ticks + 8
    engine = model.engine(n_streams, decoder_context=context)
    started = time.perf_counter()
    engine.capture_graphs()
    capture_s = time.perf_counter() - started
    base = audio_source(seconds, 0)
    streams = [_LiveStream(None, np.roll(base, 997 * i), join_tick=i * join_ticks // n_streams)
               for i in range(n_streams)]
    device = model.device
    durations, latencies, ttft = [], [], []  # latencies: (tick, seconds)
    finish_prev = 0.0
    for tick in range(n_ticks + join_ticks):
        arrival = tick * tick_s
        _sync(device)
        started = time.perf_counter()
        for stream in streams:
            k = tick - stream.join_tick
            if k < 0 or k >= n_ticks:
                continue
            if stream.session is None:
                stream.session = model.stream(delay_ms=delay_ms, engine=engine)
            stream.session.push(stream.audio[k * step:(k + 1) * step])
        engine.run()
        _sync(device)
        duration = time.perf_counter() - started
        finish = max(arrival, finish_prev) + duration
        finish_prev = finish
        durations.append(duration)
        for stream in streams:
            if stream.session is None:
                continue
            new = len(stream.session.tokens) - stream.tokens_seen
            if new:
                stream.tokens_seen += new
                latencies.extend([(tick, finish - arrival)] * new)
                if stream.first_token_tick is None:
                    stream.first_token_tick = tick
                    ttft.append(finish - arrival)
    for stream in streams:
        stream.session.close()
    durations_ms = np.array(durations) * 1000
    # steady phase: every stream has joined and none has run out of audio
    steady = slice(join_ticks, n_ticks)
    lat_ticks = np.array([t for t, _ in latencies])
    lat_ms = np.array([s for _, s in latencies]) * 1000
    steady_lat = lat_ms[(lat_ticks >= join_ticks) & (lat_ticks < n_ticks)]
    ttft_ms = np.array(ttft) * 1000

    def pct(values: np.ndarray, q: float) -> float | None:
        return float(np.percentile(values, q)) if len(values) else None

    result = {
        "streams": n_streams, "seconds": seconds, "delay_ms": round(delay_tokens * cfg.token_ms),
        "join_ticks": join_ticks, "decoder_context": context, "tick_budget_ms": tick_s * 1000,
        "graph_capture_s": capture_s,
        "tick_ms_p50": pct(durations_ms, 50), "tick_ms_p99": pct(durations_ms, 99),
        "tick_ms_max": float(durations_ms.max()),
        "steady_tick_ms_p50": pct(durations_ms[steady], 50), "steady_tick_ms_p99": pct(durations_ms[steady], 99),
        "token_latency_ms_p50": pct(lat_ms, 50), "token_latency_ms_p99": pct(lat_ms, 99),
        "steady_token_latency_ms_p50": pct(steady_lat, 50), "steady_token_latency_ms_p99": pct(steady_lat, 99),
        "ttft_beyond_delay_ms_p50": pct(ttft_ms, 50), "ttft_beyond_delay_ms_p99": pct(ttft_ms, 99),
        "rows_per_decode_call": engine.decode_rows / max(1, engine.decode_calls),
        **_peak_memory(device),
    }
    result["real_time"] = bool(result["steady_tick_ms_p99"] is not None
                               and result["steady_tick_ms_p99"] <= result["tick_budget_ms"])
    result["engine_state_gib"] = engine.state_bytes() / GIB
    del engine, streams
    release(device)
    return result


def bench_transformers(model: Model, audio: np.ndarray, *, delay_ms: int | None = None) -> dict[str, Any]:
    """The reference implementation (transformers) on the same weights, device and dtype: generate() timed."""
    from .reference import reference_model, reference_transcribe

    device = model.device
    hf = reference_model(model)
    reference_transcribe(hf, model, audio[: 16000 * 2], delay_ms=delay_ms)  # warm-up
    _sync(device)
    started = time.perf_counter()
    tokens = reference_transcribe(hf, model, audio, delay_ms=delay_ms)
    _sync(device)
    total = time.perf_counter() - started
    del hf
    if device.type == "cuda":
        torch.cuda.empty_cache()
    seconds = len(audio) / model.config.audio.sample_rate
    return {"audio_s": seconds, "total_s": total, "rtf": total / seconds, "tokens": len(tokens),
            "tokens_per_s": len(tokens) / total, "token_ids": tokens}


@torch.no_grad()
def teacher_forced_logits(network: Any, mel: torch.Tensor, prompt: list[int], tokens: list[int],
                          delay_tokens: int, *, chunk_frames: int = 256) -> torch.Tensor:
    """The network's logits at every step when fed ``mel`` [n_mels, T] (whole padded signal), the prompt and then
    ``tokens`` whatever it would itself have chosen: [len(tokens), vocab], float32."""
    device = network.device
    state = network.encoder.new_state(1, max_chunk=chunk_frames, device=device, dtype=network.dtype)
    pieces, position = [], 0
    for start in range(0, mel.shape[-1], 2 * chunk_frames):
        piece = mel[None, :, start:start + 2 * chunk_frames].to(device)
        frames = piece.shape[-1] // 2
        state.cache.reserve(position + frames)
        pieces.append(network.embed_audio(piece, state, torch.arange(position, position + frames, device=device)[None]))
        position += frames
    embeddings = torch.cat(pieces, dim=1)
    cache = network.decoder.new_cache(1, max_chunk=len(prompt), device=device, dtype=network.dtype)
    scales = network.decoder.ffn_scales(delay_tokens)
    p = len(prompt)
    cache.reserve(p)
    logits = [network.decoder(torch.tensor([prompt], device=device), embeddings[:, :p],
                              torch.arange(p, device=device)[None], cache, scales)[0]]
    for k, token in enumerate(tokens[:-1]):
        pos = p + k
        cache.reserve(pos + 1)
        logits.append(network.decoder(torch.tensor([[token]], device=device), embeddings[:, pos:pos + 1],
                                      torch.tensor([[pos]], device=device), cache, scales)[0])
    return torch.stack(logits)


def bench_precision(model: Model, audio: np.ndarray, *, delay_ms: int | None = None) -> dict[str, Any]:
    """``model``'s dtype against float32 compute on the same weights (upcast exactly): greedy token agreement of
    the two free-running transcriptions, and per-step logit error with both fed the float32 tokens."""
    import copy

    if model.dtype == torch.float32:
        return {}
    wide = copy.deepcopy(model.network).float()
    wide.rebuild_buffers()
    wide_model = Model(wide, model.tokenizer, model.source)
    reference = wide_model.transcribe(audio, delay_ms=delay_ms).tokens
    ours = model.transcribe(audio, delay_ms=delay_ms).tokens
    cfg = model.config.audio
    delay = cfg.delay_tokens(delay_ms)
    mel = wide.mel(torch.from_numpy(padded_audio(cfg, audio, delay)).to(wide.device))
    prompt = prompt_ids(model.tokenizer, cfg, delay)
    exact = teacher_forced_logits(wide, mel, prompt, reference, delay)
    del wide, wide_model
    approx = teacher_forced_logits(model.network, mel, prompt, reference, delay)
    rel = ((approx - exact).norm(dim=-1) / exact.norm(dim=-1)).cpu()
    top1 = (approx.argmax(-1) == exact.argmax(-1)).float().mean().item()
    same_prefix = next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), min(len(ours), len(reference)))
    if model.device.type == "cuda":
        torch.cuda.empty_cache()
    return {"dtype": str(model.dtype).removeprefix("torch."), "steps": len(reference),
            "logits_rel_err_p50": float(rel.median()), "logits_rel_err_max": float(rel.max()),
            "teacher_forced_top1_agreement": top1,
            "free_running_tokens_equal": ours == reference, "free_running_common_prefix": same_prefix}


def environment(model: Model, command: str) -> dict[str, Any]:
    """What the numbers were measured on, the command that measured them, and the step's memory floor."""
    import platform

    device = model.device
    bandwidth = copy_bandwidth(device)
    weights = decode_weight_bytes(model)
    return {
        "command": command,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(), "model": model.source,
        "dtype": str(model.dtype).removeprefix("torch."), "decode_weight_gb": weights / 1e9,
        "copy_gb_per_s": bandwidth, "step_floor_ms": 1000 * weights / (bandwidth * 1e9) if bandwidth else None,
    }


def print_report(report: dict[str, Any]) -> None:
    """The report as tables on stdout."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    floor = report.get("step_floor_ms")
    console.print(f"{report['device_name']}  torch {report['torch']}  {report['dtype']}  model: {report['model']}")
    if floor:
        console.print(f"copy bandwidth {report['copy_gb_per_s']:.0f} GB/s; one decoder step reads "
                      f"{report['decode_weight_gb']:.2f} GB of weights: floor {floor:.2f} ms")
    failed = [q for q in report.get("quantized", []) if "error" in q]
    quantized = [q for q in report.get("quantized", []) if "error" not in q]
    table = Table(title="one file")
    for column in ("path", "audio s", "encode s", "decode s", "steps", "ms/step", "GB/s", "RTF", "tokens/s",
                   "peak GPU GiB"):
        table.add_column(column, justify="right")
    rows = [(report["dtype"], report["file"])]
    if "transformers" in report:
        rows.append(("transformers", report["transformers"]))
    rows += [(q["qtype"], q["file"]) for q in quantized]
    for label, r in rows:
        table.add_row(label, f"{r['audio_s']:.1f}", _fmt(r.get("encode_s")), _fmt(r.get("decode_s")),
                      str(r.get("decode_steps", r.get("tokens"))), _fmt(r.get("ms_per_step")),
                      _fmt(r.get("decode_gb_per_s"), 0), _fmt(r["rtf"], 4), _fmt(r["tokens_per_s"], 1),
                      _fmt(r.get("peak_gpu_gib")))
    console.print(table)
    if "speedup_vs_transformers" in report:
        console.print(f"speed-up over transformers (same weights, same audio): "
                      f"{report['speedup_vs_transformers']:.1f}x; tokens equal: {report['transformers']['tokens_equal']}")
    step_rows = [(report["dtype"], r, floor) for r in report.get("steps", [])]
    bandwidth = report.get("copy_gb_per_s")
    for q in quantized:
        q_floor = 1000 * q["decode_weight_gb"] / bandwidth if bandwidth else None
        step_rows += [(q["qtype"], r, q_floor) for r in q["steps"]]
    if step_rows:
        table = Table(title="decoder step")
        for column in ("weights", "streams", "context", "ms/step", "gpu ms/step", "GB read", "GB/s", "x floor"):
            table.add_column(column, justify="right")
        for label, r, row_floor in step_rows:
            ms = r.get("gpu_ms_per_step", r["ms_per_step"])
            table.add_row(label, str(r["batch"]), str(r["context"]), _fmt(r["ms_per_step"]),
                          _fmt(r.get("gpu_ms_per_step")), _fmt(r["bytes_per_step"] / 1e9), _fmt(r["gb_per_s"], 0),
                          _fmt(ms / row_floor if row_floor and r["batch"] == 1 else None))
        console.print(table)
    for q in quantized:
        memory = f"; model in GPU memory {q['model_gpu_gib']:.2f} GiB" if "model_gpu_gib" in q else ""
        console.print(f"{q['qtype']}: decoder step reads {q['decode_weight_gb']:.2f} GB{memory}; RTF "
                      f"{q['file']['rtf']:.4f} vs {report['file']['rtf']:.4f} unquantized "
                      f"({report['file']['rtf'] / q['file']['rtf']:.2f}x)")
    for q in failed:
        console.print(f"{q['qtype']}: failed: {q['error']}")
    if report.get("streams"):
        table = Table(title="concurrent live streams (80 ms ticks)")
        for column in ("streams", "tick p50/p99 ms (all)", "steady tick p50/p99 ms", "token latency p50/p99 ms",
                       "first token beyond delay p50/p99 ms", "peak GPU GiB", "real time"):
            table.add_column(column, justify="right")
        for r in report["streams"]:
            if "error" in r:
                table.add_row(str(r["streams"]), r["error"], "", "", "", "", "no")
                continue
            table.add_row(str(r["streams"]), f"{_fmt(r['tick_ms_p50'])} / {_fmt(r['tick_ms_p99'])}",
                          f"{_fmt(r['steady_tick_ms_p50'])} / {_fmt(r['steady_tick_ms_p99'])}",
                          f"{_fmt(r['token_latency_ms_p50'])} / {_fmt(r['token_latency_ms_p99'])}",
                          f"{_fmt(r['ttft_beyond_delay_ms_p50'])} / {_fmt(r['ttft_beyond_delay_ms_p99'])}",
                          _fmt(r.get("peak_gpu_gib")), "yes" if r["real_time"] else "no")
        console.print(table)
    if report.get("precision"):
        p = report["precision"]
        console.print(f"{p['dtype']} vs float32 compute, {p['steps']} steps: logits relative error median "
                      f"{p['logits_rel_err_p50']:.2e}, max {p['logits_rel_err_max']:.2e}; top-1 agreement "
                      f"{p['teacher_forced_top1_agreement']:.3f}; free-running tokens equal: "
                      f"{p['free_running_tokens_equal']} (first {p['free_running_common_prefix']} equal)")


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
