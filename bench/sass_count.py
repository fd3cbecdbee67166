"""Instructions per weight value in the main loop of the fused GEMV kernels, compiled for a GPU that is not here.

The one-row 4-bit kernel is bound by instruction issue, not memory: at about 10 SASS instructions per weight value
(per thread), a Q4 decoder step issues roughly 1.4 G warp instructions, about 1.4 ms at an H200's 132 SMs x 4
schedulers x 1.98 GHz, while its 2.15 GB of weights take 0.5 ms at 4.2 TB/s.  This script compiles the kernels
with Triton's own ptxas for sm_90 (no GPU, no CUDA driver needed), finds the loop over K in the SASS and counts
its instructions, so a kernel change can be judged here before it is timed on the GPU machine.

    python bench/sass_count.py [--arch 90] [--forms wqkv,wo,w13,w2] [--ops] [--tiling BLOCK_N,BLOCK_K,WARPS [--bf16]]

Arguments are given the 16-byte divisibility Triton specializes for at run time (aligned tensors, strides that
are multiples of 16), so the loads vectorize as they do on the GPU.  Counts are static: the loop body once.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from voxtral_realtime import kernels

#: the decoder step's products: name -> (N, K, gated) and the fused form's flags
FORMS = {
    "wqkv": ((6144, 3072, False), {"NORM": True, "HAS_SCALE": False, "RESIDUAL": False}),
    "wo": ((3072, 4096, False), {"NORM": False, "HAS_SCALE": False, "RESIDUAL": True}),
    "w13": ((9216, 3072, True), {"NORM": True, "HAS_SCALE": True, "RESIDUAL": False}),
    "w2": ((3072, 9216, False), {"NORM": False, "HAS_SCALE": False, "RESIDUAL": True}),
}

_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def _sass(fn, types: dict[str, str], constants: dict, arch: int, num_warps: int) -> tuple[str, int, int]:
    """The kernel's SASS, registers per thread and spilled bytes."""
    signature = {name: types.get(name, "constexpr") for name in fn.arg_names}
    names = list(signature)
    aligned = {(names.index(n),): [["tt.divisibility", 16]] for n, t in types.items()
               if t.startswith("*") or n.startswith("stride") or n == "gate_rows"}
    source = ASTSource(fn=fn, signature=signature, attrs=aligned,
                       constexprs={(names.index(n),): v for n, v in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": 1})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
        sass = subprocess.run([str(nvdisasm), "-c", cubin.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([str(nvdisasm.with_name("cuobjdump")), "--dump-resource-usage", cubin.name],
                               capture_output=True, text=True, check=True).stdout
    registers = re.search(r"REG:(\d+)", usage)
    spills = re.search(r"STACK:(\d+)", usage)
    return sass, int(registers.group(1)) if registers else -1, int(spills.group(1)) if spills else -1


def _loop_body(sass: str) -> list[str] | None:
    """The longest run from a label to a backward branch to it (the loop over K), or None without a loop."""
    lines = sass.splitlines()
    spans = []
    for start, line in enumerate(lines):
        if re.match(r"\.L_x_\d+:", line):
            label = line.rstrip(":")
            ends = [i for i in range(start, len(lines)) if f"BRA `({label})" in lines[i]]
            if ends:
                spans.append((ends[-1] - start, start, ends[-1]))
    if not spans or max(spans)[0] < 16:
        return None
    _, start, end = max(spans)
    return [m.group(1) for line in lines[start:end + 1] if (m := _INSTRUCTION.search(line))]


def count(form: str, four_bit: bool, arch: int, tiling: kernels.MatmulConfig | None = None) -> dict:
    (n, k, gated), flags = FORMS[form]
    flags = {**flags, "GATED": gated}
    if four_bit:
        config = kernels.q4_config(n, k, gated=gated)
        config = tiling or config
        fn, types = kernels.q4._fused_q4_gemv_kernel, {
            "xq_ptr": "*i32", "xstep_ptr": "*fp32", "xsum_ptr": "*fp32", "xresidual_ptr": "*fp32", "squares_ptr": "*fp32", "qw_ptr": "*i32",
            "qscale_ptr": "*fp16", "qoffset_ptr": "*fp16", "out_ptr": "*bf16", "res_ptr": "*bf16",
            "stride_qn": "i32", "stride_sn": "i32", "gate_rows": "i32", "eps": "fp32"}
        constants = {"K": k, "BLOCK_N": config.block_n, "GROUPS": config.block_k // 32, "SQUARES": k // 128,
                     "SQUARES_PAD": 128, "PDL": False, "ASM": True, "NORM": flags["NORM"], "GATED": gated,
                     "RESIDUAL": flags["RESIDUAL"], "SYMMETRIC": True}
    else:
        config = tiling or kernels.gemv_config(n, k, gated=gated)
        fn, types = kernels.gemv._fused_gemv_kernel, {
            "x_ptr": "*i32", "w_ptr": "*i32", "out_ptr": "*bf16", "gain_ptr": "*i32", "scale_ptr": "*i32",
            "res_ptr": "*bf16", "stride_wn": "i32", "gate_rows": "i32", "eps": "fp32"}
        constants = dict(K=k, BLOCK_N=config.block_n, BLOCK_K=config.block_k, PAIRS=True, PDL=False, **flags)
    sass, registers, spills = _sass(fn, types, constants, arch, config.num_warps)
    body = _loop_body(sass)
    values = config.block_n * config.block_k * (2 if gated else 1) / (32 * config.num_warps)
    unrolled = body is None
    if unrolled:  # no loop left: the whole kernel, for the whole row length
        body = [m.group(1) for line in sass.splitlines() if (m := _INSTRUCTION.search(line))]
        values *= k / config.block_k
    ops = collections.Counter(op.split(".")[0] for op in body)
    return {"form": form, "kernel": "4-bit" if four_bit else "bf16", "config": str(config), "unrolled": unrolled,
            "registers": registers, "spills": spills,
            "instructions": len(body), "weight_values_per_thread": values, "per_value": len(body) / values,
            "ops": dict(ops.most_common())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--forms", default=",".join(FORMS))
    parser.add_argument("--ops", action="store_true", help="also the instruction mix")
    parser.add_argument("--tiling", help="BLOCK_N,BLOCK_K,WARPS instead of the kernels' own (4-bit unless --bf16)")
    parser.add_argument("--bf16", action="store_true", help="--tiling is for the bf16 kernel")
    args = parser.parse_args()
    if kernels.common.triton is None:
        sys.exit("needs Triton")
    tiling = kernels.MatmulConfig(*map(int, args.tiling.split(",")[:2]), num_warps=int(args.tiling.split(",")[2])) \
        if args.tiling else None
    for four_bit in ((not args.bf16,) if tiling else (True, False)):
        for form in args.forms.split(","):
            row = count(form, four_bit, args.arch, tiling)
            where = "in the whole (unrolled) kernel" if row["unrolled"] else "per loop iteration"
            print(f"{row['kernel']:5s} {form:5s} {row['instructions']:4d} instructions {where}, "
                  f"{row['weight_values_per_thread']:5.1f} weights per thread: {row['per_value']:5.2f} per weight, "
                  f"{row['registers']} registers, {row['spills']} B stack  {row['config']}")
            if args.ops:
                print("      ", " ".join(f"{op}:{n}" for op, n in row["ops"].items()))


if __name__ == "__main__":
    main()
