"""GPU kernels (Triton).  Each one has a plain PyTorch equivalent that other devices run and the tests compare with.

:func:`decode_attention`: one new query per stream against that stream's KV ring.  SDPA would read every column
of the ring (the whole preallocated window) and needs a mask tensor built per step; this kernel reads, per
stream, only the columns its position can have filled (``min(position + 1, capacity)``), checks the sliding
window against the cache's position table itself, and serves all query heads of a kv head (GQA) from one read
of the keys.  Cost follows each stream's own context length, not the buffer size.  With few streams (few
programs for 132 SMs) each stream's columns are split between several programs whose partial softmax sums the
last of them to finish combines ("flash decoding", in one kernel).

:func:`decode_attention_from_qkv` is the same kernel taking the fused QKV projection's output: it applies the
rotary embedding and writes the new key and value into the cache itself.

:func:`fused_linear` / :func:`fused_q4_linear`: the one-stream decoder step's matrix products (one row of x;
bf16/f16/f32 or 4-bit weights) with the elementwise work around them folded in: RMSNorm (its 1/rms applied to the
sums), SwiGLU (gate and up rows in one program) and the residual add.  With programmatic dependent launch a kernel
starts, and loads its first weights, while the one before it drains.  ``DecoderLayer.step`` runs on these.

:func:`quantized_matmul`: a matrix product with 4-bit weights (GGUF Q4_0 / Q4_K values in the layout of
:class:`.quantization.QuantizedLinear`): for one row by integer dot products on the packed weights
(:func:`fused_q4_linear`, never dequantized in memory); for more rows (batched streams, prefill, encoder chunks)
the weight is dequantized by one kernel for cuBLAS (:func:`q4_dequantize`), in slices of bounded size.

Under ``TRITON_INTERPRET=1`` the kernels also run on CPU tensors (slowly): the CPU test suite checks them so.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds come without Triton
    triton = None


def decode_attention_available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def programmatic_launch_available(device: torch.device) -> bool:
    """Programmatic dependent launch (Hopper and newer, compiled Triton): a kernel may start while the one before
    it drains, and waits for that one's results only where it reads them."""
    return device.type == "cuda" and _programmatic_launch(torch.cuda.current_device() if device.index is None
                                                          else device.index)


@functools.cache
def _programmatic_launch(index: int) -> bool:
    return (triton is not None and not _interpreted() and hasattr(tl.extra.cuda, "gdc_wait")
            and torch.cuda.get_device_capability(index)[0] >= 9)


def _launch_options(pdl: bool) -> dict:
    """Triton launch keywords: programmatic dependent launch when asked (the kernel then calls gdc_wait)."""
    return {"launch_pdl": True} if pdl else {}


