"""The two ONNX-exportable step graphs, one 80 ms step each, with every bit of state explicit
(docs/architecture.md, "The browser export").

* :class:`AudioStepGraph`: the 1520 samples that one step's 8 mel frames read -> log-mel (the windowed DFT is a
  matmul) -> causal conv stem (its left context is state) -> one encoder block of 4 frames over a KV ring ->
  adapter -> one audio embedding.
* :class:`DecoderStepGraph`: token + audio embedding + position (+ delay) -> next token (greedy), over a KV ring.

State (conv tails, KV rings) goes in as inputs and comes back as outputs; the caller swaps them each step.
Position ``p`` lives in ring column ``p % columns``, written in order, so the graphs derive the attention mask
from the position alone; docs/architecture.md ("The browser export") says why the results then equal the
model's for streams of any length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import apply_rotary, grouped_attention


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # spelled out: F.rms_norm has no ONNX lowering below opset 23, which browsers' onnxruntime builds lag behind
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))


def _ring_mask(position: torch.Tensor, count: int, columns: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries at ``position + [0, count)`` of a ring with ``columns`` columns written in order from position 0
    -> (their columns [count], mask [count, columns])."""
    queries = position + torch.arange(count, dtype=torch.long)
    last = position + (count - 1)
    column = torch.arange(columns, dtype=torch.long)
    held = last - torch.remainder(last - column, columns)  # the newest position in each column after the write
    q = queries[:, None]
    mask = (held[None] >= 0) & (held[None] <= q) & (held[None] > q - window)
    return torch.remainder(queries, columns), mask


