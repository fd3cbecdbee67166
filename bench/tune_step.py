"""The decoder step of the full-size model (random bf16 weights), batch 1 and 4: the plain layers compiled by
inductor against the fused step (``DecoderLayer.step``) with and without programmatic dependent launch; the
fused step's logits against the plain ones; the kernels of one fused step.  A diagnostic for developers
(bench/results/tune_step_*.txt).  ``--quant q4_0``: the same for the 4-bit model (the fused step then takes one
row only).

    python bench/tune_step.py [--context 400] [--steps 200] [--quant q4_0]
    python bench/tune_step.py --quant q4_0 --tilings "wqkv=4,4096,1 w13=2,4096,1;wqkv=8,1024,1" --variants ""

``--tilings`` (also ``--q4-tilings``): one-row tilings of the fused GEMVs (``name=BLOCK_N,BLOCK_K,WARPS`` for wqkv,
wo, w13, w2, head; sets separated by ``;``), bf16's (kernels.gemv) or with ``--quant`` the 4-bit kernel's
(kernels.q4), which this script puts ahead of the kernel module's tiling rule (the package itself has no table);
each set is timed in the fused step with PDL (uncompiled glue, so that no
compiled graph keeps an old tiling), the default tilings first.  A name not in a set keeps its default.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from voxtral_realtime import kernels
from voxtral_realtime.benchmarking import benchmark
from voxtral_realtime.benchmarking.random_weights import random_model
from voxtral_realtime.engine import Engine
from voxtral_realtime.quantization import quantize_network

#: the decoder step's products: name -> (N, K, gated), the keys of the one-row tiling tables
PRODUCTS = {"wqkv": (6144, 3072, False), "wo": (3072, 4096, False), "w13": (9216, 3072, True),
               "w2": (3072, 9216, False), "head": (131072, 3072, False)}
#: name -> (decoder.fused_step, decoder.pdl, model.compile)
VARIANTS = {
    "plain-compiled": (False, False, True),
    "fused": (True, False, False),
    "fused+PDL": (True, True, False),
    "fused+PDL-compiled-glue": (True, True, True),
}


def full_size_model(quant: str | None):
    """The full-size model with random bf16 weights on the GPU, quantized in place to ``quant`` when given."""
    model = random_model(device="cuda", dtype=torch.bfloat16)
    if quant:
        quantize_network(model.network, quant)
        benchmark.release(model.device)
    return model


def _configure(model, variant: str) -> None:
    """(A fused variant runs its fused step for batch 1 only: more rows take the plain layers.)"""
    fused, pdl, compiled = VARIANTS[variant]
    model.network.decoder.fused_step, model.network.decoder.pdl, model.compile = fused, pdl, compiled


def _logits(model, context: int, steps: int) -> torch.Tensor:
    """Logits of ``steps`` one-token steps after ``context`` random positions, through the decoder's forward."""
    network = model.network
    decoder, dim = network.decoder, network.config.decoder.dim
    generator = torch.Generator(device="cuda").manual_seed(0)
    cache = decoder.new_cache(1, max_chunk=64, device=model.device, dtype=network.dtype, preallocate=True)
    scales = decoder.ffn_scales(6)
    out, position = [], 0
    with torch.no_grad():
        while position < context + steps:
            length = min(64, context - position) if position < context else 1
            positions = torch.arange(position, position + length, device="cuda")[None]
            tokens = torch.randint(0, 1000, (1, length), device="cuda", generator=generator)
            audio = torch.randn(1, length, dim, device="cuda", generator=generator).to(network.dtype)
            logits = decoder(tokens, audio, positions, cache, scales)
            if position >= context:
                out.append(logits.float())
            position += length
    return torch.cat(out)


def _profile(model, context: int) -> str:
    engine = Engine(model.network, max_streams=1, compile=model.compile)
    slot = engine.attach(benchmark._Sink())
    slot.prompt, slot.position = [], context
    engine.decoder_cache.reserve(context + 100)
    engine._step_inputs[1, 0] = context
    engine._step_inputs[2, 0] = 1
    with torch.no_grad():
        for _ in range(3):
            engine._decode_fn(1)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine._decode_fn(1)
            torch.cuda.synchronize()
    events = prof.key_averages()
    count = sum(e.count for e in events if e.device_type.name == "CUDA")
    return f"{count} kernels in one step (eager launches)\n" + events.table(
        sort_by="cuda_time_total", row_limit=14, max_name_column_width=60)


def _override_tilings(module, rule_name: str) -> dict:
    """An empty table of one-row tilings, (N, K, gated) -> MatmulConfig, that ``module``'s launchers now consult
    before their rule ``rule_name``: the package's launchers take a tiling as an argument or follow the rule."""
    table: dict = {}
    rule = getattr(module, rule_name)

    def with_table(n: int, k: int, *, gated: bool = False):
        return table.get((n, k, gated)) or rule(n, k, gated=gated)

    setattr(module, rule_name, with_table)
    return table


def _set_tilings(table: dict, defaults: dict, spec: str) -> None:
    table.clear()
    table.update(defaults)
    for item in spec.split():
        name, numbers = item.split("=")
        block_n, block_k, warps = map(int, numbers.split(","))
        table[PRODUCTS[name]] = kernels.MatmulConfig(block_n, block_k, num_warps=warps)