if triton is not None:

    @triton.jit
    def _rotated(ptr, offs_rows, stride_row, offs_d, row_mask, cos, signed_sin, D: tl.constexpr):
        """Rows of head vectors at ``ptr`` with the half-split rotary embedding applied, in float32:
        x * cos + roll(x, D/2) * signed_sin (see layers.apply_rotary)."""
        rows = ptr + offs_rows[:, None] * stride_row
        x = tl.load(rows + offs_d[None, :], mask=row_mask[:, None], other=0.0).to(tl.float32)
        rolled = tl.load(rows + ((offs_d + D // 2) % D)[None, :], mask=row_mask[:, None], other=0.0)
        return x * cos[None, :] + rolled.to(tl.float32) * signed_sin[None, :]

    @triton.jit
    def _cache_tile(table_row, k_base, v_base, offs_n, hi, offs_d, stride_kc, stride_vc):
        """Columns ``offs_n`` (those below ``hi``) of a cache row: (positions held, keys, values)."""
        in_range = offs_n < hi
        held = tl.load(table_row + offs_n, mask=in_range, other=-1)
        k = tl.load(k_base + offs_n[:, None] * stride_kc + offs_d[None, :], mask=in_range[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vc + offs_d[None, :], mask=in_range[:, None], other=0.0)
        return held, k, v

    @triton.jit
    def _decode_attention_kernel(
        q_ptr, k_ptr, v_ptr, table_ptr, qpos_ptr, out_ptr, part_ptr, stats_ptr, count_ptr, cos_ptr, sin_ptr,
        xq_ptr, xstep_ptr, xsum_ptr, xresidual_ptr,
        row_start, capacity, window, scale,
        stride_qb, stride_qh, stride_qg,
        stride_kr, stride_kh, stride_kc,
        stride_vr, stride_vh, stride_vc,
        stride_tr, stride_cb,
        stride_ob, stride_oh, stride_og,
        H_KV: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
        BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, IEEE: tl.constexpr, FROM_QKV: tl.constexpr,
        QUANTIZE: tl.constexpr, PDL: tl.constexpr,
    ):
        """FROM_QKV: ``q_ptr`` is the fused projection's output row [q heads | k heads | v heads] of each stream,
        not yet rotated; the kernel rotates q and the new key, stores the new key and value in the cache
        (column qpos % capacity) and attends to them from registers, so that no other kernel runs between the
        projection and the attention.  The column being written is left out of the cache reads.

        SPLITS > 1: each program stores its partial softmax sums; the one that finishes last for its (row, kv
        head), told by an atomic count, combines them (no second kernel) and resets the count for the next call.
        QUANTIZE: the output is also rounded to 8 bits per group of 32 values for the 4-bit ``wo`` GEMV
        (:class:`QuantizedRow`, the arithmetic of ``_quantize_activation_kernel``), which so needs no kernel
        of its own.

        PDL: only q (the previous kernel's output) is waited for.  The query positions, the position table and
        the rotary rows come from the step's first kernels, which completed before the first kernel of the PDL
        chain started, and the cached keys and values from earlier steps: this program's first cache tile is
        requested before the wait, so that its latency overlaps the projection still running."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // H_KV
        h = pid % H_KV
        row = (row_start + b).to(tl.int64)  # many rows x a long ring: element offsets exceed 2**31
        qpos = tl.load(qpos_ptr + b)
        limit = tl.minimum(qpos + 1, capacity)  # a disabled row has qpos -1: nothing to read
        per_split = tl.cdiv(tl.cdiv(limit, SPLITS), BLOCK_N) * BLOCK_N
        lo = split * per_split
        hi = tl.minimum(lo + per_split, limit)
        offs_g = tl.arange(0, GROUP_PAD)
        offs_d = tl.arange(0, D)
        g_mask = offs_g < GROUP
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, D], tl.float32)
        k_base = k_ptr + row * stride_kr + h * stride_kh
        v_base = v_ptr + row * stride_vr + h * stride_vh
        table_row = table_ptr + row * stride_tr
        new_column = tl.where(qpos >= 0, qpos % capacity, -1)
        # the first tile of the cache is requested before q (FROM_QKV: before the projection's row is read and
        # rotated), so that the two reads overlap; the column being written is masked out of the scores
        offs_tile = tl.arange(0, BLOCK_N)
        held, k, v = _cache_tile(table_row, k_base, v_base, lo + offs_tile, hi, offs_d, stride_kc, stride_vc)
        if FROM_QKV:
            cos = tl.load(cos_ptr + b * stride_cb + offs_d).to(tl.float32)
            signed_sin = tl.load(sin_ptr + b * stride_cb + offs_d).to(tl.float32)
        if PDL:
            tl.extra.cuda.gdc_wait()
        if FROM_QKV:
            row_ptr = q_ptr + b * stride_qb
            q = _rotated(row_ptr + h * stride_qh, offs_g, stride_qg, offs_d, g_mask, cos, signed_sin, D)
            q = q.to(k_ptr.dtype.element_ty)
            one = tl.arange(0, 1)
            k_new = _rotated(row_ptr + (H_KV * GROUP + h) * D, one, 0, offs_d, one == 0, cos, signed_sin, D)
            k_new = k_new.to(k_ptr.dtype.element_ty)
            v_new = tl.load(row_ptr + (H_KV * GROUP + H_KV + h) * D + offs_d[None, :])
            if (split == 0) & (qpos >= 0):  # the new key: stored once, counted once (in split 0's sums)
                tl.store(k_base + new_column * stride_kc + offs_d[None, :], k_new)
                tl.store(v_base + new_column * stride_vc + offs_d[None, :], v_new)
                m_i = tl.sum(q.to(tl.float32) * k_new.to(tl.float32), 1) * scale
                l_i = tl.full([GROUP_PAD], 1.0, tl.float32)
                acc = tl.zeros([GROUP_PAD, D], tl.float32) + v_new.to(tl.float32)
        else:
            q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_g[:, None] * stride_qg + offs_d[None, :],
                        mask=g_mask[:, None], other=0.0)
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + offs_tile
            in_range = offs_n < hi
            if start != lo:
                held, k, v = _cache_tile(table_row, k_base, v_base, offs_n, hi, offs_d, stride_kc, stride_vc)
            visible = in_range & (held >= 0) & (held <= qpos) & (held > qpos - window)
            if FROM_QKV:
                visible = visible & (offs_n != new_column)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(visible[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        if SPLITS == 1:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            _store_output(out, out_ptr + b * stride_ob + h * stride_oh, stride_og, (b * H_KV + h) * GROUP * D,
                          xq_ptr, xstep_ptr, xsum_ptr, xresidual_ptr, GROUP, GROUP_PAD, D, QUANTIZE)
        else:  # partial sums, [programs, SPLITS, GROUP_PAD, D] and (max, sum) [programs, SPLITS, 2, GROUP_PAD]
            slot = pid * SPLITS + split  # the padding rows of q (tl.dot's minimum of 16) are neither kept nor read
            tl.store(part_ptr + slot * GROUP_PAD * D + offs_g[:, None] * D + offs_d[None, :], acc,
                     mask=g_mask[:, None])
            tl.store(stats_ptr + slot * 2 * GROUP_PAD + offs_g, m_i, mask=g_mask)
            tl.store(stats_ptr + slot * 2 * GROUP_PAD + GROUP_PAD + offs_g, l_i, mask=g_mask)
            # every thread's stores before the count (whose release publishes them to the last program)
            tl.debug_barrier()
            if tl.atomic_add(count_ptr + pid, 1, sem="acq_rel") == SPLITS - 1:
                out = _combine_splits(part_ptr, stats_ptr, pid, GROUP, GROUP_PAD, D, SPLITS)
                _store_output(out, out_ptr + b * stride_ob + h * stride_oh, stride_og, (b * H_KV + h) * GROUP * D,
                              xq_ptr, xstep_ptr, xsum_ptr, xresidual_ptr, GROUP, GROUP_PAD, D, QUANTIZE)
                tl.store(count_ptr + pid, 0)

    @triton.jit
    def _float_values(t, PAIRS: tl.constexpr):
        """A loaded tile in float32: PAIRS, int32 words of two bfloat16 values each -> (even, odd) values, one
        integer instruction each (a bfloat16 is the high half of a float32; the compiler's own conversion took
        two); else (t, t) converted."""
        if PAIRS:
            return (t << 16).to(tl.float32, bitcast=True), (t & -65536).to(tl.float32, bitcast=True)
        return t.to(tl.float32), t.to(tl.float32)

    @triton.jit
    def _fused_gemv_kernel(
        x_ptr, w_ptr, out_ptr, gain_ptr, scale_ptr, res_ptr, stride_wn, gate_rows, eps,
        K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        NORM: tl.constexpr, HAS_SCALE: tl.constexpr, GATED: tl.constexpr, RESIDUAL: tl.constexpr,
        PAIRS: tl.constexpr, PDL: tl.constexpr,
    ):
        """out[n] = (res[n] +) sum_k input(x)[k] * w[n, k] for one row x, FMAs reduced once at the end.

        NORM: RMSNorm's 1/rms is a per-row factor, so it is applied to the sums at the end, with the squares of x
        summed in the same pass (no pass over the row before the products).  GATED: each program also takes
        weight rows n + gate_rows (SwiGLU's "up" half of a fused gate/up matrix) and writes silu(gate) * up.
        PAIRS: x, w, gain and scale are bfloat16 read as int32 words (pointers, strides and gate_rows in words).
        A weight does not depend on the kernel before this one, so the first weight tiles are loaded before
        waiting for that kernel (PDL: programmatic dependent launch lets this kernel start while the previous one
        drains); each further tile is loaded one iteration ahead.  BLOCK_K (values) need not divide K (the tail
        is masked).  The tiles are two-dimensional on purpose: a [rows of x, BLOCK_N, BLOCK_K] product made
        Triton move every weight tile through shared memory (bench/sass_count.py)."""
        PER: tl.constexpr = 2 if PAIRS else 1  # values per loaded element
        COLS: tl.constexpr = BLOCK_K // PER
        KC: tl.constexpr = K // PER
        EVEN_K: tl.constexpr = KC % COLS == 0
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs = tl.arange(0, COLS)
        w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs[None, :]
        up_ptrs = w_ptrs + gate_rows * stride_wn
        w = tl.load(w_ptrs) if EVEN_K else tl.load(w_ptrs, mask=(offs < KC)[None, :], other=0)
        w_up = w
        if GATED:
            w_up = tl.load(up_ptrs) if EVEN_K else tl.load(up_ptrs, mask=(offs < KC)[None, :], other=0)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        residual = _residual_row(res_ptr, offs_n, BLOCK_N, RESIDUAL)
        acc = tl.zeros([BLOCK_N, COLS], tl.float32)
        acc_up = tl.zeros([BLOCK_N, COLS], tl.float32)
        squares = tl.zeros([COLS], tl.float32)
        for k0 in range(0, KC, COLS):
            offs_k = k0 + offs
            inside = offs_k < KC
            if EVEN_K:
                more = k0 + COLS < KC
                x = tl.load(x_ptr + offs_k)
            else:
                more = (offs_k + COLS < KC)[None, :]
                x = tl.load(x_ptr + offs_k, mask=inside, other=0)
            w_next = tl.load(w_ptrs + k0 + COLS, mask=more, other=0)
            if GATED:
                up_next = tl.load(up_ptrs + k0 + COLS, mask=more, other=0)
            x_a, x_b = _float_values(x, PAIRS)
            if NORM:
                squares += x_a * x_a
                if PAIRS:
                    squares += x_b * x_b
                gain = tl.load(gain_ptr + offs_k) if EVEN_K else tl.load(gain_ptr + offs_k, mask=inside, other=0)
                gain_a, gain_b = _float_values(gain, PAIRS)
                x_a, x_b = x_a * gain_a, x_b * gain_b
                if HAS_SCALE:
                    scale = tl.load(scale_ptr + offs_k) if EVEN_K else \
                        tl.load(scale_ptr + offs_k, mask=inside, other=0)
                    scale_a, scale_b = _float_values(scale, PAIRS)
                    x_a, x_b = x_a * scale_a, x_b * scale_b
            w_a, w_b = _float_values(w, PAIRS)
            acc += x_a[None, :] * w_a
            if PAIRS:
                acc += x_b[None, :] * w_b
            w = w_next
            if GATED:
                up_a, up_b = _float_values(w_up, PAIRS)
                acc_up += x_a[None, :] * up_a
                if PAIRS:
                    acc_up += x_b[None, :] * up_b
                w_up = up_next
        _gemv_finish(tl.sum(acc, axis=1)[None, :], tl.sum(acc_up, axis=1)[None, :],
                     tl.zeros([1], tl.float32) + tl.sum(squares, axis=0), residual, out_ptr, offs_n, eps, K, NORM,
                     GATED, RESIDUAL)

    @triton.jit
    def _gemv_finish(out, up, squares, residual, out_ptr, offs_n, eps, K: tl.constexpr, NORM: tl.constexpr,
                     GATED: tl.constexpr, RESIDUAL: tl.constexpr):
        """The one-row fused GEMVs' epilogue: sums ``out`` (and ``up``) [1, BLOCK_N] in float32, ``squares`` [1]
        the sum of x^2 -> times 1/rms (NORM), silu(gate) * up (GATED), + ``residual`` [1, BLOCK_N] (float32),
        stored in out's dtype."""
        if NORM:
            inv_rms = 1.0 / tl.sqrt(squares / K + eps)
            out = out * inv_rms[:, None]
            up = up * inv_rms[:, None]
        dtype = out_ptr.dtype.element_ty
        # rounded to the output's dtype where the reference's separate kernels round (their arithmetic is float32
        # rounded once per operation, also for bfloat16, which Triton's interpreter cannot do arithmetic in)
        out = out.to(dtype).to(tl.float32)
        if GATED:
            out = ((out * tl.sigmoid(out)).to(dtype).to(tl.float32) * up.to(dtype).to(tl.float32)).to(dtype)
            out = out.to(tl.float32)
        if RESIDUAL:
            out += residual
        tl.store(out_ptr + offs_n[None, :], out.to(dtype))

    @triton.jit
    def _residual_row(res_ptr, offs_n, BLOCK_N: tl.constexpr, RESIDUAL: tl.constexpr):
        """The residual's values for this program's outputs, in float32 (zeros without one).  Read right after the
        wait for the previous kernel (the residual was made before that one), so that the read overlaps the
        products instead of adding a trip to memory to the epilogue."""
        if RESIDUAL:
            return tl.load(res_ptr + offs_n[None, :]).to(tl.float32)
        return tl.zeros([1, BLOCK_N], tl.float32)

    @triton.jit
    def _nibble_value(nibble):
        """int32 in [0, 16) -> float32 without the quarter-rate int-to-float instruction: the nibble as the low
        mantissa bits of 2^23, minus 2^23 (exact)."""
        return (nibble | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _quantize_activation_kernel(x_ptr, gain_ptr, scale_ptr, q_ptr, step_ptr, sums_ptr, residual_ptr, squares_ptr,
                                    GROUPS: tl.constexpr, NORM: tl.constexpr, HAS_SCALE: tl.constexpr,
                                    PDL: tl.constexpr):
        """One row x [K] -> x' = x (* gain (* scale)), then per group of 32 values: ``step`` = max|x'| / 127,
        ``q`` = round(x' / step) as int8, ``sums`` = sum(x'), ``residual`` = 8 sum(x' - q step) (what rounding
        lost, times the mean of a 4-bit value: the GEMV's sums so only carry rounding errors times the nibbles'
        deviation from their mean); with NORM, this program's sum of x^2 into ``squares[program]``.  The norm's
        1/rms is left to the GEMV: a factor on the whole row changes the steps, never q, so it is applied to the
        GEMV's sums instead."""
        pid = tl.program_id(0)
        group = pid * GROUPS + tl.arange(0, GROUPS)
        index = group[:, None] * 32 + tl.arange(0, 32)[None, :]
        if NORM:
            gain = tl.load(gain_ptr + index).to(tl.float32)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        x = tl.load(x_ptr + index).to(tl.float32)
        if NORM:
            tl.store(squares_ptr + pid, tl.sum(tl.sum(x * x, axis=1), axis=0))
            x = x * gain
            if HAS_SCALE:
                x = x * tl.load(scale_ptr + index).to(tl.float32)
        q, step, total, residual = _round_groups(x)
        tl.store(q_ptr + index, q)
        tl.store(step_ptr + group, step)
        tl.store(sums_ptr + group, total)
        tl.store(residual_ptr + group, residual)

    @triton.jit
    def _round_groups(x):
        """float32 values in groups of 32 along the last axis -> (int8 values, step, sum, residual) per group:
        step = max|x| / 127, q = floor(x / step + 0.5), residual = 8 sum(x - q step) (all-zero groups: q 0)."""
        biggest = tl.max(tl.abs(x), axis=-1)
        inverse = tl.where(biggest > 0, 127.0 / tl.where(biggest > 0, biggest, 1.0), 0.0)
        q = tl.floor(x * tl.expand_dims(inverse, -1) + 0.5)
        step = biggest / 127.0
        residual = 8.0 * tl.sum(x - q * tl.expand_dims(step, -1), axis=-1)
        return q.to(tl.int32).to(tl.int8), step, tl.sum(x, axis=-1), residual

    @triton.jit
    def _dot_nibbles(words, x_low, x_high, ASM: tl.constexpr):
        """Per int32 word of 4-bit weights: its 4 low nibbles times the 4 signed bytes of ``x_low`` plus its 4
        high nibbles times those of ``x_high`` (byte i with byte i), as int32: two ``dp4a`` instructions on the
        GPU, shifts and masks in the interpreter."""
        if ASM:
            return tl.inline_asm_elementwise(
                "{ .reg .b32 lo, hi, t; and.b32 lo, $1, 0x0F0F0F0F; shr.u32 hi, $1, 4; and.b32 hi, hi, 0x0F0F0F0F;"
                " dp4a.u32.s32 t, lo, $2, 0; dp4a.u32.s32 $0, hi, $3, t; }",
                "=r,r,r,r", [words, x_low, x_high], dtype=tl.int32, is_pure=True, pack=1)
        total = tl.zeros_like(words)
        for i in tl.static_range(4):
            total += ((words >> (8 * i)) & 15) * ((x_low << (24 - 8 * i)) >> 24) \
                + ((words >> (8 * i + 4)) & 15) * ((x_high << (24 - 8 * i)) >> 24)
        return total

    @triton.jit
    def _group_terms(dot, w_scale, w_offset, x_step, x_sum, x_residual, SYMMETRIC: tl.constexpr):
        """One group's part of the 4-bit product from its integer dot product (SYMMETRIC: the offset's term is
        already in ``x_residual``)."""
        terms = w_scale.to(tl.float32) * (x_step * dot + x_residual)
        if not SYMMETRIC:
            terms += w_offset.to(tl.float32) * x_sum
        return terms

    @triton.jit
    def _fused_q4_gemv_kernel(
        xq_ptr, xstep_ptr, xsum_ptr, xresidual_ptr, squares_ptr, qw_ptr, qscale_ptr, qoffset_ptr, out_ptr, res_ptr,
        stride_qn, stride_sn, gate_rows, eps,
        K: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, SQUARES: tl.constexpr,
        SQUARES_PAD: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr, RESIDUAL: tl.constexpr,
        SYMMETRIC: tl.constexpr, PDL: tl.constexpr, ASM: tl.constexpr,
    ):
        """One row of x, quantized to 8 bits per group of 32 (:func:`_quantize_activation_kernel`), times a 4-bit
        weight (layout: :func:`quantized_matmul`), both read as int32 words: word w of a group holds the weights
        4w..4w+3 in its low nibbles and 16+4w..16+4w+3 in its high ones, which meet x's words w and 4 + w in two
        integer dot products (``dp4a``).  Per group ``scale * (step * sum(q qx) + residual) + offset * sum(x)``; with NORM the
        row's 1/rms (from the quantizer's partial sums of squares) multiplies the result.  SYMMETRIC (Q4_0): every
        offset is -8 scale, so offsets are not read (a ninth of the bytes) and the group's term is
        ``scale * (step * dot + residual - 8 sum(x))``.  A FMA form of this
        kernel issued about ten instructions per weight and was bound by instruction issue; this one issues
        about one (bench/sass_count.py)."""
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_g = tl.arange(0, GROUPS)
        offs_w = tl.arange(0, 4)
        q_ptrs = qw_ptr + offs_n.to(tl.int64)[:, None, None] * stride_qn + offs_g[None, :, None] * 4 \
            + offs_w[None, None, :]
        x_ptrs = xq_ptr + offs_g[None, :, None] * 8 + offs_w[None, None, :]
        s_index = offs_n.to(tl.int64)[:, None] * stride_sn + offs_g[None, :]
        up_q, up_s = gate_rows * stride_qn, gate_rows * stride_sn
        # GROUPS need not divide the row's groups: the tail is masked (a program may so take a whole row at once)
        inside = (offs_g < K // 32)[None, :]
        words = tl.load(q_ptrs, mask=inside[:, :, None], other=0)
        w_scale = tl.load(qscale_ptr + s_index, mask=inside, other=0.0)
        w_offset = w_scale
        if not SYMMETRIC:
            w_offset = tl.load(qoffset_ptr + s_index, mask=inside, other=0.0)
        if GATED:
            up_words = tl.load(q_ptrs + up_q, mask=inside[:, :, None], other=0)
            up_scale = tl.load(qscale_ptr + up_s + s_index, mask=inside, other=0.0)
            up_offset = up_scale
            if not SYMMETRIC:
                up_offset = tl.load(qoffset_ptr + up_s + s_index, mask=inside, other=0.0)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        # the epilogue's inputs first: their reads overlap the products
        residual = _residual_row(res_ptr, offs_n, BLOCK_N, RESIDUAL)
        squares = tl.zeros([1], tl.float32)
        if NORM:
            offs_s = tl.arange(0, SQUARES_PAD)
            squares += tl.sum(tl.load(squares_ptr + offs_s, mask=offs_s < SQUARES, other=0.0), axis=0)
        acc = tl.zeros([BLOCK_N, GROUPS], tl.float32)
        acc_up = tl.zeros([BLOCK_N, GROUPS], tl.float32)
        for g0 in range(0, K // 32, GROUPS):
            here = (g0 + offs_g < K // 32)[None, :]
            after = (g0 + GROUPS + offs_g < K // 32)[None, :]
            words_next = tl.load(q_ptrs + (g0 + GROUPS) * 4, mask=after[:, :, None], other=0)
            scale_next = tl.load(qscale_ptr + s_index + g0 + GROUPS, mask=after, other=0.0)
            offset_next = scale_next
            if not SYMMETRIC:
                offset_next = tl.load(qoffset_ptr + s_index + g0 + GROUPS, mask=after, other=0.0)
            if GATED:
                up_words_next = tl.load(q_ptrs + up_q + (g0 + GROUPS) * 4, mask=after[:, :, None], other=0)
                up_scale_next = tl.load(qscale_ptr + up_s + s_index + g0 + GROUPS, mask=after, other=0.0)
                up_offset_next = up_scale_next
                if not SYMMETRIC:
                    up_offset_next = tl.load(qoffset_ptr + up_s + s_index + g0 + GROUPS, mask=after, other=0.0)
            x_low = tl.load(x_ptrs + g0 * 8, mask=here[:, :, None], other=0)
            x_high = tl.load(x_ptrs + g0 * 8 + 4, mask=here[:, :, None], other=0)
            x_step = tl.load(xstep_ptr + g0 + offs_g[None, :], mask=here, other=0.0)
            x_sum = tl.load(xsum_ptr + g0 + offs_g[None, :], mask=here, other=0.0)
            x_residual = tl.load(xresidual_ptr + g0 + offs_g[None, :], mask=here, other=0.0)
            if SYMMETRIC:
                x_residual -= 8.0 * x_sum
            dot = tl.sum(_dot_nibbles(words, x_low, x_high, ASM), axis=2).to(tl.float32)
            acc += _group_terms(dot, w_scale, w_offset, x_step, x_sum, x_residual, SYMMETRIC)
            words, w_scale, w_offset = words_next, scale_next, offset_next
            if GATED:
                dot = tl.sum(_dot_nibbles(up_words, x_low, x_high, ASM), axis=2).to(tl.float32)
                acc_up += _group_terms(dot, up_scale, up_offset, x_step, x_sum, x_residual, SYMMETRIC)
                up_words, up_scale, up_offset = up_words_next, up_scale_next, up_offset_next
        _gemv_finish(tl.sum(acc, axis=1)[None, :], tl.sum(acc_up, axis=1)[None, :], squares, residual, out_ptr,
                     offs_n, eps, K, NORM, GATED, RESIDUAL)

    @triton.jit
    def _q4_dequantize_kernel(qw_ptr, scale_ptr, offset_ptr, out_ptr, stride_qn, stride_sn, stride_on,
                              GROUPS: tl.constexpr, ROWS: tl.constexpr, BLOCK_G: tl.constexpr):
        """Rows of a 4-bit weight (layout: :func:`quantized_matmul`) -> out's dtype, ROWS rows x BLOCK_G groups of 32
        values per program: w = scale * q + offset (exact in float32: q has 4 bits, scale 11), then rounded."""
        offs_n = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        offs_g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
        offs_b = tl.arange(0, 16)
        inside = (offs_g < GROUPS)[None, :]
        s_index = offs_n.to(tl.int64)[:, None] * stride_sn + offs_g[None, :]
        q = tl.load(qw_ptr + offs_n.to(tl.int64)[:, None, None] * stride_qn + offs_g[None, :, None] * 16
                    + offs_b[None, None, :], mask=inside[:, :, None], other=0).to(tl.int32)
        scale = tl.load(scale_ptr + s_index, mask=inside, other=0.0).to(tl.float32)[:, :, None]
        offset = tl.load(offset_ptr + s_index, mask=inside, other=0.0).to(tl.float32)[:, :, None]
        low = (_nibble_value(q & 15) * scale + offset).to(out_ptr.dtype.element_ty)
        high = (_nibble_value(q >> 4) * scale + offset).to(out_ptr.dtype.element_ty)
        out = out_ptr + offs_n.to(tl.int64)[:, None, None] * stride_on + offs_g[None, :, None] * 32 \
            + offs_b[None, None, :]
        tl.store(out, low, mask=inside[:, :, None])
        tl.store(out + 16, high, mask=inside[:, :, None])

    @triton.jit
    def _combine_splits(part_ptr, stats_ptr, pid, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
                        SPLITS: tl.constexpr):
        """The decode kernel's partial softmax sums of program ``pid`` -> its heads' outputs [GROUP_PAD, D].  The
        partials come from other SMs: read past this SM's L1 (".cg"), which may hold a previous call's."""
        offs_g = tl.arange(0, GROUP_PAD)
        offs_d = tl.arange(0, D)
        g_mask = offs_g < GROUP  # the padding rows were not stored: not read either
        stats = stats_ptr + pid * SPLITS * 2 * GROUP_PAD + offs_g
        parts = part_ptr + pid * SPLITS * GROUP_PAD * D + offs_g[:, None] * D + offs_d[None, :]
        m_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        for split in tl.static_range(SPLITS):
            m_max = tl.maximum(m_max, tl.load(stats + split * 2 * GROUP_PAD, mask=g_mask, other=float("-inf"),
                                              cache_modifier=".cg"))
        m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
        total = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, D], tl.float32)
        for split in tl.static_range(SPLITS):
            weight = tl.exp(tl.load(stats + split * 2 * GROUP_PAD, mask=g_mask, other=float("-inf"),
                                    cache_modifier=".cg") - m_safe)
            total += weight * tl.load(stats + split * 2 * GROUP_PAD + GROUP_PAD, mask=g_mask, other=0.0,
                                      cache_modifier=".cg")
            acc += weight[:, None] * tl.load(parts + split * GROUP_PAD * D, mask=g_mask[:, None], other=0.0,
                                             cache_modifier=".cg")
        return acc / tl.where(total > 0, total, 1.0)[:, None]

    @triton.jit
    def _store_output(out, out_ptr, stride_og, flat, xq_ptr, xstep_ptr, xsum_ptr, xresidual_ptr,
                      GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, QUANTIZE: tl.constexpr):
        """A kv head's outputs [GROUP_PAD, D] (rows past GROUP are padding) to ``out_ptr``; QUANTIZE: also
        rounded as stored to 8 bits per group of 32 values at element ``flat`` of the quantized row."""
        offs_g = tl.arange(0, GROUP_PAD)
        offs_d = tl.arange(0, D)
        g_mask = offs_g < GROUP
        out = out.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs_g[:, None] * stride_og + offs_d[None, :], out, mask=g_mask[:, None])
        if QUANTIZE:
            q, step, total, residual = _round_groups(tl.reshape(out.to(tl.float32), [GROUP_PAD, D // 32, 32]))
            index = flat + offs_g[:, None, None] * D + tl.arange(0, D // 32)[None, :, None] * 32 \
                + tl.arange(0, 32)[None, None, :]
            tl.store(xq_ptr + index, q, mask=g_mask[:, None, None])
            group = flat // 32 + offs_g[:, None] * (D // 32) + tl.arange(0, D // 32)[None, :]
            tl.store(xstep_ptr + group, step, mask=g_mask[:, None])
            tl.store(xsum_ptr + group, total, mask=g_mask[:, None])
            tl.store(xresidual_ptr + group, residual, mask=g_mask[:, None])


#: Programs the split form aims for (about two per SM of an H100): few streams' columns are split until there are
#: about this many (up to 16 splits)
SPLIT_TARGET_PROGRAMS = 256


def _launch_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, table: torch.Tensor,
                             qpos: torch.Tensor, out: torch.Tensor, row_start: int, capacity: int, window: int, *,
                             h_kv: int, group: int, q_strides: tuple[int, int, int],
                             rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
                             quantized: QuantizedRow | None = None, pdl: bool = False) -> None:
    """Run the decode kernel writing ``out`` [B, H_kv, group, D] (and ``quantized``, the same rounded to 8 bits);
    ``rotary``: the (cos, signed sin) rows [B, D] of the FROM_QKV form, whose ``q`` is the fused projection's
    output."""
    batch, dim = qpos.shape[0], keys.shape[-1]
    programs = batch * h_kv
    splits = 1
    while splits < 16 and programs * splits * 2 <= SPLIT_TARGET_PROGRAMS:
        splits *= 2
    group_pad = max(16, triton.next_power_of_2(group))
    part = q.new_empty((programs * splits, group_pad, dim), dtype=torch.float32) if splits > 1 else out
    stats = q.new_empty((programs * splits, 2, group_pad), dtype=torch.float32) if splits > 1 else out
    counts = _split_counts(q.device, SPLIT_TARGET_PROGRAMS // 2) if splits > 1 else out
    cos, sin = rotary if rotary is not None else (q, q)
    rounded = quantized[:4] if quantized is not None else (out,) * 4  # q, steps, sums, residuals
    _decode_attention_kernel[(programs, splits)](
        q, keys, values, table, qpos, out, part, stats, counts, cos, sin, *rounded,
        row_start, capacity, window, 1.0 / math.sqrt(dim),
        *q_strides,
        keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        table.stride(0), cos.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        H_KV=h_kv, GROUP=group, GROUP_PAD=group_pad, D=dim, BLOCK_N=64, SPLITS=splits,
        IEEE=keys.dtype == torch.float32, FROM_QKV=rotary is not None, QUANTIZE=quantized is not None, PDL=pdl,
        **_launch_options(pdl),
    )


@functools.cache
def _split_counts(device: torch.device, programs: int) -> torch.Tensor:
    """The split decode kernel's per-program counts of finished splits, zero between calls (the last split
    resets its count): one buffer per device, made once, so that a call launches no kernel to clear it.  Calls
    on one device run in stream order; two streams must not run the split kernel at the same time."""
    return torch.zeros(programs, dtype=torch.int32, device=device)


@torch.library.custom_op("voxtral::decode_attention", mutates_args=())
def _decode_attention_op(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, table: torch.Tensor,
                         qpos: torch.Tensor, row_start: int, capacity: int, window: int) -> torch.Tensor:
    out = torch.empty_like(q)
    _launch_decode_attention(q, keys, values, table, qpos, out, row_start, capacity, window, h_kv=q.shape[1],
                             group=q.shape[2], q_strides=(q.stride(0), q.stride(1), q.stride(2)))
    return out


@_decode_attention_op.register_fake
def _(q, keys, values, table, qpos, row_start, capacity, window):  # shapes only
    return torch.empty_like(q)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, table: torch.Tensor,
                     qpos: torch.Tensor, row_start: int, capacity: int, window: int) -> torch.Tensor:
    """q [B, H, 1, D] of cache rows ``row_start..row_start+B`` -> [B, H, 1, D].

    ``keys``/``values`` [rows, H_kv, columns, D] and ``table`` [rows, columns] are a :class:`.layers.KVCache`'s
    whole buffers; ``qpos`` [B] the query positions, -1 for a row that is to be left alone (its output is zero).
    """
    batch, heads, _, dim = q.shape
    h_kv = keys.shape[1]
    grouped = q.reshape(batch, h_kv, heads // h_kv, dim)
    out = _decode_attention_op(grouped.contiguous(), keys, values, table, qpos.contiguous(), row_start, capacity,
                               window)
    return out.reshape(batch, heads, 1, dim)


def decode_attention_from_qkv(qkv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, table: torch.Tensor,
                              qpos: torch.Tensor, row_start: int, capacity: int, window: int, cos: torch.Tensor,
                              signed_sin: torch.Tensor, n_heads: int, *, quantized: bool = False,
                              pdl: bool = False) -> torch.Tensor | QuantizedRow:
    """The attention of one new position per stream straight from the fused projection's output ``qkv``
    [B, (H + 2 H_kv) D], not yet rotated: rotates q and the new key (``cos``/``signed_sin`` [B, D], see
    layers.Rotary), stores the new key and value in the cache at column ``qpos % capacity`` (rows with qpos -1
    store nothing) and returns the heads' outputs [B, H D].  Same result as rotating, :meth:`KVCache.write`
    and :func:`decode_attention`, in one kernel.  ``quantized`` (one row): the outputs come rounded to 8 bits
    for the 4-bit ``wo`` (:func:`fused_q4_linear`), as :func:`quantize_row` would round them."""
    batch, dim, h_kv = qkv.shape[0], keys.shape[-1], keys.shape[1]
    group = n_heads // h_kv
    out = qkv.new_empty((batch, h_kv, group, dim))
    rounded = None
    if quantized and (dim % 32 or (dim // 32) & (dim // 32 - 1)):  # the kernel rounds a power-of-2 number of groups
        return quantize_row(decode_attention_from_qkv(qkv, keys, values, table, qpos, row_start, capacity, window,
                                                      cos, signed_sin, n_heads, pdl=pdl), pdl=pdl)
    if quantized:
        if batch != 1:
            raise ValueError(f"quantized attention outputs are made for one row, not {batch}")
        rounded = _empty_row(n_heads * dim, qkv.dtype, qkv.device)
    _launch_decode_attention(qkv, keys, values, table, qpos, out, row_start, capacity, window, h_kv=h_kv,
                             group=group, q_strides=(qkv.stride(0), group * dim, dim), rotary=(cos, signed_sin),
                             quantized=rounded, pdl=pdl)
    return rounded if quantized else out.view(batch, n_heads * dim)


@dataclass(frozen=True)
class MatmulConfig:
    """Tile shape of the few-row matmul kernels; ``bench/tune_gemv.py`` measures the choices."""

    block_n: int = 16
    block_k: int = 256  # for the 4-bit kernel: values per iteration, a multiple of 32
    num_warps: int = 4


def fused_linear(x: torch.Tensor, weight: torch.Tensor, *, norm: torch.Tensor | None = None, eps: float = 0.0,
                 scale: torch.Tensor | None = None, gated: bool = False, residual: torch.Tensor | None = None,
                 config: MatmulConfig | None = None, pdl: bool = False) -> torch.Tensor:
    """``f(x) @ weight.T (+ residual)`` for one row x [1, K], where ``f`` is the identity or, with ``norm``,
    ``RMSNorm(x) * norm`` (times ``scale`` [1, K] or [K] when given).  ``gated``: ``weight`` [2N, K] is a fused
    gate/up matrix and the result is ``silu(gate) * up`` [1, N].  The decoder step's elementwise work so rides on
    the matmuls, which read their weights at memory speed.

    Rounding differs from separate kernels in one place: the normalised input is not rounded to x's dtype
    before the product (the 1/rms factor is applied to the sums)."""
    m, k = x.shape
    if m != 1:
        raise ValueError(f"the fused GEMV takes one row, not {m}")
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    config = config or gemv_config(n, k, gated=gated)
    out, (gain, scale_row, res) = _fused_arguments(x, n, norm, scale, residual)
    pairs = k % 2 == 0 and all(t.dtype == torch.bfloat16 for t in (x, weight, gain, scale_row))
    x, weight, gain, scale_row = (t.view(torch.int32) if pairs else t for t in (x, weight, gain, scale_row))
    _fused_gemv_kernel[(n // config.block_n,)](
        x, weight, out, gain, scale_row, res, weight.stride(0), n, eps,
        K=k, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        NORM=norm is not None, HAS_SCALE=scale is not None, GATED=gated, RESIDUAL=residual is not None,
        PAIRS=pairs, PDL=pdl, num_warps=config.num_warps, num_stages=1, **_launch_options(pdl),
    )
    return out


class QuantizedRow(NamedTuple):
    """One row of activations rounded to 8 bits per group of 32 values, as the one-row 4-bit GEMV reads it:
    ``q`` int8 [K], per group ``steps`` (max|x| / 127), ``sums`` (of x) and ``residuals`` (8 x what rounding lost)
    [K / 32], ``squares``: partial sums of x^2 for a norm the GEMV applies (empty without one), and the dtype of
    the row it was made from (the GEMV's output dtype)."""

    q: torch.Tensor
    steps: torch.Tensor
    sums: torch.Tensor
    residuals: torch.Tensor
    squares: torch.Tensor
    dtype: torch.dtype


def quantize_row(x: torch.Tensor, *, norm: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                 pdl: bool = False) -> QuantizedRow:
    """x [1, K] (times ``norm``'s gain and ``scale`` when given; the norm's 1/rms is left to the GEMV) rounded to
    8 bits per group of 32 values (like llama.cpp's q8_1 activations), for :func:`fused_q4_linear`."""
    k = x.shape[-1]
    per_program = _largest_divisor(k // 32, (4, 2))
    row = _empty_row(k, x.dtype, x.device, squares=k // 32 // per_program if norm is not None else 0)
    _quantize_activation_kernel[(k // 32 // per_program,)](
        x, norm if norm is not None else x, scale if scale is not None else x, *row[:5],
        GROUPS=per_program, NORM=norm is not None, HAS_SCALE=scale is not None, PDL=pdl, num_warps=1,
        **_launch_options(pdl))
    return row


def _empty_row(k: int, dtype: torch.dtype, device: torch.device, *, squares: int = 0) -> QuantizedRow:
    """Buffers for a row of ``k`` values of ``dtype`` rounded to 8 bits, with ``squares`` partial sums."""
    steps, sums, residuals = torch.empty((3, k // 32), dtype=torch.float32, device=device)
    return QuantizedRow(torch.empty(k, dtype=torch.int8, device=device), steps, sums, residuals,
                        steps.new_empty(squares), dtype)


def fused_q4_linear(x: torch.Tensor | QuantizedRow, qweight: torch.Tensor, scales: torch.Tensor,
                    offsets: torch.Tensor | None, *, norm: torch.Tensor | None = None, eps: float = 0.0,
                    scale: torch.Tensor | None = None, gated: bool = False, residual: torch.Tensor | None = None,
                    config: MatmulConfig | None = None, pdl: bool = False) -> torch.Tensor:
    """:func:`fused_linear` for one row of x [1, K] and a 4-bit weight (layout: :func:`quantized_matmul`), in two
    kernels: x (normed, scaled) is quantized to 8 bits per group of 32 values (:func:`quantize_row`: a relative
    error of about 0.4% per value, far below the 4-bit weights' own), then multiplied with integer dot products
    (tests/test_matmul_kernels.py states the arithmetic in PyTorch).  ``x`` may come quantized already (the
    decode-attention kernel rounds its output so), then without ``norm`` or ``scale``.  ``offsets`` None: Q4_0's
    symmetric blocks (every offset -8 scale), which the kernel then does not read."""
    if isinstance(x, QuantizedRow):
        if norm is not None or scale is not None:
            raise ValueError("a quantized row takes no norm or scale: they apply before the rounding")
        row = x
    elif x.shape[0] != 1:
        raise ValueError(f"the fused 4-bit GEMV takes one row, not {x.shape[0]}")
    else:
        row = quantize_row(x, norm=norm, scale=scale, pdl=pdl)
    n, k = qweight.shape[0] // 2 if gated else qweight.shape[0], row.q.shape[0]
    config = config or q4_config(n, k, gated=gated)
    out = row.steps.new_empty((1, n), dtype=row.dtype)
    words = qweight.view(torch.int32)
    squares = row.squares if norm is not None else row.steps
    _fused_q4_gemv_kernel[(n // config.block_n,)](
        row.q.view(torch.int32), row.steps, row.sums, row.residuals, squares, words, scales,
        offsets if offsets is not None else scales, out,
        residual if residual is not None else out, words.stride(0), scales.stride(0), n, eps,
        K=k, BLOCK_N=config.block_n, GROUPS=config.block_k // 32, SQUARES=squares.numel(),
        SQUARES_PAD=triton.next_power_of_2(squares.numel()), NORM=norm is not None,
        GATED=gated, RESIDUAL=residual is not None, SYMMETRIC=offsets is None, PDL=pdl, ASM=not _interpreted(),
        num_warps=config.num_warps,
        num_stages=1, **_launch_options(pdl),
    )
    return out


def _fused_arguments(x: torch.Tensor, n: int, norm: torch.Tensor | None, scale: torch.Tensor | None,
                     residual: torch.Tensor | None) -> tuple[torch.Tensor, tuple]:
    """The output [1, n] and (gain, scale, residual) for the fused GEMV; what is not given is passed as x (never
    read)."""
    if any(t is not None and not t.is_contiguous() for t in (x, scale, residual)):
        raise ValueError("the fused GEMV takes contiguous rows")
    return x.new_empty((1, n)), tuple(t if t is not None else x for t in (norm, scale, residual))


#: one-row tilings measured faster than :func:`gemv_config`'s rule in the decoder step, (N, K, gated) -> tiling
#: (``bench/tune_step.py --tilings``)
GEMV_ONE_ROW_TILINGS: dict[tuple[int, int, bool], MatmulConfig] = {}


def gemv_config(n: int, k: int, *, gated: bool = False) -> MatmulConfig:
    """The :func:`fused_linear` tiling for a [1, k] x [n, k] product, by rules measured in the decoder step on an
    H200 (bench/results/tune_step_sweep_h200.txt): two whole rows per program (up to 4096 values at a time, all
    requested before the wait for the previous kernel), four warps, eight for longer rows; short tiles where N
    alone gives thousands of programs (the LM head)."""
    if (n, k, gated) in GEMV_ONE_ROW_TILINGS:
        return GEMV_ONE_ROW_TILINGS[(n, k, gated)]
    if n >= 32768:
        return MatmulConfig(block_n=_largest_divisor(n, (4, 2)), block_k=256, num_warps=2)
    # Triton's interpreter runs the programs one after another in Python: fewer, larger ones for the CPU tests
    rows = (16, 8, 4, 2) if _interpreted() else (2,)
    return MatmulConfig(block_n=_largest_divisor(n, rows), block_k=min(4096, triton.next_power_of_2(k)),
                        num_warps=8 if k > 4096 else 4)


def _largest_divisor(n: int, choices: tuple[int, ...]) -> int:
    return next((c for c in choices if n % c == 0), 1)


#: one-row 4-bit tilings measured faster than :func:`q4_config`'s rule in the decoder step on an H200, (N, K, gated)
#: -> tiling (``bench/tune_step.py --q4-tilings``)
Q4_ONE_ROW_TILINGS: dict[tuple[int, int, bool], MatmulConfig] = {}


def q4_config(n: int, k: int, *, gated: bool = False) -> MatmulConfig:
    """The tiling of :func:`fused_q4_linear` for a [1, k] x [n, k] product (``gated``: the fused step's gate/up
    product): one warp per program taking two whole rows, loaded before the wait for the previous kernel.  Sets
    of tilings were timed in the step, the fastest within 1% of each other (tune_step_q4_tilings*_h200.txt)."""
    if (n, k, gated) in Q4_ONE_ROW_TILINGS:
        return Q4_ONE_ROW_TILINGS[(n, k, gated)]
    return MatmulConfig(block_n=_largest_divisor(n, (2,)), block_k=min(4096, 32 * triton.next_power_of_2(k // 32)),
                        num_warps=1)


def q4_dequantize(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                  dtype: torch.dtype) -> torch.Tensor:
    """The 4-bit weight (layout: :func:`quantized_matmul`) as a dense [N, K] tensor of ``dtype``, by one kernel."""
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    out = torch.empty((n, k), dtype=dtype, device=qweight.device)
    rows = _largest_divisor(n, (8, 4, 2))
    block_g = min(32, triton.next_power_of_2(k // 32))
    _q4_dequantize_kernel[(n // rows, triton.cdiv(k // 32, block_g))](
        qweight, scales, offsets, out, qweight.stride(0), scales.stride(0), out.stride(0),
        GROUPS=k // 32, ROWS=rows, BLOCK_G=block_g, num_warps=4)
    return out


#: Values of the dense weight one dequantization writes at most (bf16: 128 MB): a longer weight (the LM head) is
#: dequantized and multiplied in slices of rows
DEQUANTIZED_VALUES = 1 << 26


def _q4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    if x.shape[0] == 1:
        return fused_q4_linear(x, qweight, scales, offsets)
    n, k = qweight.shape[0], x.shape[1]
    rows = max(8, DEQUANTIZED_VALUES // k // 8 * 8)  # slices of whole 8-row programs of the dequantizer
    if rows >= n:
        return x @ q4_dequantize(qweight, scales, offsets, x.dtype).T
    out = x.new_empty((x.shape[0], n))
    for start in range(0, n, rows):
        part = slice(start, start + rows)
        out[:, part] = x @ q4_dequantize(qweight[part], scales[part], offsets[part], x.dtype).T
    return out


#: the same for torch.compile, which sees it as one opaque operation (eager calls skip the custom-op dispatch: a
#: file's encode makes hundreds of these calls and is bound by their CPU time, bench/results/profile_encode_q4_h200)
_q4_matmul_op = torch.library.custom_op("voxtral::q4_matmul", _q4_matmul, mutates_args=())


@_q4_matmul_op.register_fake
def _(x, qweight, scales, offsets):  # shapes only
    return x.new_empty((x.shape[0], qweight.shape[0]))


def quantized_matmul_available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def quantized_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [..., K] @ w.T (+ ``bias``) with w [N, K] stored in 4 bits: ``qweight`` uint8 [N, K/2] (in each group
    of 32 values, byte b holds value b in its low nibble and value 16 + b in its high one), ``scales``/``offsets``
    [N, K/32] (w = scale * q + offset).  One row: :func:`fused_q4_linear`.  More rows: the weight is dequantized
    to x's dtype (:func:`q4_dequantize`, in slices of at most DEQUANTIZED_VALUES) for cuBLAS, which beat a
    tensor-core kernel dequantizing its tiles in registers at every row count from 16 on, and by 20x on an
    encoder chunk (bench/results/tune_q4_rows_h200.txt; that kernel is gone)."""
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    if flat.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        flat = flat.float()
    product = _q4_matmul_op if torch.compiler.is_compiling() else _q4_matmul
    out = product(flat.contiguous(), qweight, scales, offsets).reshape(*lead, qweight.shape[0])
    return out if bias is None else out + bias
