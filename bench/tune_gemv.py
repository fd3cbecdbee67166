"""Measure the few-row matmul kernels (the fused bf16 GEMV as the decoder step calls it, and the 4-bit kernel)
against cuBLAS on the decoder's weight shapes.

Each timing replays a CUDA graph of 20 calls that rotate over enough weight copies (>= 400 MB) that nothing is
served from L2, as in a real decoder step, where every weight is read once.  Prints, per shape and M, the best
configurations and their GB/s; ``--json`` writes everything.

    python3 bench/tune_gemv.py --json bench/results/tune_gemv_h200.json --seconds-per-case 12
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import time

import torch
import torch.nn.functional as F

from voxtral_realtime import kernels
from voxtral_realtime.kernels import MatmulConfig

SHAPES = {"wqkv": (6144, 3072), "wo": (3072, 4096), "w13": (18432, 3072), "w2": (3072, 9216),
          "lm_head": (131072, 3072)}
CALLS = 20


def timed(fn, calls: int = CALLS, repeats: int = 5) -> float:
    """Seconds per call of ``fn(i)`` for i in range(calls), replayed from a CUDA graph."""
    for i in range(2):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1000 / calls)
    return best


def random_q4(n: int, k: int, copies: int):
    out = []
    for _ in range(copies):
        q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
        scales = (torch.rand(n, k // 32, device="cuda") * 0.02).half()
        out.append((q, scales, (-8 * scales.float()).half()))
    return out


def fused_configs(n: int, k: int, gated: bool):
    for bn, bk, warps in itertools.product((1, 2, 4, 8, 16), (256, 512, 1024, 2048, 4096), (1, 2, 4, 8)):
        if n % bn == 0 and bk <= 2 * k and bn * bk * (1 + gated) <= 16384:  # BLOCK_K need not divide K
            yield MatmulConfig(bn, bk, warps)


#: how the decoder step calls each product (DecoderLayer.step): what the fused GEMV computes around it
STEP_FORM = {"wqkv": "norm", "wo": "residual", "w13": "norm, scale, gated", "w2": "residual", "lm_head": "norm"}


def step_arguments(name: str, x: torch.Tensor, n: int) -> dict:
    """fused_linear's keyword arguments for ``name`` as the decoder step uses it (random gains, scales, residual)."""
    form, m, k = STEP_FORM[name], x.shape[0], x.shape[1]
    kwargs: dict = {}
    if "norm" in form:
        kwargs.update(norm=torch.rand(k, device="cuda", dtype=x.dtype) + 0.5, eps=1e-5)
    if "scale" in form:
        kwargs["scale"] = torch.rand(m, k, device="cuda", dtype=x.dtype) + 0.5
    if "gated" in form:
        kwargs["gated"] = True
    if "residual" in form:
        kwargs["residual"] = torch.randn(m, n, device="cuda", dtype=x.dtype)
    return kwargs


def step_reference(x: torch.Tensor, weight: torch.Tensor, kwargs: dict) -> torch.Tensor:
    h = x.float()
    if "norm" in kwargs:
        h = torch.nn.functional.rms_norm(h, (h.shape[-1],), eps=kwargs["eps"]) * kwargs["norm"].float()
    if "scale" in kwargs:
        h = h * kwargs["scale"].float()
    out = h @ weight.float().T
    if kwargs.get("gated"):
        gate, up = out.chunk(2, dim=-1)
        out = F.silu(gate) * up
    return out + kwargs["residual"].float() if "residual" in kwargs else out


def q4_configs(n: int, k: int):
    """One-row tilings of the 4-bit kernel (kernels.fused_q4_linear): long rows per program keep loads in flight."""
    for bn, bk, warps in itertools.product((2, 4, 8, 16), (256, 512, 1024, 2048, 4096), (1, 2, 4)):
        if bn * bk <= 16384 and n % bn == 0 and bk <= 2 * k:
            yield MatmulConfig(bn, bk, warps)


def _sampled(configs, first: MatmulConfig | None, seed: int) -> list[MatmulConfig]:
    """The kernel's current choice first, then the rest in a seeded random order, so that a time budget that
    ends the search early has still sampled the whole space rather than one corner of it."""
    rest = [c for c in configs if c != first]
    random.Random(seed).shuffle(rest)
    return ([first] if first is not None else []) + rest