def _sweep_tilings(model, table: dict, sets: str, context: int, steps: int, floor_ms: float) -> list[dict]:
    """Times each set; leaves the fastest set in place (for the profile)."""
    defaults, rows = dict(table), []
    for spec in ["", *sets.split(";")]:
        _set_tilings(table, defaults, spec)
        _configure(model, "fused+PDL")
        try:
            result = benchmark.bench_step(model, 1, context, steps=steps)
        except Exception as exc:  # noqa: BLE001 - a tiling that does not compile is reported, the others still run
            print(f"tilings [{spec or 'default'}]: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            continue
        rows.append({"tilings": spec or "default", **result})
        print(f"tilings [{spec or 'default'}]: {result['gpu_ms_per_step']:.3f} ms GPU "
              f"= {result['gpu_ms_per_step'] / floor_ms:.2f}x floor", flush=True)
    best = min(rows, key=lambda row: row["gpu_ms_per_step"])["tilings"]
    _set_tilings(table, defaults, "" if best == "default" else best)
    print(f"profiled below: [{best}]", flush=True)
    return rows


def _sweep_attention_programs(model, values: str, context: int, steps: int, floor_ms: float) -> list[dict]:
    """Times the fused step for each split target of the decode-attention kernel; leaves the fastest in place."""
    rows = []
    for programs in (int(v) for v in values.split(",")):
        kernels.attention.SPLIT_TARGET_PROGRAMS = programs
        _configure(model, "fused+PDL")
        result = benchmark.bench_step(model, 1, context, steps=steps)
        rows.append({"split_target_programs": programs, **result})
        print(f"attention split target {programs}: {result['gpu_ms_per_step']:.3f} ms GPU "
              f"= {result['gpu_ms_per_step'] / floor_ms:.2f}x floor", flush=True)
    kernels.attention.SPLIT_TARGET_PROGRAMS = min(rows, key=lambda row: row["gpu_ms_per_step"])["split_target_programs"]
    print(f"profiled below: split target {kernels.attention.SPLIT_TARGET_PROGRAMS}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--context", type=int, default=400)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batches", default="1")
    parser.add_argument("--quant", help="quantize the model first (q4_0, q4_k): the 4-bit step, plain vs fused")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="which of: " + ", ".join(VARIANTS))
    parser.add_argument("--tilings", "--q4-tilings", help="sets of one-row tilings to time in the step (see above)")
    parser.add_argument("--attention-programs", help="values of kernels.attention.SPLIT_TARGET_PROGRAMS to time the fused "
                        "step with (after the tilings, the fastest set in place); the fastest is profiled")
    parser.add_argument("--no-check", action="store_true",
                        help="skip comparing the fused step's logits with the plain layers' (a compile of ~1 min)")
    parser.add_argument("--json")
    args = parser.parse_args()
    model = full_size_model(args.quant)
    floor_ms = 1000 * benchmark.decode_weight_bytes(model) / (benchmark.copy_bandwidth(model.device) * 1e9)
    report = {"command": " ".join(["python3", *sys.argv]), "device_name": torch.cuda.get_device_name(),
              "torch": torch.__version__, "quant": args.quant, "floor_ms": floor_ms, "rows": []}
    print(report["device_name"], torch.__version__, f"floor {floor_ms:.3f} ms", flush=True)

    if not args.no_check:
        _configure(model, "plain-compiled")
        reference = _logits(model, args.context, 24)
        _configure(model, "fused+PDL")
        fused = _logits(model, args.context, 24)
        rel = ((fused - reference).norm(dim=-1) / reference.norm(dim=-1))
        report["fused_vs_plain"] = {"rel_err_max": rel.max().item(), "rel_err_median": rel.median().item(),
                                    "top1_agreement": (fused.argmax(-1) == reference.argmax(-1)).float().mean().item()}
        print("fused vs plain logits (teacher-forced, same inputs):", report["fused_vs_plain"], flush=True)

    for variant in filter(None, args.variants.split(",")):
        _configure(model, variant)
        for batch in (int(b) for b in args.batches.split(",")):
            began = time.perf_counter()
            try:
                result = benchmark.bench_step(model, batch, args.context, steps=args.steps)
            except Exception as exc:  # noqa: BLE001 - a failing variant is reported, the others still run
                print(f"{variant:28s} B={batch}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                continue
            result["variant"] = variant
            report["rows"].append(result)
            print(f"{variant:28s} B={batch}: {result['ms_per_step']:.3f} ms wall, {result['gpu_ms_per_step']:.3f} ms "
                  f"GPU = {result['gpu_ms_per_step'] / floor_ms:.2f}x floor ({time.perf_counter() - began:.0f} s)",
                  flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
    if args.tilings:
        table = _override_tilings(kernels.q4, "q4_config") if args.quant else \
            _override_tilings(kernels.gemv, "gemv_config")
        report["tilings"] = _sweep_tilings(model, table, args.tilings, args.context, args.steps, floor_ms)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
    if args.attention_programs:
        report["attention_programs"] = _sweep_attention_programs(model, args.attention_programs, args.context,
                                                                 args.steps, floor_ms)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
    _configure(model, "fused+PDL")
    print(f"--- fused+PDL:\n{_profile(model, args.context)}", flush=True)


if __name__ == "__main__":
    main()
