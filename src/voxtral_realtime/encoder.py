"""Stage 3: log-mel -> audio encoder frames (50 per second).

A causal conv stem (kernel 3 stride 1, then kernel 3 stride 2, both left-padded only, exact GELU) halves the
100 Hz mel rate, then a pre-norm transformer with RoPE over absolute frame positions and a causal sliding window
(750 frames = 15 s in the real model) runs over the frames.  Everything is causal, so feeding the mel in pieces
of any size through :class:`EncoderState` gives the same frames as one pass over the whole signal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import EncoderConfig
from .layers import Attention, AttentionContext, FeedForward, KVCache, RMSNorm, Rotary, RowSnapshot


@dataclass
class ConvStemState:
    """Left context of the two causal convolutions for every row, initially the zeros the offline pass pads with.

    Mel frames always arrive in even numbers (whole 80 ms steps), so conv2 always needs exactly one conv1 frame
    from the previous call.
    """

    mel_tail: torch.Tensor  # [rows, n_mels, 2]: the last two mel frames seen
    conv1_tail: torch.Tensor  # [rows, dim, 1]: the last conv1 frame


@dataclass
class EncoderState:
    """Everything the encoder remembers about a set of streams (one row each)."""

    conv: ConvStemState
    cache: KVCache

    def reset(self, row: int) -> None:
        self.conv.mel_tail[row] = 0
        self.conv.conv1_tail[row] = 0
        self.cache.reset(row)

    def snapshot(self, row: int, frames: int) -> tuple[torch.Tensor, torch.Tensor, RowSnapshot]:
        """Row ``row`` after ``frames`` encoder frames, to start other rows from."""
        return self.conv.mel_tail[row].clone(), self.conv.conv1_tail[row].clone(), self.cache.snapshot(row, frames)

    def restore(self, row: int, snapshot: tuple[torch.Tensor, torch.Tensor, RowSnapshot]) -> None:
        mel_tail, conv1_tail, cache = snapshot
        self.conv.mel_tail[row] = mel_tail
        self.conv.conv1_tail[row] = conv1_tail
        self.cache.restore(row, cache)


class ConvStem(nn.Module):
    def __init__(self, n_mels: int, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, dim, kernel_size=3, stride=1)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=3, stride=2)

    def new_state(self, rows: int, device: torch.device, dtype: torch.dtype) -> ConvStemState:
        return ConvStemState(
            mel_tail=torch.zeros(rows, self.conv1.in_channels, 2, device=device, dtype=dtype),
            conv1_tail=torch.zeros(rows, self.conv2.in_channels, 1, device=device, dtype=dtype),
        )

    def forward(self, mel: torch.Tensor, state: ConvStemState, rows: slice,
                enabled: torch.Tensor | None = None) -> torch.Tensor:
        """mel [B, n_mels, 2k] of rows ``rows`` -> frames [B, k, dim]; disabled rows keep their state."""
        mel_tail, conv1_tail = state.mel_tail[rows], state.conv1_tail[rows]
        x = torch.cat([mel_tail, mel.to(mel_tail.dtype)], dim=-1)
        c1 = torch.cat([conv1_tail, F.gelu(self.conv1(x))], dim=-1)
        # conv2 output j reads conv1 frames 2j-1, 2j, 2j+1 (counting this call's first conv1 frame as 0).
        out = F.gelu(self.conv2(c1))
        new_mel_tail, new_conv1_tail = x[..., -2:], c1[..., -1:]
        if enabled is not None:
            new_mel_tail = torch.where(enabled[:, None, None], new_mel_tail, mel_tail)
            new_conv1_tail = torch.where(enabled[:, None, None], new_conv1_tail, conv1_tail)
        mel_tail.copy_(new_mel_tail)
        conv1_tail.copy_(new_conv1_tail)
        return out.transpose(1, 2)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg.dim, cfg.n_heads, cfg.n_heads, cfg.head_dim, qkv_bias=True, out_bias=True)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.hidden_dim, out_bias=True)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, layer: int) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), ctx, layer)
        return x + self.feed_forward(self.ffn_norm(x))


class AudioEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.conv_stem = ConvStem(cfg.num_mel_bins, cfg.dim)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)

    def new_state(self, rows: int, *, max_chunk: int, device: torch.device, dtype: torch.dtype,
                  cache_dtype: torch.dtype | None = None, preallocate: bool = False) -> EncoderState:
        """Fresh state for ``rows`` streams; ``max_chunk`` bounds the encoder frames of one call once a stream is
        longer than the window (see :meth:`KVCache.max_write`); ``preallocate`` sizes the cache for the whole
        window now instead of growing it; ``cache_dtype``: the KV ring's, if not ``dtype``."""
        return EncoderState(
            conv=self.conv_stem.new_state(rows, device, dtype),
            cache=KVCache.empty(len(self.layers), rows, self.cfg.n_heads, self.cfg.head_dim,
                                window=self.cfg.sliding_window, max_chunk=max_chunk, device=device,
                                dtype=cache_dtype or dtype, preallocate=preallocate),
        )

    def forward(self, mel: torch.Tensor, state: EncoderState, positions: torch.Tensor, *, rows: slice | None = None,
                enabled: torch.Tensor | None = None) -> torch.Tensor:
        """New mel frames [B, n_mels, 2k] of rows ``rows`` (default: the first B) -> encoder frames [B, k, dim] at
        absolute ``positions`` [B, k]."""
        rows = rows if rows is not None else slice(0, mel.shape[0])
        x = self.conv_stem(mel, state.conv, rows, enabled)
        ctx = AttentionContext.prepare(self.rotary, state.cache, positions, x.dtype, rows=rows, enabled=enabled)
        for i, layer in enumerate(self.layers):
            x = layer(x, ctx, i)
        return self.norm(x)
