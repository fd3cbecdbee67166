"""Stage 5: audio embeddings + previous tokens -> next-token logits.

A Mistral-style pre-norm GQA decoder.  Two things are particular to Voxtral Realtime (docs/model.md, "Decoder"):

* the input at every position is ``embedding(token) + audio_embedding`` (a sum, from BOS on);
* the FFN input of every layer is scaled by ``1 + ada(t_cond)``, where ``t_cond`` is a sinusoidal embedding of
  the delay in steps.  It depends on nothing but the delay, so :meth:`TextDecoder.ffn_scales` computes it once
  per delay value and each step only multiplies.

The LM head is the token embedding (tied).

On CUDA a step of one new position for one stream runs :meth:`DecoderLayer.step` instead of ``forward``: the same
computation in five hand-fused kernels per layer (see kernels.fused_linear), about half the kernels of the plain
layers compiled.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import DecoderConfig
from .layers import Attention, AttentionContext, FeedForward, KVCache, RMSNorm, Rotary


class AdaNorm(nn.Module):
    """The per-layer delay-conditioning MLP: dim -> ada_dim -> dim, exact GELU, no biases."""

    def __init__(self, dim: int, ada_dim: int) -> None:
        super().__init__()
        self.w_in = nn.Linear(dim, ada_dim, bias=False)
        self.w_out = nn.Linear(ada_dim, dim, bias=False)

    def forward(self, t_cond: torch.Tensor) -> torch.Tensor:
        return self.w_out(F.gelu(self.w_in(t_cond)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, qkv_bias=False,
                                   out_bias=False)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ada_norm = AdaNorm(cfg.dim, cfg.ada_dim)
        self.feed_forward = FeedForward(cfg.dim, cfg.hidden_dim, out_bias=False)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, layer: int, ffn_scale: torch.Tensor) -> torch.Tensor:
        """``ffn_scale``: [dim] (one delay for all rows) or [B, 1, dim] (each row its own delay)."""
        x = x + self.attention(self.attention_norm(x), ctx, layer)
        return x + self.feed_forward(self.ffn_norm(x) * ffn_scale)

    def step(self, x: torch.Tensor, ctx: AttentionContext, layer: int, ffn_scale: torch.Tensor, *,
             pdl: bool) -> torch.Tensor:
        """:meth:`forward` for one new position of one stream, x [1, dim] (CUDA), in five kernels: each norm, the
        rotary embedding, the cache write, SwiGLU and each residual add ride on a matmul or on the attention kernel
        instead of running as kernels of their own (``ffn_scale``: [dim] or [1, dim]).  One row only: more rows
        multiply the GEMV's FMA work, while cuBLAS's cost stays that of reading the weights."""
        attention, ffn = self.attention, self.feed_forward
        qkv = _fused(attention.wqkv, x, norm=self.attention_norm.weight, eps=self.attention_norm.eps, pdl=pdl)
        heads = attention.attend_projected(qkv, ctx, layer, pdl=pdl, quantized=_four_bit(attention.wo))
        x = _fused(attention.wo, heads, residual=x, pdl=pdl)
        hidden = _fused(ffn.w13, x, norm=self.ffn_norm.weight, eps=self.ffn_norm.eps, scale=ffn_scale, gated=True,
                        pdl=pdl)
        return _fused(ffn.w2, hidden, residual=x, pdl=pdl)

    def step_weights(self) -> bool:
        """Whether :meth:`step` takes this layer: every matmul bias-free and an nn.Linear or in the 4-bit layout."""
        linears = (self.attention.wqkv, self.attention.wo, self.feed_forward.w13, self.feed_forward.w2)
        return all(m.bias is None and (type(m) is nn.Linear or _four_bit(m)) for m in linears)


def _four_bit(module: nn.Module) -> bool:
    """A layer in quantization.QuantizedLinear's 4-bit layout (the core does not import the quantization module)."""
    return all(isinstance(getattr(module, name, None), torch.Tensor) for name in ("qweight", "scales", "offsets"))


def _fused(module: nn.Module, x: torch.Tensor | kernels.QuantizedRow, **kwargs) -> torch.Tensor:
    if _four_bit(module):
        return kernels.fused_q4_linear(x, module.qweight, module.scales, module.kernel_offsets, **kwargs)
    return kernels.fused_linear(x, module.weight, **kwargs)


