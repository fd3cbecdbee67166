"""GPU kernels (Triton).  Each one has a plain PyTorch equivalent that other devices run and the tests compare with.

:func:`decode_attention`: one new query per stream against that stream's KV ring.  SDPA would read every column
of the ring (the whole preallocated window) and needs a mask tensor built per step; this kernel reads, per
stream, only the columns its position can have filled (``min(position + 1, capacity)``), checks the sliding
window against the cache's position table itself, and serves all query heads of a kv head (GQA) from one read
of the keys.  Cost follows each stream's own context length, not the buffer size.  With few streams (few
programs for 132 SMs) each stream's columns are split between several programs whose partial softmax sums a
second kernel combines ("flash decoding").
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds come without Triton
    triton = None


def decode_attention_available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _decode_attention_kernel(
        q_ptr, k_ptr, v_ptr, table_ptr, qpos_ptr, out_ptr, part_ptr, stats_ptr,
        row_start, capacity, window, scale,
        stride_qb, stride_qh, stride_qg,
        stride_kr, stride_kh, stride_kc,
        stride_vr, stride_vh, stride_vc,
        stride_tr,
        stride_ob, stride_oh, stride_og,
        H_KV: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
        BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, IEEE: tl.constexpr,
    ):
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
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_g[:, None] * stride_qg + offs_d[None, :],
                    mask=g_mask[:, None], other=0.0)
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, D], tl.float32)
        k_base = k_ptr + row * stride_kr + h * stride_kh
        v_base = v_ptr + row * stride_vr + h * stride_vh
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            in_range = offs_n < hi
            held = tl.load(table_ptr + row * stride_tr + offs_n, mask=in_range, other=-1)
            visible = in_range & (held >= 0) & (held <= qpos) & (held > qpos - window)
            k = tl.load(k_base + offs_n[:, None] * stride_kc + offs_d[None, :], mask=in_range[:, None], other=0.0)
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
            v = tl.load(v_base + offs_n[:, None] * stride_vc + offs_d[None, :], mask=in_range[:, None], other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        if SPLITS == 1:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_g[:, None] * stride_og + offs_d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
        else:  # partial sums, [programs, SPLITS, GROUP_PAD, D] and (max, sum) [programs, SPLITS, 2, GROUP_PAD]
            slot = pid * SPLITS + split
            tl.store(part_ptr + slot * GROUP_PAD * D + offs_g[:, None] * D + offs_d[None, :], acc)
            tl.store(stats_ptr + slot * 2 * GROUP_PAD + offs_g, m_i)
            tl.store(stats_ptr + slot * 2 * GROUP_PAD + GROUP_PAD + offs_g, l_i)

    @triton.jit
    def _combine_splits_kernel(
        part_ptr, stats_ptr, out_ptr, stride_ob, stride_oh, stride_og,
        H_KV: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = pid // H_KV
        h = pid % H_KV
        offs_g = tl.arange(0, GROUP_PAD)
        offs_d = tl.arange(0, D)
        m_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        for split in tl.static_range(SPLITS):
            m_max = tl.maximum(m_max, tl.load(stats_ptr + (pid * SPLITS + split) * 2 * GROUP_PAD + offs_g))
        m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
        total = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, D], tl.float32)
        for split in tl.static_range(SPLITS):
            slot = pid * SPLITS + split
            weight = tl.exp(tl.load(stats_ptr + slot * 2 * GROUP_PAD + offs_g) - m_safe)
            total += weight * tl.load(stats_ptr + slot * 2 * GROUP_PAD + GROUP_PAD + offs_g)
            acc += weight[:, None] * tl.load(part_ptr + slot * GROUP_PAD * D + offs_g[:, None] * D + offs_d[None, :])
        out = acc / tl.where(total > 0, total, 1.0)[:, None]
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_g[:, None] * stride_og + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=(offs_g < GROUP)[:, None])


#: Programs the split form aims for: about two per SM of an H100.
_TARGET_PROGRAMS = 256


@torch.library.custom_op("voxtral::decode_attention", mutates_args=())
def _decode_attention_op(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, table: torch.Tensor,
                         qpos: torch.Tensor, row_start: int, capacity: int, window: int) -> torch.Tensor:
    batch, h_kv, group, dim = q.shape
    out = torch.empty_like(q)
    programs = batch * h_kv
    splits = 1
    while splits < 16 and programs * splits * 2 <= _TARGET_PROGRAMS:
        splits *= 2
    group_pad = max(16, triton.next_power_of_2(group))
    part = q.new_empty((programs * splits, group_pad, dim), dtype=torch.float32) if splits > 1 else out
    stats = q.new_empty((programs * splits, 2, group_pad), dtype=torch.float32) if splits > 1 else out
    _decode_attention_kernel[(programs, splits)](
        q, keys, values, table, qpos, out, part, stats,
        row_start, capacity, window, 1.0 / math.sqrt(dim),
        q.stride(0), q.stride(1), q.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        table.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        H_KV=h_kv, GROUP=group, GROUP_PAD=group_pad, D=dim, BLOCK_N=64, SPLITS=splits,
        IEEE=q.dtype == torch.float32,
    )
    if splits > 1:
        _combine_splits_kernel[(programs,)](
            part, stats, out, out.stride(0), out.stride(1), out.stride(2),
            H_KV=h_kv, GROUP=group, GROUP_PAD=group_pad, D=dim, SPLITS=splits,
        )
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
