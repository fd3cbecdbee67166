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
from .layers import Attention, AttentionContext, FeedForward, KVCache, RMSNorm, Rotary


@dataclass
class ConvStemState:
    """Left context of the two causal convolutions, initially the zeros the offline pass pads with."""

    mel_tail: torch.Tensor  # [B, n_mels, 2]: the last two mel frames seen
    conv1_tail: torch.Tensor  # [B, dim, 1 or 2]: conv1 frames from index 2j-1 on, j = next output frame


@dataclass
class EncoderState:
    """Everything the encoder remembers about one batch of streams."""

    conv: ConvStemState
    cache: KVCache
    frames_done: int = 0  # encoder frames produced so far = absolute position of the next one


class ConvStem(nn.Module):
    def __init__(self, n_mels: int, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, dim, kernel_size=3, stride=1)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=3, stride=2)

    def new_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> ConvStemState:
        return ConvStemState(
            mel_tail=torch.zeros(batch, self.conv1.in_channels, 2, device=device, dtype=dtype),
            conv1_tail=torch.zeros(batch, self.conv2.in_channels, 1, device=device, dtype=dtype),
        )

    def forward(self, mel: torch.Tensor, state: ConvStemState) -> torch.Tensor:
        """mel [B, n_mels, T] -> frames [B, T', dim]; T' counts the conv2 outputs whose inputs are all known."""
        x = torch.cat([state.mel_tail, mel.to(state.mel_tail.dtype)], dim=-1)
        state.mel_tail = x[..., -2:]
        c1 = F.gelu(self.conv1(x))
        # conv2 output j reads conv1 frames 2j-1, 2j, 2j+1: keep what the next output still needs.
        c1 = torch.cat([state.conv1_tail, c1], dim=-1)
        n_out = (c1.shape[-1] - 1) // 2
        state.conv1_tail = c1[..., 2 * n_out:]
        if n_out == 0:
            return c1.new_zeros(c1.shape[0], 0, c1.shape[1])
        out = F.gelu(self.conv2(c1[..., : 2 * n_out + 1]))
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

    def new_state(self, batch: int, *, max_chunk: int, device: torch.device, dtype: torch.dtype) -> EncoderState:
        """Fresh state for ``batch`` streams; ``max_chunk`` bounds the encoder frames passed to one transformer call."""
        return EncoderState(
            conv=self.conv_stem.new_state(batch, device, dtype),
            cache=KVCache.empty(len(self.layers), batch, self.cfg.n_heads, self.cfg.head_dim,
                                window=self.cfg.sliding_window, max_chunk=max_chunk, device=device, dtype=dtype),
        )

    def forward(self, mel: torch.Tensor, state: EncoderState) -> torch.Tensor:
        """New mel frames [B, n_mels, T] -> the encoder frames they complete [B, T', dim]."""
        x = self.conv_stem(mel, state.conv)
        if not x.shape[1]:
            return x
        return torch.cat([self._transformer(piece, state) for piece in x.split(state.cache.max_chunk, dim=1)], dim=1)

    def _transformer(self, x: torch.Tensor, state: EncoderState) -> torch.Tensor:
        batch, length, _ = x.shape
        positions = torch.arange(state.frames_done, state.frames_done + length, device=x.device).expand(batch, -1)
        ctx = AttentionContext.prepare(self.rotary, state.cache, positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, ctx, i)
        state.frames_done += length
        return self.norm(x)
