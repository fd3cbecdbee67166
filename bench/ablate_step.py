"""Where the one-stream decoder step's time goes: the step timed with kinds of its kernels left out (each replaced
by a buffer prepared beforehand, so the rest runs unchanged but computes nonsense).  The difference to the whole
step is what that kind costs on the step's critical path, which kernel durations in a profile do not show (with
programmatic dependent launch a kernel's duration includes its wait for the one before).  A diagnostic for
developers (bench/results/ablate_step_*.txt).

    python bench/ablate_step.py [--quant q4_0] [--compile] [--context 400] [--steps 200] [--json FILE]

``--compile``: the step's glue (embedding, rotary, cache bookkeeping, argmax) compiled, as the engine runs it with
``--compile``; the products and attention are hand-written kernels either way.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from contextlib import ExitStack
from unittest import mock

import torch
from tune_step import full_size_model

from voxtral_realtime import decoder, kernels, layers
from voxtral_realtime.benchmarking import benchmark

#: name -> what it leaves out
KINDS = {
    "rounding": "the kernels rounding a GEMV's input to 8 bits (4-bit models)",
    "attention": "the decode-attention kernel",
    "head": "the LM head's product",
    "layer-products": "the decoder layers' four products",
}
SETS = ["", "rounding", "attention", "head", "rounding attention", "rounding attention head",
        "rounding attention head layer-products"]


@functools.cache
def _buffer(*key) -> torch.Tensor | kernels.QuantizedRow:
    kind, shape, dtype = key[0], key[1], key[2]
    if kind == "row":
        return kernels.rounding.empty_row(shape, dtype, torch.device("cuda"), squares=key[3])
    return torch.zeros(shape, dtype=dtype, device="cuda")


def _patches(kinds: set[str], table: torch.nn.Module) -> list:
    out = []
    if "rounding" in kinds:
        def rounded(x, *, norm=None, scale=None, pdl=False):
            return _buffer("row", x.shape[-1], x.dtype, x.shape[-1] // 128 if norm is not None else 0)
        out.append(mock.patch.object(kernels, "quantize_row", rounded))
    if "attention" in kinds:
        def attended(self, qkv, ctx, layer, *, pdl, quantized=False):
            width = self.n_heads * self.head_dim
            return _buffer("row", width, qkv.dtype, 0) if quantized else _buffer("out", (1, width), qkv.dtype)
        out.append(mock.patch.object(layers.Attention, "attend_projected", attended))
    fused = decoder._fused

    def product(module, x, **kwargs):
        is_head = module is table
        if ("head" in kinds and is_head) or ("layer-products" in kinds and not is_head):
            rows = module.qweight.shape[0] if hasattr(module, "qweight") else module.weight.shape[0]
            rows //= 2 if kwargs.get("gated") else 1
            return _buffer("out", (1, rows), torch.bfloat16)
        return fused(module, x, **kwargs)
    out.append(mock.patch.object(decoder, "_fused", product))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quant", help="quantize the model first (q4_0, q4_k)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--context", type=int, default=400)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--sets", default=",".join(SETS),
                        help="comma-separated sets of kinds (space-separated) to leave out, the first the reference")
    parser.add_argument("--json")
    args = parser.parse_args()
    model = full_size_model(args.quant)
    model.network.decoder.fused_step, model.network.decoder.pdl, model.compile = True, True, args.compile
    table = getattr(model.network.decoder.tok_embeddings, "table", model.network.decoder.tok_embeddings)
    report = {"command": " ".join(["python3", *sys.argv]), "device_name": torch.cuda.get_device_name(),
              "torch": torch.__version__, "quant": args.quant, "compile": args.compile, "rows": []}
    print(report["device_name"], torch.__version__, args.quant or "bf16", flush=True)
    whole = None
    for spec in args.sets.split(","):
        with ExitStack() as stack:
            for patch in _patches(set(spec.split()), table):
                stack.enter_context(patch)
            ms = benchmark.bench_step(model, 1, args.context, steps=args.steps)["gpu_ms_per_step"]
        whole = ms if whole is None else whole
        report["rows"].append({"left_out": spec, "gpu_ms_per_step": ms})
        print(f"without [{spec or 'nothing'}]: {ms:.3f} ms GPU ({whole - ms:+.3f} ms)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
