"""Offline study for the next one-row 4-bit kernel: SASS instructions per weight value of a formulation in which
each thread takes whole groups of 32 values as four int32 words and x comes already prepared (float32, gain and
scale applied) in nibble order, so that each shift of the words meets four consecutive x values (one 128-bit load).
Nothing here is used by the package; `bench/sass_count.py` counts the kernels that are.

    python bench/q4_gemv_study.py

Word w of a group holds bytes 4w..4w+3; byte i holds value 4w+i (low nibble) and 16+4w+i (high nibble).  The
prepared x is stored so that, for a group g, position (half, i) is followed by its four words' values:
``x_perm[g*32 + (half*4 + i)*4 + w] = x'[g*32 + 16*half + 4*w + i]``.  Q4_0's offset (-8 scale) is folded into
the float conversion ((n | 0x4B000000) as float - (2^23 + 8)), so no sum of x is needed.  PRMT: the nibble's byte
is moved under the exponent 0x4B by one byte permute (inline PTX) instead of shift, mask and or.
"""

from __future__ import annotations

import collections

import triton
import triton.language as tl
from sass_count import _loop_body, _sass


@triton.jit
def _q4_words_gemv(x_ptr, qw_ptr, qscale_ptr, out_ptr, stride_qn, stride_sn,
                   K: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, PRMT: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.arange(0, GROUPS)
    offs_w = tl.arange(0, 4)
    rows = offs_n.to(tl.int64)[:, None, None]
    q_ptrs = qw_ptr + rows * stride_qn + offs_g[None, :, None] * 4 + offs_w[None, None, :]
    x_base = offs_g[None, :, None] * 32 + offs_w[None, None, :] + rows * 0  # the rows' shape: no exchange
    s_index = offs_n.to(tl.int64)[:, None] * stride_sn + offs_g[None, :]
    acc = tl.zeros([BLOCK_N, GROUPS], tl.float32)
    for g0 in range(0, K // 32, GROUPS):
        words = tl.load(q_ptrs + g0 * 4)
        scale = tl.load(qscale_ptr + s_index + g0).to(tl.float32)
        dot = tl.zeros([BLOCK_N, GROUPS, 4], tl.float32)
        for half in tl.static_range(2):
            nibbles = (words >> (4 * half)) & 0x0F0F0F0F
            for i in tl.static_range(4):
                x = tl.load(x_ptr + x_base + g0 * 32 + (half * 4 + i) * 4)
                if PRMT:
                    n = tl.inline_asm_elementwise("prmt.b32 $0, $1, 0x4B000000, $2;", "=r,r,r",
                                                  [nibbles, tl.full(nibbles.shape, 0x7540 + i, tl.int32)],
                                                  dtype=tl.int32, is_pure=True, pack=1)
                else:
                    n = ((nibbles >> (8 * i)) & 0xFF) | 0x4B000000
                dot += (n.to(tl.float32, bitcast=True) - 8388616.0) * x
        acc += scale * tl.sum(dot, axis=2)
    tl.store(out_ptr + offs_n, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty))


def main() -> None:
    types = {"x_ptr": "*fp32", "qw_ptr": "*i32", "qscale_ptr": "*fp16", "out_ptr": "*bf16", "stride_qn": "i32",
             "stride_sn": "i32"}
    for prmt in (False, True):
        for block_n, groups, warps in ((4, 32, 4), (8, 16, 4)):
            constants = {"K": 4096, "BLOCK_N": block_n, "GROUPS": groups, "PRMT": prmt}
            body = _loop_body(_sass(_q4_words_gemv, types, constants, 90, warps))
            values = block_n * groups * 32 / (32 * warps)
            ops = collections.Counter(op.split(".")[0] for op in body)
            print(f"{'PRMT' if prmt else 'shift/mask'} BLOCK_N={block_n} GROUPS={groups}: {len(body)} per iteration, "
                  f"{len(body) / values:.2f} per weight  " + " ".join(f"{k}:{v}" for k, v in ops.most_common(8)))


if __name__ == "__main__":
    main()
