"""Building blocks shared by the encoder and the decoder: RMSNorm, rotary embedding, a sliding-window KV cache,
attention with fused QKV, and the SwiGLU feed-forward.

Weights are kept in transformers' "half-split" RoPE row order (loading permutes Mistral's interleaved rows once),
q/k/v live in one fused matrix and gate/up in another, so each projection is a single matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import kernels


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the gain, as the reference does (matters in bf16)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class Rotary(nn.Module):
    """Half-split ("rotate_half") rotary embedding over absolute positions."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, signed sin [B, T, 1, head_dim] for :func:`apply_rotary`, computed in float32
        then cast (the reference's cast point).  The sin of the first half is negated: rotate_half's sign."""
        freqs = positions[..., None].float() * self.inv_freq
        cos, sin = freqs.cos().to(dtype), freqs.sin().to(dtype)
        return torch.cat((cos, cos), dim=-1)[:, :, None], torch.cat((-sin, sin), dim=-1)[:, :, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, heads, D]: x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1) is a roll of the
    halves with the sign carried by ``signed_sin`` (four kernels instead of six in eager mode)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


@dataclass
class KVCache:
    """Keys/values of every attention layer of one stack (encoder or decoder) for ``rows`` independent streams,
    each row a ring buffer over the sliding window.

    Every row has its own positions; one table records the absolute position held by each column of each row
    (-1 when empty) and one mask per call serves every layer, so column order never matters.  The buffers grow
    by doubling up to ``max_capacity`` = window + largest chunk - 1, the most keys any query of a chunk can still
    need; from then on they wrap and overwrite only keys that have left every future query's window.

    A call may leave some rows out (``enabled`` false): their writes go to a scratch column that is never
    visible to a real query, so a fixed-shape step (a CUDA graph) can run over a range of rows of which only
    some have work.  Buffers start zeroed (not empty) so that a masked column never holds a NaN that a zero
    attention weight would still propagate.
    """

    keys: list[torch.Tensor]  # per layer [rows, H_kv, columns, D]; columns >= capacity are scratch
    values: list[torch.Tensor]
    positions: torch.Tensor  # [rows, columns], int64, -1 = empty (always so in scratch columns)
    window: int
    max_capacity: int
    capacity: int
    version: int = 0  # bumped when the buffers are reallocated: captured CUDA graphs must then be rebuilt

    @classmethod
    def empty(cls, n_layers: int, rows: int, n_kv_heads: int, head_dim: int, *, window: int, max_chunk: int,
              device: torch.device, dtype: torch.dtype, preallocate: bool = False) -> KVCache:
        """``preallocate``: the whole ring now (memory known up front, no reallocation later) instead of 256
        columns that double as needed."""
        max_capacity = window + max_chunk - 1
        capacity = max_capacity if preallocate else min(max_capacity, 256)
        columns = _columns(capacity)
        shape = (rows, n_kv_heads, columns, head_dim)
        return cls(
            keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)],
            values=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)],
            positions=torch.full((rows, columns), -1, device=device, dtype=torch.long),
            window=window,
            max_capacity=max_capacity,
            capacity=capacity,
        )

    @property
    def rows(self) -> int:
        return self.positions.shape[0]

    @property
    def max_chunk(self) -> int:
        return self.max_capacity - self.window + 1

    def bytes_per_row(self) -> int:
        k = self.keys[0]
        return 2 * len(self.keys) * k[0].numel() * k.element_size()

    def max_write(self, position: int) -> int:
        """The longest chunk that may be written at ``position``: anything while the ring has never wrapped,
        ``max_chunk`` afterwards."""
        return max(self.max_chunk, self.max_capacity - position)

    def reserve(self, end: int) -> None:
        """Make room for positions below ``end`` (call before a step whose rows reach it; may reallocate)."""
        if self.capacity < self.max_capacity and end > self.capacity:
            self._grow(min(self.max_capacity, max(2 * self.capacity, end)))

    def reset(self, row: int) -> None:
        """Forget everything row ``row`` held (a new stream takes it)."""
        self.positions[row] = -1

    def snapshot(self, row: int, written: int) -> RowSnapshot:
        """A copy of what row ``row`` holds after ``written`` positions, to give other rows the same start."""
        n = min(written, self.capacity)
        return RowSnapshot([k[row, :, :n].clone() for k in self.keys], [v[row, :, :n].clone() for v in self.values],
                           self.positions[row, :n].clone())

    def restore(self, row: int, snapshot: RowSnapshot) -> None:
        """Make row ``row`` hold what :meth:`snapshot` copied (the ring may have grown since, never shrunk)."""
        n = snapshot.positions.shape[0]
        self.positions[row] = -1
        self.positions[row, :n] = snapshot.positions
        for stack, saved in ((self.keys, snapshot.keys), (self.values, snapshot.values)):
            for t, s in zip(stack, saved):
                t[row, :, :n] = s

    def advance(self, positions: torch.Tensor, enabled: torch.Tensor | None = None,
                rows: slice | None = None, *, with_mask: bool = True,
                columns_used: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Reserve columns for absolute ``positions`` [B, T] of rows ``rows`` (default: the first B); return the
        columns [B, T] and (``with_mask``) the attention mask [B, 1, T, columns] (key j visible to query q iff
        q - window < j <= q), valid for every layer once it has called :meth:`write`.  ``columns_used``: the
        mask covers only the first columns (see :meth:`AttentionContext.prepare`)."""
        rows = rows if rows is not None else slice(0, positions.shape[0])
        columns = positions % self.capacity
        if enabled is not None:
            columns = torch.where(enabled[:, None], columns, self.capacity)
            positions = torch.where(enabled[:, None], positions, -1)
        row_index = torch.arange(rows.start, rows.stop, device=positions.device)[:, None]
        self.positions.index_put_((row_index, columns), positions)
        if not with_mask:
            return columns, None
        table = self.positions[rows, :columns_used][:, None, None, :]
        q = positions[:, None, :, None]
        mask = (table >= 0) & (table <= q) & (table > q - self.window)
        if enabled is not None:
            scratch = torch.arange(self.positions.shape[1], device=positions.device) == self.capacity
            mask = torch.where(enabled[:, None, None, None], mask, scratch)
        return columns, mask

    def write_index(self, columns: torch.Tensor, rows: slice) -> tuple[torch.Tensor, ...]:
        """The index of :meth:`write` for ``columns`` [B, T] (from :meth:`advance`) of rows ``rows``: the same for
        every layer of a call, so it is built once."""
        row_index = torch.arange(rows.start, rows.stop, device=columns.device)[:, None, None]
        head_index = torch.arange(self.keys[0].shape[1], device=columns.device)[None, :, None]
        return row_index, head_index, columns[:, None, :]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, index: tuple[torch.Tensor, ...]) -> None:
        """Store layer ``layer``'s k, v [B, H_kv, T, D] at ``index`` (:meth:`write_index`), in the cache's dtype."""
        self.keys[layer].index_put_(index, k.to(self.keys[layer].dtype))
        self.values[layer].index_put_(index, v.to(self.values[layer].dtype))

    def _grow(self, capacity: int) -> None:
        # Before the first wrap every entry sits in column position % old capacity = position, which is also its
        # column in the larger ring: a plain copy keeps it consistent.
        old, new = self.capacity, _columns(capacity)

        for stack in (self.keys, self.values):
            for i, t in enumerate(stack):
                out = t.new_zeros(*t.shape[:2], new, t.shape[3])
                out[:, :, :old] = t[:, :, :old]
                stack[i] = out
        table = self.positions.new_full((self.positions.shape[0], new), -1)
        table[:, :old] = self.positions[:, :old]
        self.positions, self.capacity = table, capacity
        self.version += 1


