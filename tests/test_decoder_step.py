"""The fused decoder step (``DecoderLayer.step``: norms, rotary, cache write, SwiGLU and residuals folded into five
kernels) against the layer's plain PyTorch forward, on a GPU or in Triton's CPU interpreter (float32 there)."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from voxtral_realtime import kernels
from voxtral_realtime.config import DecoderConfig
from voxtral_realtime.decoder import DecoderLayer, TextDecoder
from voxtral_realtime.layers import AttentionContext, KVCache

from .test_kernels_q4 import one_row_product

pytestmark = pytest.mark.skipif(kernels.common.triton is None, reason="needs Triton (GPU, or its CPU interpreter)")
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
CFG = DecoderConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, vocab_size=300,
                    sliding_window=6, rope_theta=1e6, norm_eps=1e-5, ada_dim=8)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random, norm gains away from 1 (a gain or row-order bug must show)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if name.endswith("norm.weight") else 0.0
            p.copy_(base + torch.randn(p.shape, generator=generator) * (0.3 if base else 0.15))


def _kernel_context(decoder: TextDecoder, cache: KVCache, positions: torch.Tensor, enabled: torch.Tensor,
                    rows: slice) -> AttentionContext:
    """The context the CUDA path builds (query positions, no mask), also on the CPU for the interpreter."""
    with mock.patch.object(kernels, "decode_attention_available", lambda device: True):
        ctx = AttentionContext.prepare(decoder.rotary, cache, positions, cache.keys[0].dtype, rows=rows,
                                       enabled=enabled)
    assert ctx.query_positions is not None
    return ctx


def _history(decoder: TextDecoder, rows: int, lengths: list[int], dtype: torch.dtype) -> KVCache:
    """A cache whose row r holds ``lengths[r]`` positions of random keys/values (rings wrapped past the window)."""
    cache = decoder.new_cache(rows, max_chunk=1, device=DEVICE, dtype=dtype, preallocate=True)
    generator = torch.Generator(device=DEVICE).manual_seed(3)
    for r, n in enumerate(lengths):
        for p in range(n):
            columns, _ = cache.advance(torch.tensor([[p]], device=DEVICE), rows=slice(r, r + 1), with_mask=False)
            for layer in range(len(cache.keys)):
                kv = torch.randn(2, 1, CFG.n_kv_heads, 1, CFG.head_dim, device=DEVICE, generator=generator)
                cache.write(layer, kv[0].to(dtype), kv[1].to(dtype), cache.write_index(columns, slice(r, r + 1)))
    return cache


def _plain_and_step(dtype: torch.dtype, per_row_scale: bool):
    """Layer 0 of a random decoder in ``dtype`` on rows 1..4 of a 5-row cache (lengths before / at / past the
    window, one row disabled), the plain forward all rows at once, the fused step (one row) row by row: (plain
    forward, fused step, the two caches afterwards, enabled rows)."""
    decoder = TextDecoder(CFG)
    _randomize(decoder, seed=1)
    decoder = decoder.to(DEVICE, dtype)
    layer: DecoderLayer = decoder.layers[0]
    lengths = [2, 0, 5, 9, 3]
    rows = slice(1, 5)
    enabled = torch.tensor([True, True, False, True], device=DEVICE)
    positions = torch.tensor(lengths[1:], device=DEVICE)[:, None]
    plain, fused = _history(decoder, 5, lengths, dtype), _history(decoder, 5, lengths, dtype)
    generator = torch.Generator(device=DEVICE).manual_seed(5)
    x = torch.randn(4, CFG.dim, device=DEVICE, generator=generator).to(dtype)
    scale = (1 + 0.2 * torch.randn(4 if per_row_scale else 1, CFG.dim, device=DEVICE, generator=generator)).to(dtype)
    scale = scale if per_row_scale else scale[0]
    plain_ctx = AttentionContext.prepare(decoder.rotary, plain, positions, dtype, rows=rows, enabled=enabled)
    expected = layer(x[:, None], plain_ctx, 0, scale[:, None] if per_row_scale else scale)[:, 0]
    got = torch.cat([
        layer.step(x[r:r + 1], _kernel_context(decoder, fused, positions[r:r + 1], enabled[r:r + 1],
                                               slice(1 + r, 2 + r)), 0, scale[r:r + 1] if per_row_scale else scale,
                   pdl=False)
        for r in range(4)])
    return expected, got, plain, fused, enabled.cpu()


@pytest.mark.parametrize("per_row_scale", [False, True])
def test_step_equals_forward_and_writes_the_same_cache(per_row_scale):
    expected, got, plain, fused, on = _plain_and_step(torch.float32, per_row_scale)
    torch.testing.assert_close(got[on], expected[on], rtol=1e-4, atol=1e-4)
    for a, b in ((plain.keys[0], fused.keys[0]), (plain.values[0], fused.values[0])):
        ring = slice(0, plain.capacity)  # scratch columns hold whatever disabled rows threw away
        torch.testing.assert_close(b[:, :, ring], a[:, :, ring], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not CUDA, reason="GPU only (the interpreter has no bfloat16)")
@pytest.mark.parametrize("per_row_scale", [False, True])
def test_bf16_step_is_as_close_to_float32_as_the_plain_bf16_layer(per_row_scale):
    """In bf16 the two paths round at different points (the step does not round the normalised input), so each
    is compared with the same layer computed in float32: the step's error is of the plain bf16 layer's size."""
    reference, _, _, _, on = _plain_and_step(torch.float32, per_row_scale)
    plain, step, plain_cache, step_cache, _ = _plain_and_step(torch.bfloat16, per_row_scale)
    plain_error = (plain[on].float() - reference[on]).abs().max().item()
    step_error = (step[on].float() - reference[on]).abs().max().item()
    assert step_error <= 2 * plain_error + 1e-3, (step_error, plain_error)
    ring = slice(0, plain_cache.capacity)
    torch.testing.assert_close(step_cache.keys[0][:, :, ring].float(), plain_cache.keys[0][:, :, ring].float(),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(("n", "k", "config"), [
    (48, 64, None),
    (32, 96, kernels.MatmulConfig(block_n=2, block_k=128, num_warps=1)),  # the whole row in one masked tile
    (64, 160, kernels.MatmulConfig(block_n=4, block_k=64, num_warps=2)),  # a masked last tile
])
@pytest.mark.parametrize("prologue", ["none", "norm", "norm+scale", "norm+scale, gated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bfloat16: the kernel's word-pair form
def test_fused_linear_against_torch(n, k, config, prologue, dtype):
    generator = torch.Generator(device=DEVICE).manual_seed(n * 100 + k)
    rand = lambda *shape: torch.randn(*shape, device=DEVICE, generator=generator).to(dtype).float()
    gated = prologue.endswith("gated")
    weight, residual, x = rand(2 * n if gated else n, k), rand(1, n), rand(1, k)
    inputs, kwargs = x, {}
    if prologue.startswith("norm"):
        gain = 1 + 0.3 * rand(k)
        inputs = gain * torch.nn.functional.rms_norm(x, (k,), eps=1e-5)
        kwargs.update(norm=gain, eps=1e-5)
    if "scale" in prologue:
        scale = 1 + 0.3 * rand(1, k)
        inputs = inputs * scale
        kwargs["scale"] = scale
    product = inputs @ weight.T
    if gated:
        gate, up = product.split(n, dim=-1)
        product = torch.nn.functional.silu(gate) * up
    kwargs = {name: value.to(dtype) if torch.is_tensor(value) else value for name, value in kwargs.items()}
    got = kernels.fused_linear(x.to(dtype), weight.to(dtype), residual=residual.to(dtype), gated=gated,
                               config=config, **kwargs)
    expected = residual + product
    # bfloat16: the inputs are the same values; the products and the output are rounded to bfloat16 (~0.4% each)
    atol = 1e-4 if dtype == torch.float32 else 1e-2 * expected.abs().max().item()
    torch.testing.assert_close(got.float(), expected, rtol=1e-4 if dtype == torch.float32 else 2e-2, atol=atol)


@pytest.mark.parametrize("config", [kernels.MatmulConfig(block_n=16, block_k=32), kernels.MatmulConfig(block_n=2,
                                                                                                       block_k=128)])
def test_fused_linear_tilings_cover_every_column(config):
    """A tile per program and the last-iteration tail: every output written once (poisoned memory shows)."""
    x = torch.randn(1, 128, device=DEVICE)
    weight = torch.randn(64, 128, device=DEVICE)
    torch.testing.assert_close(kernels.fused_linear(x, weight, config=config), x @ weight.T, rtol=1e-4, atol=1e-4)


def test_fused_linear_takes_one_row():
    with pytest.raises(ValueError, match="one row"):
        kernels.fused_linear(torch.randn(2, 64, device=DEVICE), torch.randn(32, 64, device=DEVICE))


def test_transcription_through_the_fused_step_equals_the_plain_one(checkpoints, tiny_short, monkeypatch):
    """The whole model, its one-stream engine stepping through ``DecoderLayer.step`` (in the interpreter on a
    CPU), gives the plain CPU path's tokens; the audio runs past the decoder's window and wraps its ring."""
    import voxtral_realtime
    from voxtral_realtime.benchmarking.signals import speechlike

    audio = speechlike(0.6, seed=8)
    expected = tiny_short.transcribe(audio).tokens  # plain layers on the CPU, before the patches below
    model = voxtral_realtime.load(checkpoints["short"].mistral_dir, device=DEVICE, dtype="f32")
    used = []
    if not CUDA:  # the interpreter runs the kernels on CPU tensors
        monkeypatch.setattr(kernels, "decode_attention_available", lambda device: True)
    monkeypatch.setattr(DecoderLayer, "step", lambda self, *a, step=DecoderLayer.step, **k: used.append(1) or
                        step(self, *a, **k))
    assert model.transcribe(audio).tokens == expected
    assert used


@pytest.mark.parametrize("qtype, symmetric", [("q4_0", False), ("q4_0", True), ("q4_k", False)])
@pytest.mark.parametrize("form", ["none", "norm+scale, gated", "residual"])
def test_fused_q4_linear_against_the_dequantized_weight(qtype, symmetric, form):
    """``symmetric``: Q4_0's offsets left to the kernel (-8 x the scales) instead of read."""
    from voxtral_realtime.quantization import QuantizedLinear

    n, k = 32, 256
    generator = torch.Generator(device=DEVICE).manual_seed(7)
    rand = lambda *shape: torch.randn(*shape, device=DEVICE, generator=generator)
    gated = "gated" in form
    layer = QuantizedLinear.from_float(rand(2 * n if gated else n, k).cpu() * 0.1, qtype).to(DEVICE)
    weight = layer.dequantize()
    x, kwargs = rand(1, k), {}
    expected = one_row_product(x, layer.qweight, layer.scales, layer.offsets)  # the kernel rounds x to 8 bits
    exact = x @ weight.T
    if "norm" in form:  # the rounding takes x * gain * scale; the norm's 1/rms multiplies the sums
        gain, scale = 1 + 0.3 * rand(k), 1 + 0.3 * rand(1, k)
        inverse_rms = torch.rsqrt(x.pow(2).mean() + 1e-5)
        expected = one_row_product(x * gain * scale, layer.qweight, layer.scales, layer.offsets) * inverse_rms
        exact = (gain * torch.nn.functional.rms_norm(x, (k,), eps=1e-5) * scale) @ weight.T
        kwargs.update(norm=gain, eps=1e-5, scale=scale, gated=True)
    assert (expected - exact).abs().max() <= 1e-2 * exact.abs().max()
    if gated:
        gate, up = expected.split(n, dim=-1)
        expected = torch.nn.functional.silu(gate) * up
    if form == "residual":
        kwargs["residual"] = rand(1, n)
        expected = expected + kwargs["residual"]
    got = kernels.fused_q4_linear(x, layer.qweight, layer.scales, None if symmetric else layer.offsets, **kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_four_bit_step_equals_the_quantized_layers_forward(monkeypatch):
    """The 4-bit weights through the step (one row) against the same quantized layers' own forward, whose
    products round their input to 8 bits as the step's kernel does (as they do on a GPU; on the CPU they would
    not round)."""
    from voxtral_realtime.quantization import QuantizedLinear

    monkeypatch.setattr(QuantizedLinear, "forward", lambda self, x: one_row_product(
        x.reshape(1, -1), self.qweight, self.scales, self.offsets).reshape(*x.shape[:-1], -1))

    decoder = TextDecoder(CFG)
    _randomize(decoder, seed=2)
    layer: DecoderLayer = decoder.layers[1]
    for module, name in ((layer.attention, "wqkv"), (layer.attention, "wo"), (layer.feed_forward, "w13"),
                         (layer.feed_forward, "w2")):
        setattr(module, name, QuantizedLinear.from_float(getattr(module, name).weight.detach(), "q4_0"))
    decoder = decoder.to(DEVICE)
    assert layer.step_weights()
    plain, fused = _history(decoder, 1, [4], torch.float32), _history(decoder, 1, [4], torch.float32)
    positions, rows = torch.tensor([[4]], device=DEVICE), slice(0, 1)
    enabled = torch.tensor([True], device=DEVICE)
    x = torch.randn(1, CFG.dim, device=DEVICE)
    scale = 1 + 0.2 * torch.randn(CFG.dim, device=DEVICE)
    plain_ctx = AttentionContext.prepare(decoder.rotary, plain, positions, torch.float32, rows=rows, enabled=enabled)
    expected = layer(x[:, None], plain_ctx, 1, scale)[:, 0]
    got = layer.step(x, _kernel_context(decoder, fused, positions, enabled, rows), 1, scale, pdl=False)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_four_bit_decoder_with_a_four_bit_head_equals_the_quantized_forward(monkeypatch):
    """Two 4-bit layers and a 4-bit LM head (the final norm folded into the head's product) through
    TextDecoder.forward's fused steps against the same quantized modules' plain forward, whose products round
    their input as the step's kernels do."""
    from voxtral_realtime.quantization import QuantizedEmbedding, QuantizedLinear

    monkeypatch.setattr(QuantizedLinear, "forward", lambda self, x: one_row_product(
        x.reshape(-1, x.shape[-1]), self.qweight, self.scales, self.offsets).reshape(*x.shape[:-1], -1))
    decoder = TextDecoder(CFG)
    _randomize(decoder, seed=4)
    four_bit = lambda linear: QuantizedLinear.from_float(linear.weight.detach(), "q4_0")
    for layer in decoder.layers:
        attention, ffn = layer.attention, layer.feed_forward
        attention.wqkv, attention.wo, ffn.w13, ffn.w2 = map(four_bit, (attention.wqkv, attention.wo, ffn.w13, ffn.w2))
    decoder.tok_embeddings = QuantizedEmbedding(four_bit(decoder.tok_embeddings), torch.float32)
    decoder = decoder.to(DEVICE)
    products = []
    monkeypatch.setattr(kernels, "fused_q4_linear", lambda *a, fused=kernels.fused_q4_linear, **k: products.append(
        (a[1].shape[0], k.get("norm") is not None)) or fused(*a, **k))
    caches = [_history(decoder, 1, [5], torch.float32) for _ in range(2)]
    positions, rows = torch.tensor([[5]], device=DEVICE), slice(0, 1)
    enabled = torch.tensor([True], device=DEVICE)
    tokens, audio = torch.tensor([[7]], device=DEVICE), torch.randn(1, 1, CFG.dim, device=DEVICE)
    scales = decoder.ffn_scales(3)
    decoder.fused_step = False
    expected = decoder(tokens, audio, positions, caches[0], scales, rows=rows, enabled=enabled)
    decoder.fused_step = True
    with mock.patch.object(kernels, "decode_attention_available", lambda device: True):
        got = decoder(tokens, audio, positions, caches[1], scales, rows=rows, enabled=enabled)
    assert len(products) == 9 and products[-1] == (CFG.vocab_size, True)  # 4 per layer, the head with the norm
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
