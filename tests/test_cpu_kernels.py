"""The CPU kernel for block-quantized layers (onnxruntime's MatMulNBits with int8 activations) against
dequantize-then-matmul, on every shape class the model has, and its token-table lookups."""

from __future__ import annotations

import pytest
import torch

from voxtral_realtime import cpu_kernels
from voxtral_realtime import quantization as Q

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="onnxruntime is not installed")


def weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g).mul(3).exp() / 20
    w[0] = 0  # an all-zero row, and a row with one outlier per block
    w[1, ::32] = 3.0
    return w


def reference(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = x.double() @ layer.dequantize().double().t()
    return out + layer.bias.double() if layer.bias is not None else out


# (rows of activations, out_features, in_features): one new position, a live step's 4 encoder frames, a prompt,
# an offline chunk; square, wide, tall; a row count above the bound buffers; out_features not a multiple of 16
SHAPES = [(1, 64, 256), (4, 96, 512), (9, 40, 256), (17, 256, 768), (130, 48, 1024), (1, 1000, 256)]


@pytest.mark.parametrize("qtype", ["q4_0", "q4_k", "q8_0"])
@pytest.mark.parametrize("rows,out_features,in_features", SHAPES)
def test_product_matches_dequantize_then_matmul(qtype, rows, out_features, in_features):
    if Q.linear_qtype(qtype, in_features) != qtype:
        pytest.skip(f"{qtype} needs rows of whole super-blocks")
    bias = torch.randn(out_features) if rows % 2 else None
    layer = Q.quantize_linear(weights(out_features, in_features, seed=rows), qtype, bias)
    fast = cpu_kernels.OnnxQuantizedLinear.from_quantized(layer)
    x = torch.randn(2, rows, in_features)  # leading dimensions are kept
    y = fast(x)
    assert y.shape == (2, rows, out_features) and y.dtype == x.dtype
    want = reference(layer, x)
    # int8 activations per block of 32: each product carries at most 1/254 of its block's largest |x| per value
    error = (y.double() - want).abs().max() / want.abs().max()
    assert error < 2e-2, error
    assert torch.equal(fast(x), y)  # the bound buffers are not shared between calls' results
    y2 = fast(x[:, :1])
    torch.testing.assert_close(y2, y[:, :1], rtol=0, atol=0)


def test_bfloat16_activations_come_back_in_bfloat16():
    layer = Q.quantize_linear(weights(32, 64, seed=3), "q4_0")
    fast = cpu_kernels.OnnxQuantizedLinear.from_quantized(layer)
    x = torch.randn(3, 64).bfloat16()
    y = fast(x)
    assert y.dtype == torch.bfloat16
    want = reference(layer, x.float())
    assert ((y.double() - want).abs().max() / want.abs().max()) < 3e-2


@pytest.mark.parametrize("qtype", ["q4_0", "q4_k", "q8_0"])
def test_token_table_rows_and_head(qtype):
    """A token table keeps the operator's layout for lookups: Q4_0 and Q8_0 rows are the layer's exactly; Q4_K's
    carry its per-group rest in bf16 (relative 2^-9 of a group's offset + 8 scale)."""
    layer = Q.quantize_linear(weights(300, 256, seed=5), qtype)
    fast = cpu_kernels.OnnxQuantizedLinear.from_quantized(layer, keep_rows=True)
    index = torch.tensor([0, 1, 299, 17, 17])
    rows = fast.rows(index)
    if qtype == "q4_k":
        torch.testing.assert_close(rows, layer.dequantize()[index], rtol=0, atol=2e-2 * layer.dequantize().abs().max())
    else:
        assert torch.equal(rows, layer.dequantize()[index])
    embedding = Q.QuantizedEmbedding(fast, torch.float32)
    assert torch.equal(embedding(index[None]), rows[None])
    h = torch.randn(2, 256)
    want = reference(layer, h)
    assert ((embedding.logits(h).double() - want).abs().max() / want.abs().max()) < 2e-2


def test_layers_without_the_table_hold_no_copy_of_the_weight():
    layer = Q.quantize_linear(weights(64, 256, seed=7), "q4_0")
    fast = cpu_kernels.OnnxQuantizedLinear.from_quantized(layer)
    assert [name for name, b in fast.named_buffers()] == []  # the weight lives inside onnxruntime only
    assert fast.weight_bytes == 64 * 256 // 32 * 18
    with pytest.raises(RuntimeError, match="keep_rows"):
        fast.rows(torch.tensor([0]))


def test_torch_kernel_is_chosen_on_request(monkeypatch):
    monkeypatch.setenv("VOXTRAL_CPU_KERNEL", "torch")
    cpu_kernels.available.cache_clear()
    try:
        layer = Q.quantize_linear(weights(64, 256, seed=8), "q4_0")
        assert isinstance(Q.cpu_layer(layer), Q.CpuInt4Linear)
    finally:
        monkeypatch.delenv("VOXTRAL_CPU_KERNEL")
        cpu_kernels.available.cache_clear()
    assert isinstance(Q.cpu_layer(layer), cpu_kernels.OnnxQuantizedLinear)