@dataclass
class RowSnapshot:
    keys: list[torch.Tensor]  # per layer [H_kv, n, D]
    values: list[torch.Tensor]
    positions: torch.Tensor  # [n]


def _columns(capacity: int) -> int:
    """Ring columns plus at least one scratch column, rounded up to a multiple of 8 (aligned attention masks)."""
    return (capacity + 1 + 7) // 8 * 8


@dataclass
class AttentionContext:
    """What every layer of a stack needs for one call: rotary tables, the cache, the rows and columns it writes,
    and either the mask (SDPA) or, for one new position per stream on CUDA, the query positions that the decode
    kernel checks against the cache's position table itself (-1: a disabled row)."""

    cos: torch.Tensor
    sin: torch.Tensor
    cache: KVCache
    rows: slice
    write_index: tuple[torch.Tensor, ...]
    mask: torch.Tensor | None
    query_positions: torch.Tensor | None = None
    columns_used: int | None = None

    @classmethod
    def prepare(cls, rotary: Rotary, cache: KVCache, positions: torch.Tensor, dtype: torch.dtype, *,
                rows: slice | None = None, enabled: torch.Tensor | None = None,
                columns_used: int | None = None) -> AttentionContext:
        """``positions`` [B, T] of cache rows ``rows`` (default: the first B); rows whose ``enabled`` is false
        compute throwaway values and leave the cache as it was.  ``columns_used``: the rows' keys, these
        positions' included, all lie in the first ``columns_used`` columns (the caller knows its positions never
        reached them, e.g. a stream's prompt): SDPA then reads only those, not the whole preallocated ring.
        Ignored with ``enabled``."""
        rows = rows if rows is not None else slice(0, positions.shape[0])
        if enabled is not None or (columns_used is not None and columns_used >= cache.capacity):
            columns_used = None
        cos, sin = rotary.cos_sin(positions, dtype)
        if positions.shape[1] == 1 and kernels.decode_attention_available(positions.device):
            columns, _ = cache.advance(positions, enabled, rows, with_mask=False)
            query = positions[:, 0] if enabled is None else torch.where(enabled, positions[:, 0], -1)
            return cls(cos, sin, cache, rows, cache.write_index(columns, rows), None, query)
        columns, mask = cache.advance(positions, enabled, rows, columns_used=columns_used)
        return cls(cos, sin, cache, rows, cache.write_index(columns, rows), mask, columns_used=columns_used)