def _search(label: str, nbytes: int, configs: list[MatmulConfig], run, check, budget_s: float,
            baseline: tuple[str, float] | None = None) -> list[tuple[str, float, float]]:
    """Time ``configs`` (``run(cfg, i)`` one call on weight copy i, ``check(cfg)`` its error) for at most
    ``budget_s`` seconds; print and return the ranking."""
    began = time.perf_counter()
    rows = [(baseline[0], baseline[1], 0.0)] if baseline else []
    tried = 0
    for cfg in configs:
        if time.perf_counter() - began > budget_s:
            break
        tried += 1
        try:
            err = check(cfg)
            t = timed(lambda i, cfg=cfg: run(cfg, i))
        except Exception as exc:  # noqa: BLE001 - a config that does not compile is skipped
            print(f"  {cfg}: {type(exc).__name__} {str(exc)[:160]}")
            continue
        rows.append((str(cfg), t, err))
    rows.sort(key=lambda r: r[1])
    print(f"{label}: {tried}/{len(configs)} configs in {time.perf_counter() - began:.0f} s")
    for name, t, err in rows[:4]:
        print(f"   {t * 1e6:7.1f} us {nbytes / t / 1e9:6.0f} GB/s err {err:.2e} {name}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="which of " + ", ".join(SHAPES))
    parser.add_argument("--fused-rows", default="1", choices=("1", ""),
                        help="1: tune the fused bf16 GEMV (kernels.fused_linear, one row); empty: not")
    parser.add_argument("--q4-rows", default="1", choices=("1", ""),
                        help="1: tune the one-row 4-bit kernel (more rows: bench/tune_q4_rows.py); empty: not")
    parser.add_argument("--seconds-per-case", type=float, default=12, help="search budget per shape and M")
    args = parser.parse_args()
    rows_of = lambda text: [int(m) for m in text.split(",") if m]
    pdl = kernels.programmatic_launch_available(torch.device("cuda"))  # the fused GEMV as the decoder runs it
    results = {"device_name": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        nbytes = 2 * n * k
        if rows_of(args.fused_rows):
            copies = max(2, math.ceil(400e6 / nbytes))
            weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        for m in rows_of(args.fused_rows):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            kwargs = step_arguments(name, x, n // 2 if name == "w13" else n)
            ref = step_reference(x, weights[0], kwargs)
            base = timed(lambda i, x=x, w=weights: F.linear(x, w[i % len(w)]))
            gated = kwargs.get("gated", False)
            n_out = n // 2 if gated else n
            ranked = _search(
                f"fused bf16 {name} ({STEP_FORM[name]}) N={n} K={k} M={m} (cublas alone {base * 1e6:.1f} us, "
                f"{nbytes / base / 1e9:.0f} GB/s)",
                nbytes, _sampled(fused_configs(n_out, k, gated), kernels.gemv_config(n_out, k, gated=gated),
                                 n + m),
                lambda cfg, i, x=x, w=weights, kw=kwargs: kernels.fused_linear(x, w[i % len(w)], config=cfg, pdl=pdl,
                                                                               **kw),
                lambda cfg, x=x, ref=ref, w=weights[0], kw=kwargs: (
                    kernels.fused_linear(x, w, config=cfg, **kw).float() - ref).abs().max().item(),
                args.seconds_per_case, baseline=("cublas", base))
            results["rows"].append({"kind": "fused", "name": name, "form": STEP_FORM[name], "n": n, "k": k, "m": m,
                                    "bytes": nbytes, "cublas_s": base, "ranked": ranked[:8]})
        if rows_of(args.fused_rows):
            del weights
        qbytes = n * k // 2 + 4 * n * k // 32
        copies = max(2, math.ceil(400e6 / qbytes))
        packed = random_q4(n, k, copies)
        w0 = kernels.q4_dequantize(*packed[0], torch.float32)  # exact (tests/test_kernels_q4.py)
        for m in rows_of(args.q4_rows):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ w0.T
            scale = ref.abs().max().item()
            ranked = _search(
                f"q4 {name} N={n} K={k} M={m} ({qbytes / 1e6:.0f} MB)", qbytes,
                _sampled(q4_configs(n, k), kernels.q4_config(n, k), n + m),
                lambda cfg, i, x=x, p=packed: kernels.fused_q4_linear(x, *p[i % len(p)], config=cfg),
                lambda cfg, x=x, ref=ref, p=packed[0], s=scale: (
                    kernels.fused_q4_linear(x, *p, config=cfg).float() - ref).abs().max().item() / s,
                args.seconds_per_case)
            results["rows"].append({"kind": "q4", "name": name, "n": n, "k": k, "m": m, "bytes": qbytes,
                                    "ranked": ranked[:8]})
        del packed, w0
        torch.cuda.empty_cache()
        if args.json:  # after every shape: a timeout keeps what was measured
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    print("best per case:")
    for r in results["rows"]:
        if r["ranked"]:
            name, t, _ = r["ranked"][0]
            print(f"  {r['kind']} {r['name']} M={r['m']}: {t * 1e6:.1f} us {r['bytes'] / t / 1e9:.0f} GB/s {name}")


if __name__ == "__main__":
    main()
