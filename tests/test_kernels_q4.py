"""The 4-bit matmul kernels against dequantize-then-matmul in float32.

On a GPU: every weight shape of the full-size decoder, batches 1..1024, bf16 activations, and output memory that
was poisoned with NaN before the call.  Without one: small shapes in Triton's interpreter on the CPU (the layout
and index arithmetic are the same code).
"""

from __future__ import annotations

import pytest
import torch

from voxtral_realtime import kernels
from voxtral_realtime.kernels import MatmulConfig

pytestmark = pytest.mark.skipif(kernels.common.triton is None, reason="needs Triton (GPU, or its CPU interpreter)")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
#: the decoder's (N, K): wqkv, wo, w13, w2, LM head (see bench/tune_gemv.py)
MODEL_SHAPES = [(6144, 3072), (3072, 4096), (18432, 3072), (3072, 9216), (131072, 3072)]


def random_q4(n: int, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=DEVICE, generator=generator)
    scales = (torch.rand(n, k // 32, device=DEVICE, generator=generator) * 0.05).half()
    offsets = (torch.randn(n, k // 32, device=DEVICE, generator=generator) * 0.1).half()
    return q, scales, offsets


def dequantize(q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The layout, stated independently of the kernel: in each group of 32 values byte b holds value b (low
    nibble) and value 16 + b (high nibble); w = scale * q + offset."""
    n, k = q.shape[0], 2 * q.shape[1]
    groups = q.view(n, k // 32, 16)
    values = torch.cat([groups & 15, groups >> 4], dim=-1).float()
    return (values * scales.float()[..., None] + offsets.float()[..., None]).reshape(n, k)


def one_row_product(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """What the one-row kernel computes, stated in PyTorch: x [1, K] rounded to 8 bits per group of 32 values
    (step = max|x| / 127, xq = floor(x / step + 0.5)) times the weight, plus the rounding error times each group's
    weight at the middle nibble (8 scale + offset): the error so meets only the nibbles' deviation from 8."""
    groups = x.float().unflatten(-1, (-1, 32))
    biggest = groups.abs().amax(-1, keepdim=True)
    xq = torch.floor(groups * torch.where(biggest > 0, 127.0 / biggest, torch.zeros_like(biggest)) + 0.5)
    rounded = xq * biggest / 127.0
    middle = (8 * scales.float() + offsets.float()).repeat_interleave(32, dim=1)
    return rounded.flatten(-2) @ dequantize(q, scales, offsets).T + (groups - rounded).flatten(-2) @ middle.T


def _poison() -> None:
    """Fill freed cached GPU memory with NaN so that an output element the kernel forgets to write shows."""
    if CUDA:
        junk = torch.full((1 << 28,), float("nan"), device=DEVICE)
        del junk


def _relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return (out.float() - expected).abs().max().item() / expected.abs().max().item()


SHAPES = MODEL_SHAPES if CUDA else [(48, 96), (64, 256)]
ROWS = [1, 2, 7, 16, 64, 256, 1024] if CUDA else [1, 3, 17]


@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_quantized_matmul_matches_dequantize_then_matmul(n, k):
    generator = torch.Generator(device=DEVICE).manual_seed(n + k)
    q, scales, offsets = random_q4(n, k, generator)
    weight = dequantize(q, scales, offsets)
    dtype = torch.bfloat16 if CUDA else torch.float32
    for m in ROWS:
        x = torch.randn(m, k, device=DEVICE, generator=generator).to(dtype)
        _poison()
        out = kernels.quantized_matmul(x, q, scales, offsets)
        assert out.shape == (m, n) and out.dtype == dtype
        assert torch.isfinite(out).all()
        assert _relative_error(out, x.float() @ weight.T) <= 1e-2, m


@pytest.mark.parametrize(("n", "k"), [(48, 96), (24, 5120), *(MODEL_SHAPES[:4] if CUDA else [])])
def test_dequantize_kernel_is_exact(n, k):
    """The dequantizing kernel (the many-row path) against the layout stated in PyTorch: bit for bit in float32
    (scale * q is exact there), and rounded once to bfloat16 on a GPU."""
    generator = torch.Generator(device=DEVICE).manual_seed(n)
    q, scales, offsets = random_q4(n, k, generator)
    expected = dequantize(q, scales, offsets)
    assert torch.equal(kernels.q4_dequantize(q, scales, offsets, torch.float32), expected)
    if CUDA:
        assert torch.equal(kernels.q4_dequantize(q, scales, offsets, torch.bfloat16), expected.to(torch.bfloat16))


@pytest.mark.parametrize("config", [
    MatmulConfig(block_n=16, block_k=64),
    MatmulConfig(block_n=8, block_k=32),
    MatmulConfig(block_n=1, block_k=128, num_warps=8),
])
def test_every_one_row_tiling(config):
    generator = torch.Generator(device=DEVICE).manual_seed(1)
    n, k = 32, 128
    q, scales, offsets = random_q4(n, k, generator)
    x = torch.randn(1, k, device=DEVICE, generator=generator)
    out = kernels.fused_q4_linear(x, q, scales, offsets, config=config)
    # x rounded to 8 bits: exactly that arithmetic, and within 1e-2 of the unrounded product
    assert _relative_error(out, one_row_product(x, q, scales, offsets)) <= (1e-4 if CUDA else 1e-5)
    assert _relative_error(out, x @ dequantize(q, scales, offsets).T) <= 1e-2


def test_leading_dimensions_and_bias():
    generator = torch.Generator(device=DEVICE).manual_seed(3)
    q, scales, offsets = random_q4(32, 64, generator)
    bias = torch.randn(32, device=DEVICE, generator=generator)
    x = torch.randn(2, 3, 64, device=DEVICE, generator=generator)
    out = kernels.quantized_matmul(x, q, scales, offsets, bias)
    expected = x @ dequantize(q, scales, offsets).T + bias
    assert out.shape == (2, 3, 32)
    assert _relative_error(out, expected) <= (1e-2 if CUDA else 1e-5)


@pytest.mark.parametrize("qtype", ["q4_0", "q4_k"])
def test_kernel_reads_what_the_quantizer_writes(qtype):
    """A QuantizedLinear made by the GGUF quantizer, through the kernel: equals its own dequantized weight."""
    from voxtral_realtime.quantization import QuantizedLinear

    generator = torch.Generator(device=DEVICE).manual_seed(4)
    weight = torch.randn(32, 256, device=DEVICE, generator=generator)
    bias = torch.randn(32, device=DEVICE, generator=generator)
    layer = QuantizedLinear.from_float(weight, qtype, bias)
    x = torch.randn(3, 256, device=DEVICE, generator=generator)
    out = kernels.quantized_matmul(x, layer.qweight, layer.scales, layer.offsets, layer.bias)
    assert _relative_error(out, x @ layer.dequantize().T + bias) <= (1e-2 if CUDA else 1e-5)
    assert _relative_error(out, x @ weight.T + bias) <= 0.2  # and it is the weight, to 4 bits


def test_a_long_weight_is_dequantized_in_slices(monkeypatch):
    """A weight longer than DEQUANTIZED_VALUES (the LM head) is dequantized and multiplied slice by slice: the same
    product, with no dense copy of more than the bound."""
    generator = torch.Generator(device=DEVICE).manual_seed(5)
    q, scales, offsets = random_q4(80, 256, generator)
    x = torch.randn(3, 256, device=DEVICE, generator=generator)
    made = []
    monkeypatch.setattr(kernels.q4, "DEQUANTIZED_VALUES", 32 * 256)
    monkeypatch.setattr(kernels.q4, "q4_dequantize", lambda *a, real=kernels.q4_dequantize: made.append(
        a[0].shape[0]) or real(*a))
    out = kernels.quantized_matmul(x, q, scales, offsets)
    assert made == [32, 32, 16]
    assert _relative_error(out, x @ dequantize(q, scales, offsets).T) <= (1e-2 if CUDA else 1e-5)