def time_embedding(delay_tokens: int, dim: int, dtype: torch.dtype, device: torch.device,
                   theta: float = 10_000.0) -> torch.Tensor:
    """[cos(t w_0..w_{d/2-1}), sin(...)] with t = delay in steps, computed in ``dtype`` as the reference does."""
    inv_freq = torch.exp(-math.log(theta) * torch.arange(dim // 2, device=device).float() / (dim // 2))
    emb = torch.tensor([float(delay_tokens)], device=device, dtype=dtype) * inv_freq.to(dtype)
    return torch.cat((emb.cos(), emb.sin()))


class TextDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)
        #: whether a one-position step of one stream runs :meth:`DecoderLayer.step` where it can
        #: (CUDA); ``pdl``: with programmatic dependent launch where the GPU has it.  Set both before making
        #: engines: their CUDA graphs keep the kernels they captured.
        self.fused_step = True
        self.pdl = True

    def new_cache(self, rows: int, *, max_chunk: int, device: torch.device, dtype: torch.dtype,
                  context: int | None = None, preallocate: bool = False) -> KVCache:
        """KV cache for ``rows`` streams.  ``context`` caps the attention window below the model's (memory for
        many streams); the default keeps the model's exact window."""
        window = min(self.cfg.sliding_window, context or self.cfg.sliding_window)
        return KVCache.empty(len(self.layers), rows, self.cfg.n_kv_heads, self.cfg.head_dim,
                             window=window, max_chunk=max_chunk, device=device, dtype=dtype, preallocate=preallocate)

    @torch.no_grad()
    def ffn_scales(self, delay_tokens: int) -> torch.Tensor:
        """``1 + ada(t_cond)`` for every layer: [n_layers, dim]."""
        weight = self.norm.weight  # compute dtype and device (the token table may be quantized)
        t_cond = time_embedding(delay_tokens, self.cfg.dim, weight.dtype, weight.device)
        return torch.stack([1 + layer.ada_norm(t_cond) for layer in self.layers])

    def forward(self, tokens: torch.Tensor, audio: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                ffn_scales: torch.Tensor, *, rows: slice | None = None, enabled: torch.Tensor | None = None,
                columns_used: int | None = None) -> torch.Tensor:
        """tokens [B, T], audio embeddings [B, T, dim], absolute positions [B, T] of cache rows ``rows`` (default:
        the first B) -> logits of the last position [B, vocab] in float32.  ``ffn_scales``: [n_layers, dim] for
        one delay, or [B, n_layers, dim], one delay per row.  ``columns_used``: see AttentionContext.prepare."""
        x = self.tok_embeddings(tokens) + audio
        ctx = AttentionContext.prepare(self.rotary, cache, positions, x.dtype, rows=rows, enabled=enabled,
                                       columns_used=columns_used)
        if self._can_step(x, ctx):
            return self._fused_steps(x[:, 0], ctx, ffn_scales).float()
        for i, layer in enumerate(self.layers):
            x = layer(x, ctx, i, ffn_scales[..., i, None, :] if ffn_scales.dim() == 3 else ffn_scales[i])
        hidden = self.norm(x[:, -1])
        head = self._quantized_head()
        return (head(hidden) if head is not None else F.linear(hidden, self.tok_embeddings.weight)).float()

    def _quantized_head(self):
        """A quantized table's own LM head (quantization.QuantizedEmbedding.logits), or None for a plain table."""
        return getattr(self.tok_embeddings, "logits", None)

    def _can_step(self, x: torch.Tensor, ctx: AttentionContext) -> bool:
        return (self.fused_step and ctx.query_positions is not None and x.shape[0] == 1
                and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
                and all(layer.step_weights() for layer in self.layers))

    @torch.compiler.disable  # hand-written kernels: nothing for inductor to fuse; a CUDA graph captures them
    def _fused_steps(self, x: torch.Tensor, ctx: AttentionContext, ffn_scales: torch.Tensor) -> torch.Tensor:
        pdl = self.pdl and kernels.programmatic_launch_available(x.device)
        for i, layer in enumerate(self.layers):
            x = layer.step(x, ctx, i, ffn_scales[:, i] if ffn_scales.dim() == 3 else ffn_scales[i], pdl=pdl)
        table = getattr(self.tok_embeddings, "table", self.tok_embeddings)  # a quantized table's layer: its LM head
        if table is self.tok_embeddings or _four_bit(table):
            return _fused(table, x, norm=self.norm.weight, eps=self.norm.eps, pdl=pdl)
        return self._quantized_head()(self.norm(x))
