"""Decode attention: one new query per stream against that stream's KV ring, reading only the columns its
position can have filled (``min(position + 1, capacity)``) instead of SDPA's whole masked window; with few
streams, split between programs and combined by the last one (docs/performance.md, "Decode attention").
:func:`decode_attention_from_qkv` also applies the rotary embedding and writes the new key and value itself.
"""

from __future__ import annotations

import functools
import math

import torch

from .common import launch_options, tl, triton
from .rounding import QuantizedRow, _round_groups, empty_row, quantize_row


def decode_attention_available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


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


#: Programs the split form aims for (about two per SM): few streams' columns are split until there are about this
#: many (up to 16 splits)
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
        **launch_options(pdl),
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
        rounded = empty_row(n_heads * dim, qkv.dtype, qkv.device)
    _launch_decode_attention(qkv, keys, values, table, qpos, out, row_start, capacity, window, h_kv=h_kv,
                             group=group, q_strides=(qkv.stride(0), group * dim, dim), rotary=(cos, signed_sin),
                             quantized=rounded, pdl=pdl)
    return rounded if quantized else out.view(batch, n_heads * dim)