def _attend(attention: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
            values: torch.Tensor, write: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One :class:`.layers.Attention` over a ring: x [1, T, dim] -> (output, new keys, new values)."""
    length = x.shape[1]
    qk, v = attention.wqkv(x).split([attention.q_size + attention.kv_size, attention.kv_size], dim=-1)
    qk = apply_rotary(qk.view(1, length, attention.n_heads + attention.n_kv_heads, attention.head_dim), cos, sin)
    q, k = qk.transpose(1, 2).split([attention.n_heads, attention.n_kv_heads], dim=1)
    v = v.view(1, length, attention.n_kv_heads, attention.head_dim).transpose(1, 2)
    index = write[None, None, :, None].expand(1, attention.n_kv_heads, length, attention.head_dim)
    keys, values = keys.scatter(2, index, k), values.scatter(2, index, v)
    out = grouped_attention(q, keys, values, mask[None, None])
    return attention.wo(out.transpose(1, 2).reshape(1, length, attention.q_size)), keys, values


class AudioStepGraph(nn.Module):
    """One 80 ms step of audio: samples [window] -> audio embedding [1, decoder dim], with the state explicit.

    Inputs: ``samples`` (the step's mel frames' windows, starting at its first frame's left edge), ``mel_tail``
    [1, n_mels, 2], ``conv1_tail`` [1, dim, 1], ``position`` [1] (encoder frames done), then ``key_i``/``value_i``
    [1, heads, columns, head_dim] per layer; outputs the embedding and the new state in the same order.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        audio = network.config.audio
        self.encoder, self.adapter = network.encoder, network.adapter
        self.frames = audio.downsample_factor  # encoder frames per step
        self.window = self.encoder.cfg.sliding_window
        self.columns = self.window + self.frames - 1
        mel = network.mel
        self.register_buffer("windowed_dft", mel.windowed_dft.float().clone(), persistent=False)
        self.register_buffer("mel_filters", mel.mel_filters.float().clone(), persistent=False)
        starts = torch.arange(audio.mel_frames_per_token)[:, None] * audio.hop_length
        self.register_buffer("frame_index", starts + torch.arange(audio.window_size), persistent=False)
        self.log_floor = audio.global_log_mel_max - 8.0
        self.samples = (audio.mel_frames_per_token - 1) * audio.hop_length + audio.window_size

    def state_shapes(self) -> list[tuple[str, list[int]]]:
        cfg = self.encoder.cfg
        shapes = [("mel_tail", [1, cfg.num_mel_bins, 2]), ("conv1_tail", [1, cfg.dim, 1])]
        for i in range(cfg.n_layers):
            shapes += [(f"key_{i}", [1, cfg.n_heads, self.columns, cfg.head_dim]),
                       (f"value_{i}", [1, cfg.n_heads, self.columns, cfg.head_dim])]
        return shapes

    def forward(self, samples: torch.Tensor, mel_tail: torch.Tensor, conv1_tail: torch.Tensor,
                position: torch.Tensor, *cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # log-mel exactly as LogMelSpectrogram.frames, with the framing as a gather
        spectrum = samples[self.frame_index] @ self.windowed_dft
        n_freq = spectrum.shape[-1] // 2
        power = spectrum[:, :n_freq] ** 2 + spectrum[:, n_freq:] ** 2
        log_mel = torch.clamp(power @ self.mel_filters, min=1e-10).log10()
        mel = ((torch.clamp(log_mel, min=self.log_floor) + 4.0) / 4.0).transpose(0, 1)[None]
        stem = self.encoder.conv_stem
        x = torch.cat([mel_tail, mel], dim=-1)
        c1 = torch.cat([conv1_tail, F.gelu(stem.conv1(x))], dim=-1)
        h = F.gelu(stem.conv2(c1)).transpose(1, 2)  # [1, frames, dim]
        write, mask = _ring_mask(position, self.frames, self.columns, self.window)
        positions = (position + torch.arange(self.frames, dtype=torch.long))[None]
        cos, sin = self.encoder.rotary.cos_sin(positions, h.dtype)
        new_cache = []
        for i, layer in enumerate(self.encoder.layers):
            out, k, v = _attend(layer.attention, _rms_norm(layer.attention_norm, h), cos, sin, cache[2 * i],
                                cache[2 * i + 1], write, mask)
            h = h + out
            h = h + layer.feed_forward(_rms_norm(layer.ffn_norm, h))
            new_cache += [k, v]
        embedding = self.adapter(_rms_norm(self.encoder.norm, h))[:, 0]
        return (embedding, x[..., -2:], c1[..., -1:], *new_cache)


class DecoderStepGraph(nn.Module):
    """One decoder position: token [1] + audio embedding [1, dim] at ``position`` [1] with ``delay`` [1] (steps,
    float) -> the greedy next token [1], with ``key_i``/``value_i`` [1, kv heads, columns, head_dim] per layer
    in and out.

    The LM head (the tied embedding) is cut into blocks of rows of at most ``block_bytes`` in float32 so that no
    single weight exceeds a shard.  ``separate_embedding``: the lookup reads a table of its own (for quantized
    exports, where :func:`_embed_from_quantized_head` then points it at the quantized head); otherwise it reads
    the head's float weight directly.
    """

    def __init__(self, network: nn.Module, *, block_bytes: int, context: int | None = None,
                 separate_embedding: bool = False) -> None:
        super().__init__()
        decoder = network.decoder
        cfg = decoder.cfg
        self.decoder = decoder
        self.window = min(cfg.sliding_window, context or cfg.sliding_window)
        self.columns = self.window  # one position per call
        weight = decoder.tok_embeddings.weight.detach().float()
        rows = max(1, block_bytes // (4 * cfg.dim))
        self.block_starts = list(range(0, cfg.vocab_size, rows))
        # [dim, rows] blocks: logits are plain MatMuls, which onnxruntime's weight quantizers recognise
        self.head = nn.ParameterList(nn.Parameter(weight[s:s + rows].t().contiguous(), requires_grad=False)
                                     for s in self.block_starts)
        self.embedding = (nn.ParameterList(nn.Parameter(weight[s:s + rows].clone(), requires_grad=False)
                                           for s in self.block_starts) if separate_embedding else None)
        inv_freq = torch.exp(-math.log(10_000.0) * torch.arange(cfg.dim // 2).float() / (cfg.dim // 2))
        self.register_buffer("time_inv_freq", inv_freq, persistent=False)

    def state_shapes(self) -> list[tuple[str, list[int]]]:
        cfg = self.decoder.cfg
        shapes = []
        for i in range(cfg.n_layers):
            shapes += [(f"key_{i}", [1, cfg.n_kv_heads, self.columns, cfg.head_dim]),
                       (f"value_{i}", [1, cfg.n_kv_heads, self.columns, cfg.head_dim])]
        return shapes

    def _embed(self, token: torch.Tensor) -> torch.Tensor:
        out = None
        for b, start in enumerate(self.block_starts):
            table = self.embedding[b] if self.embedding is not None else self.head[b]
            rows = table.shape[0] if self.embedding is not None else table.shape[1]
            index = torch.clamp(token - start, 0, rows - 1)
            row = table[index] if self.embedding is not None else table[:, index].t()
            if len(self.block_starts) > 1:
                inside = (token >= start) & (token < start + rows)
                row = torch.where(inside[:, None], row, torch.zeros_like(row))
            out = row if out is None else out + row
        return out

    def forward(self, token: torch.Tensor, audio: torch.Tensor, position: torch.Tensor, delay: torch.Tensor,
                *cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
        decoder = self.decoder
        h = (self._embed(token) + audio)[:, None]  # [1, 1, dim]
        angles = delay * self.time_inv_freq  # the delay's sinusoidal embedding (decoder.time_embedding)
        t_cond = torch.cat([angles.cos(), angles.sin()])
        write, mask = _ring_mask(position, 1, self.columns, self.window)
        cos, sin = decoder.rotary.cos_sin(position[None], h.dtype)
        new_cache = []
        for i, layer in enumerate(decoder.layers):
            out, k, v = _attend(layer.attention, _rms_norm(layer.attention_norm, h), cos, sin, cache[2 * i],
                                cache[2 * i + 1], write, mask)
            h = h + out
            scale = 1 + layer.ada_norm(t_cond)
            h = h + layer.feed_forward(_rms_norm(layer.ffn_norm, h) * scale)
            new_cache += [k, v]
        last = _rms_norm(decoder.norm, h[:, -1])
        logits = torch.cat([last @ block for block in self.head], dim=-1)
        return (logits.argmax(dim=-1), *new_cache)