class Attention(nn.Module):
    """Multi-head (or grouped-query) self-attention with RoPE, one fused QKV projection and a KV cache."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, *, qkv_bias: bool,
                 out_bias: bool) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_size, self.kv_size = n_heads * head_dim, n_kv_heads * head_dim
        # Encoder checkpoints have q and v biases but no k bias: the fused bias holds zeros for k.
        self.wqkv = nn.Linear(dim, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.wo = nn.Linear(self.q_size, dim, bias=out_bias)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, layer: int) -> torch.Tensor:
        batch, length, _ = x.shape
        qk, v = self.wqkv(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        # q and k heads side by side: one rotary pass over both
        qk = apply_rotary(qk.view(batch, length, self.n_heads + self.n_kv_heads, self.head_dim), ctx.cos, ctx.sin)
        q, k = qk.transpose(1, 2).split([self.n_heads, self.n_kv_heads], dim=1)
        v = v.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cache = ctx.cache
        cache.write(layer, k, v, ctx.write_index)
        if ctx.query_positions is not None:
            out = kernels.decode_attention(q, cache.keys[layer], cache.values[layer], cache.positions,
                                           ctx.query_positions, ctx.rows.start, cache.capacity, cache.window)
        else:  # in the cache's dtype (see VoxtralRealtime.cache_dtype)
            used = slice(0, ctx.columns_used)
            keys, values = cache.keys[layer][ctx.rows, :, used], cache.values[layer][ctx.rows, :, used]
            out = grouped_attention(q.to(keys.dtype), keys, values, ctx.mask).to(q.dtype)
        return self.wo(out.transpose(1, 2).reshape(batch, length, self.q_size))

    def attend_projected(self, qkv: torch.Tensor, ctx: AttentionContext, layer: int, *, pdl: bool,
                         quantized: bool = False) -> torch.Tensor | kernels.QuantizedRow:
        """The fused step's attention (CUDA, one new position per row): ``qkv`` [B, (H + 2 H_kv) D] is the
        projection of the normed input, not yet rotated -> the heads' outputs [B, H D], before ``wo``
        (``quantized``: rounded to 8 bits for a 4-bit ``wo``, see kernels.decode_attention_from_qkv)."""
        cache = ctx.cache
        return kernels.decode_attention_from_qkv(
            qkv, cache.keys[layer], cache.values[layer], cache.positions, ctx.query_positions, ctx.rows.start,
            cache.capacity, cache.window, ctx.cos.flatten(1), ctx.sin.flatten(1), self.n_heads,
            quantized=quantized, pdl=pdl)


def grouped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [B, H, T, D] over keys/values [B, H_kv, S, D] with mask [B, 1, T, S] -> [B, H, T, D].

    The H / H_kv query heads that share a kv head are folded into the query length, so the kernel reads each
    cached key once and nothing is expanded (SDPA's ``enable_gqa`` would repeat the cache per query head).
    """
    batch, heads, length, dim = q.shape
    group = heads // keys.shape[1]
    if group > 1:
        q = q.reshape(batch, keys.shape[1], group * length, dim)
        mask = mask.expand(batch, group, length, mask.shape[-1]).reshape(batch, 1, group * length, mask.shape[-1])
    if q.is_cuda and length >= LONG_QUERY:
        with sdpa_kernel(_WITHOUT_CUDNN):
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    else:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    return out.reshape(batch, heads, length, dim)


#: Queries this long (a file's encoder chunks, whose shapes change from chunk to chunk) skip cuDNN's attention,
#: whose planning of each new shape costs more CPU time than it saves; short ones (the many-stream engine's
#: graphed ticks, which repeat their shapes) keep it, the fastest there (bench/results/README.md, "layers.py").
LONG_QUERY = 256
_WITHOUT_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), with w1 and w3 fused into one matrix."""

    def __init__(self, dim: int, hidden_dim: int, *, out_bias: bool) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.w13 = nn.Linear(dim, 2 * hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=out_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split(self.hidden_dim, dim=-1)
        return self.w2(F.silu(gate) * up)
