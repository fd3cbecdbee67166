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


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the gain, as the reference does (matters in bf16)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Rotary(nn.Module):
    """Half-split ("rotate_half") rotary embedding over absolute positions."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, 1, T, head_dim], computed in float32 then cast (reference cast point)."""
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class KVCache:
    """Keys/values of every attention layer of one stack (encoder or decoder), for a batch of streams, as ring
    buffers over the sliding window.

    All layers advance together, so one table records the absolute position held by each slot (-1 when empty)
    and one mask per call serves every layer; slot order never matters.  The buffers grow by doubling up to
    ``max_capacity`` = window + largest chunk - 1, the most keys any query of a chunk can still need; from then
    on they wrap and overwrite only keys that have left every future query's window.  Memory is bounded by the
    window, whatever the stream length.
    """

    keys: list[torch.Tensor]  # per layer [B, H_kv, capacity, D]
    values: list[torch.Tensor]
    positions: torch.Tensor  # [B, capacity], int64, -1 = empty
    window: int
    max_capacity: int
    written: int = 0  # slots written since the start (the ring index is written % capacity)

    @classmethod
    def empty(cls, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, *, window: int, max_chunk: int,
              device: torch.device, dtype: torch.dtype, initial_capacity: int = 256) -> KVCache:
        max_capacity = window + max_chunk - 1
        capacity = min(max_capacity, initial_capacity)
        shape = (batch, n_kv_heads, capacity, head_dim)
        return cls(
            keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)],
            values=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)],
            positions=torch.full((batch, capacity), -1, device=device, dtype=torch.long),
            window=window,
            max_capacity=max_capacity,
        )

    @property
    def capacity(self) -> int:
        return self.positions.shape[1]

    @property
    def max_chunk(self) -> int:
        return self.max_capacity - self.window + 1

    def advance(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reserve slots for absolute ``positions`` [B, C]; return them and the attention mask [B, 1, C, capacity]
        (key j visible to query q iff q - window < j <= q), valid for every layer once it has called write()."""
        chunk = positions.shape[1]
        if chunk > self.max_chunk:
            raise ValueError(f"chunk of {chunk} exceeds the cache's maximum chunk of {self.max_chunk}")
        if self.capacity < self.max_capacity and self.written + chunk > self.capacity:
            self._grow(self.written + chunk)
        slots = (self.written + torch.arange(chunk, device=positions.device)) % self.capacity
        self.positions.index_copy_(1, slots, positions)
        self.written += chunk
        q = positions[:, None, :, None]
        k = self.positions[:, None, None, :]
        return slots, (k >= 0) & (k <= q) & (k > q - self.window)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Store layer ``layer``'s k, v [B, H_kv, C, D] in the slots ``advance`` reserved."""
        self.keys[layer].index_copy_(2, slots, k)
        self.values[layer].index_copy_(2, slots, v)

    def _grow(self, needed: int) -> None:
        # Before the first wrap the entries sit in slots [0, written), so a plain copy keeps the ring consistent.
        extra = min(self.max_capacity, max(2 * self.capacity, needed)) - self.capacity
        self.keys = [F.pad(k, (0, 0, 0, extra)) for k in self.keys]
        self.values = [F.pad(v, (0, 0, 0, extra)) for v in self.values]
        self.positions = F.pad(self.positions, (0, extra), value=-1)


@dataclass
class AttentionContext:
    """What every layer of a stack needs for one call: rotary tables, the cache, its reserved slots and mask."""

    cos: torch.Tensor
    sin: torch.Tensor
    cache: KVCache
    slots: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def prepare(cls, rotary: Rotary, cache: KVCache, positions: torch.Tensor, dtype: torch.dtype) -> AttentionContext:
        cos, sin = rotary.cos_sin(positions, dtype)
        slots, mask = cache.advance(positions)
        return cls(cos, sin, cache, slots, mask)


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
        q, k, v = self.wqkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        ctx.cache.write(layer, k, v, ctx.slots)
        out = F.scaled_dot_product_attention(
            q, ctx.cache.keys[layer], ctx.cache.values[layer], attn_mask=ctx.mask,
            enable_gqa=self.n_heads != self.n_kv_heads,
        )
        return self.wo(out.transpose(1, 2).reshape(batch, length, self.q_size))


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
