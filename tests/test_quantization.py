"""Block formats against the gguf package (bytes, bit-exact dequantization, error bounds) and the modules that
compute with them: the GPU-facing QuantizedLinear layout, Q8Linear, the CPU int4 kernel, the quantized table."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from voxtral_realtime import quantization as Q
from voxtral_realtime.errors import UsageError

TYPES = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q8_0": gguf.GGMLQuantizationType.Q8_0,
         "q4_k": gguf.GGMLQuantizationType.Q4_K}


def weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Gaussian rows of scales spread over 3 decades, plus the rows a quantizer gets wrong first: all zeros, a
    constant, a constant negative, one outlier, ties for the largest magnitude, tiny values."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g).mul(7).exp() / 100
    w[0] = 0
    w[1] = 1.5
    w[2] = -2.0
    w[3, :] = 0.01
    w[3, 7] = 9.0
    w[4, :2] = torch.tensor([0.5, -0.5])  # equal magnitudes: the first one decides Q4_0's sign
    w[5] = w[5] * 1e-6
    return w


def as_uint32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def same_bits(ours: np.ndarray, theirs: np.ndarray) -> bool:
    """Bit for bit, except that a NaN only has to be a NaN (numpy and torch propagate NaN payloads differently)."""
    nan = np.isnan(ours)
    return bool(np.array_equal(nan, np.isnan(theirs)) and np.array_equal(as_uint32(ours)[~nan], as_uint32(theirs)[~nan]))


def test_formats_match_the_gguf_package():
    for name, qtype in TYPES.items():
        fmt = Q.FORMATS[name]
        assert fmt.ggml_type == qtype.value
        assert (fmt.block_values, fmt.block_bytes) == gguf.GGML_QUANT_SIZES[qtype]


@pytest.mark.parametrize("name", ["q4_0", "q8_0"])
def test_quantize_bytes_equal_ggml_reference_quantizer(name):
    w = weights(64, 512, seed=1)
    ours = Q.quantize_blocks(w, name).numpy()
    theirs = gguf.quants.quantize(w.numpy(), TYPES[name])
    assert ours.dtype == theirs.dtype == np.uint8
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("name", ["q4_0", "q8_0", "q4_k"])
def test_dequantize_bit_exact_on_quantized_weights(name):
    data = Q.quantize_blocks(weights(64, 1024, seed=2), name)
    ours = Q.dequantize_blocks(data, name).numpy()
    theirs = gguf.quants.dequantize(data.numpy(), TYPES[name])
    assert np.array_equal(as_uint32(ours), as_uint32(theirs))


@pytest.mark.parametrize("name", ["q4_0", "q8_0", "q4_k"])
def test_dequantize_bit_exact_on_random_bytes(name):
    """Any bytes at all: subnormal, huge, infinite and NaN scales included (compared as bit patterns)."""
    fmt = Q.FORMATS[name]
    data = torch.randint(0, 256, (48, 4 * fmt.block_bytes), generator=torch.Generator().manual_seed(3),
                         dtype=torch.uint8)
    ours = Q.dequantize_blocks(data, name).numpy()
    with np.errstate(invalid="ignore"):
        theirs = gguf.quants.dequantize(data.numpy(), TYPES[name])
    assert same_bits(ours, theirs)


def test_q4_0_error_is_at_most_one_step_per_block():
    """Q4_0 maps the signed extreme to q = 0 (-8 d): values on the other side clamp at +7 d, so the bound is one
    step |d| (half a step elsewhere), plus the f16 rounding of d carried by |q - 8| <= 8."""
    w = weights(64, 1024, seed=4)
    data = Q.quantize_blocks(w, "q4_0")
    err = (Q.dequantize_blocks(data, "q4_0") - w).abs().reshape(-1, 32).amax(-1)
    d_exact = w.reshape(-1, 32).gather(-1, w.reshape(-1, 32).abs().argmax(-1, keepdim=True)).squeeze(-1).abs() / 8
    d_stored = Q._f16_from_bytes(data.reshape(-1, 18)[:, :2]).squeeze(-1).abs()
    assert (err <= d_exact + 8 * (d_stored - d_exact).abs() + 1e-12).all()
    assert err.max() > 0.4 * d_exact.max()  # the bound is not vacuous


def test_q8_0_error_is_half_a_step_per_block():
    w = weights(64, 1024, seed=5)
    data = Q.quantize_blocks(w, "q8_0")
    err = (Q.dequantize_blocks(data, "q8_0") - w).abs().reshape(-1, 32).amax(-1)
    d_exact = w.reshape(-1, 32).abs().amax(-1) / 127
    d_stored = Q._f16_from_bytes(data.reshape(-1, 34)[:, :2]).squeeze(-1)
    assert (err <= d_exact / 2 + 127 * (d_stored - d_exact).abs() + 1e-12).all()


def test_q4_k_error_bound_and_better_than_q4_0():
    """Our Q4_K quantizer (weighted least-squares fit of scale and min per 32 values, then 6-bit multiples of the
    super-block's d and dmin) errs by at most one level of the sub-block's own span [min(x, 0), max(x)] / 15,
    plus what the 6-bit factors add (|scale - d sc| <= d/2 over 15 levels, |min - dmin m| <= dmin/2) and what
    f16 cannot hold of d and dmin (2^-24, its smallest step, times 63 levels of sc and 15 of q).  On the
    Gaussian rows, where sub-blocks have like scales, the level alone bounds it, and the RMS error beats Q4_0's."""
    w = weights(128, 1024, seed=6)
    data = Q.quantize_blocks(w, "q4_k")
    deq = Q.dequantize_blocks(data, "q4_k")
    sub = w.reshape(128, -1, 8, 32)
    level = (sub.amax(-1) - sub.amin(-1).clamp(max=0)) / 15
    err = (deq - w).abs().reshape(128, -1, 8, 32).amax(-1)
    d, dmin, *_ = Q._q4_k_fields(data.reshape(-1, 144))
    factors = (7.5 * d + 0.5 * dmin).reshape(128, -1, 1) + 2.0 ** -24 * 63 * 16
    tiny = 1e-6 * sub.abs().amax(-1)
    assert (err <= level + factors + tiny).all()
    rows = slice(8, None)  # the Gaussian rows
    assert (err[rows] <= level[rows] + tiny[rows]).all()
    q4_0 = Q.dequantize_blocks(Q.quantize_blocks(w[rows], "q4_0"), "q4_0")
    rms_k = ((deq[rows] - w[rows]) / w[rows].std(-1, keepdim=True)).pow(2).mean().sqrt()
    rms_0 = ((q4_0 - w[rows]) / w[rows].std(-1, keepdim=True)).pow(2).mean().sqrt()
    assert rms_k < 0.9 * rms_0


def _reference_q4_k_sub_block_fit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Q4_K search as first written: one candidate step at a time, keeping the best so far (the library
    computes all candidates at once, on cache-sized chunks, and must give the same bits)."""
    lo = x.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = x.amax(dim=-1, keepdim=True)
    span = hi - lo
    shifted = x - lo
    weight = x.abs() + x.pow(2).mean(dim=-1, keepdim=True).sqrt()
    weighted_x = weight * x
    sw = weight.sum(-1, keepdim=True)
    swx = weighted_x.sum(-1, keepdim=True)
    swx2 = (weighted_x * x).sum(-1, keepdim=True)
    best_err = torch.full_like(lo, float("inf"))
    best_scale, best_min = span / 15, -lo
    for levels in Q._Q4_K_STEP_GRID:
        inv_step = torch.where(span > 0, levels / span, torch.zeros_like(span))
        q = (shifted * inv_step).round_().clamp_(0, 15)
        weighted_q = weight * q
        swq = weighted_q.sum(-1, keepdim=True)
        swq2 = (weighted_q * q).sum(-1, keepdim=True)
        swqx = (q * weighted_x).sum(-1, keepdim=True)
        det = sw * swq2 - swq * swq
        safe_det = torch.where(det > 0, det, torch.ones_like(det))
        scale_alone = torch.where(swq2 > 0, swqx / swq2.clamp(min=1e-30), torch.zeros_like(swq2))
        scale = torch.where(det > 0, (sw * swqx - swq * swx) / safe_det, scale_alone)
        offset = torch.where(det > 0, (swq2 * swx - swq * swqx) / safe_det,
                             torch.where(swq2 > 0, torch.zeros_like(sw), swx / sw.clamp(min=1e-30)))
        positive = offset > 0
        scale = torch.where(positive, scale_alone, scale).clamp(min=0)
        offset = torch.where(positive, torch.zeros_like(offset), offset)
        err = (scale * scale * swq2 + 2 * scale * offset * swq + offset * offset * sw
               - 2 * scale * swqx - 2 * offset * swx + swx2)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_min = torch.where(better, -offset, best_min)
    return best_scale.squeeze(-1), best_min.squeeze(-1)


@pytest.mark.parametrize("seed", [7, 8])
def test_q4_k_bytes_equal_the_one_candidate_at_a_time_search(monkeypatch, seed):
    """Same bytes as the reference search, whatever the chunking; non-finite values included."""
    w = weights(96, 768, seed=seed)
    w[6, 3], w[7, 300], w[8, 500] = float("inf"), float("nan"), -float("inf")
    w[9] = w[9].round()  # many equal levels: ties between candidates
    monkeypatch.setattr(Q, "_Q4_K_CPU_CHUNK_VALUES_PER_THREAD", 3 * 768)  # many chunks, a short last one
    fast = Q.quantize_blocks(w, "q4_k")
    monkeypatch.setattr(Q, "_q4_k_sub_block_fit", _reference_q4_k_sub_block_fit)
    monkeypatch.setattr(Q, "_Q4_K_CPU_CHUNK_VALUES_PER_THREAD", 1 << 20)
    assert torch.equal(fast, Q.quantize_blocks(w, "q4_k"))


def test_quantized_linear_layout_is_the_kernel_contract():
    """qweight byte b of group g holds value 32g + b (low nibble) and 32g + 16 + b (high); value = scales*q +
    offsets: built from known levels and checked nibble by nibble."""
    rows, cols = 4, 96
    g = torch.Generator().manual_seed(7)
    q = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.uint8)
    d = torch.rand(rows, cols // 32, generator=g).half()
    blocks = torch.cat([d.reshape(-1, 1).view(torch.uint8).reshape(-1, 2),
                        Q._pack_nibbles_halves(q.reshape(-1, 32))], dim=-1).reshape(rows, -1)
    layer = Q.QuantizedLinear.from_blocks(blocks, "q4_0")
    assert layer.qweight.shape == (rows, cols // 2) and layer.qweight.dtype == torch.uint8
    assert layer.scales.shape == layer.offsets.shape == (rows, cols // 32)
    assert layer.scales.dtype == layer.offsets.dtype == torch.float16
    for group in range(cols // 32):
        for b in range(16):
            byte = layer.qweight[:, 16 * group + b]
            assert torch.equal(byte & 15, q[:, 32 * group + b])
            assert torch.equal(byte >> 4, q[:, 32 * group + 16 + b])
    assert torch.equal(layer.scales, d) and torch.equal(layer.offsets, -8 * d)


def test_quantized_linear_dequantize_q4_0_equals_gguf_exactly():
    """scales*q + offsets with offset = -8d is d*(q - 8) exactly (only the sign of a zero can differ)."""
    data = Q.quantize_blocks(weights(32, 256, seed=8), "q4_0")
    ours = Q.QuantizedLinear.from_blocks(data, "q4_0").dequantize().numpy()
    theirs = gguf.quants.dequantize(data.numpy(), TYPES["q4_0"])
    assert np.array_equal(ours, theirs)
    assert np.array_equal(as_uint32(ours)[ours != 0], as_uint32(theirs)[theirs != 0])


def test_quantized_linear_q4_k_differs_from_gguf_only_by_f16_factors():
    """The layout keeps d*sc and dmin*m per sub-block in f16: each value moves by at most 2^-11 of |step * q| +
    |shift|, and nowhere else."""
    data = Q.quantize_blocks(weights(32, 512, seed=9), "q4_k")
    exact = torch.from_numpy(gguf.quants.dequantize(data.numpy(), TYPES["q4_k"])).reshape(32, -1, 32)
    ours = Q.QuantizedLinear.from_blocks(data, "q4_k").dequantize().reshape(32, -1, 32)
    d, dmin, sc, m, q = Q._q4_k_fields(data.reshape(-1, 144))
    step, shift = (d * sc).reshape(32, -1, 1), (dmin * m).reshape(32, -1, 1)
    bound = 2.0 ** -11 * (step * q.reshape(32, -1, 32).float() + shift) + 1e-30
    assert ((ours - exact).abs() <= bound).all()


@pytest.mark.parametrize("name", ["q4_0", "q4_k", "q8_0"])
def test_torch_forward_equals_dequantize_then_matmul(name):
    w, bias = weights(80, 512, seed=10), torch.randn(80)
    layer = Q.quantize_linear(w, name, bias)
    x = torch.randn(3, 5, 512)
    expected = F.linear(x, layer.dequantize(), bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_q8_linear_dequantize_bit_exact_with_gguf():
    data = Q.quantize_blocks(weights(32, 256, seed=11), "q8_0")
    ours = Q.Q8Linear.from_blocks(data).dequantize().numpy()
    assert np.array_equal(as_uint32(ours), as_uint32(gguf.quants.dequantize(data.numpy(), TYPES["q8_0"])))


def test_dtype_casts_keep_the_f16_block_scales():
    layer = Q.quantize_linear(weights(32, 64, seed=12), "q4_0", torch.randn(32))
    scales = layer.scales.clone()
    layer.to(torch.bfloat16)
    assert layer.scales.dtype == torch.float16 and torch.equal(layer.scales, scales)
    assert layer.bias.dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["q4_0", "q4_k"])
def test_cpu_int4_kernel_equals_dequantize_then_matmul(name):
    """Documented tolerance: the kernel rounds its scales, the activations and the result to bf16 (2^-9 relative
    each).  Against an exact emulation of those roundings it agrees to float32 accumulation order."""
    w, bias = weights(96, 512, seed=13)[8:], torch.randn(88)  # the Gaussian rows
    w = torch.cat([w, w[:8]])  # 96 rows: the kernel wants multiples of 16
    bias = torch.cat([bias, bias[:8]])
    layer = Q.QuantizedLinear.from_float(w, name, bias)
    cpu = Q.CpuInt4Linear.from_quantized(layer)
    x = torch.randn(7, 512)
    got = cpu(x)
    exact = F.linear(x, layer.dequantize(), bias)
    assert ((got - exact).norm() / exact.norm()) < 1e-2
    # The emulation: bf16 scale/zero pairs, bf16 inputs, float32 products, a bf16 result, then the bias.
    scales = layer.scales.float().bfloat16().float()
    zeros = (layer.offsets.float() + 8 * layer.scales.float()).bfloat16().float()
    q = Q._unpack_qweight(layer.qweight).float().reshape(96, -1, 32)
    weight = ((q - 8) * scales[..., None] + zeros[..., None]).reshape(96, -1)
    emulated = (x.bfloat16().float() @ weight.t()).bfloat16().float() + bias
    torch.testing.assert_close(got, emulated, rtol=8e-3, atol=1e-3)
    # The packing itself is lossless: the kernel's weights are exactly the emulated ones.
    assert torch.equal(cpu.dequantize(), weight)


def test_cpu_packing_in_row_chunks_equals_packing_whole(monkeypatch):
    """The loader packs big tables a few thousand rows at a time; torch's layout must not notice."""
    monkeypatch.setattr(Q, "_PACK_ROWS", 128)
    layer = Q.QuantizedLinear.from_float(weights(304, 96, seed=15), "q4_0")  # 2 chunks and a 48-row rest
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(Q._unpack_qweight(layer.qweight).to(torch.int32), 1)
    assert torch.equal(Q._pack_for_cpu(layer.qweight), whole)


def test_quantized_embedding_rows_and_tied_head():
    table = weights(64, 96, seed=14)
    for name in ["q4_0", "q8_0"]:
        layer = Q.quantize_linear(table, name)
        embedding = Q.QuantizedEmbedding(layer, torch.float32)
        tokens = torch.tensor([[3, 0, 63], [5, 5, 1]])
        assert torch.equal(embedding(tokens), layer.dequantize()[tokens])
        h = torch.randn(2, 96)
        torch.testing.assert_close(embedding.logits(h), h @ layer.dequantize().t(), rtol=1e-5, atol=1e-5)


def test_cpu_token_table_is_held_once_and_its_rows_read_from_the_packed_layout(monkeypatch):
    """Without onnxruntime the CPU's 4-bit table is one CpuInt4Linear: the LM head's packed int4 bytes are also
    where the lookups read their rows (three 64-row groups and a 16-row rest, lookups in each)."""
    monkeypatch.setattr(Q.cpu_kernels, "available", lambda: False)
    layer = Q.quantize_linear(weights(208, 96, seed=16), "q4_0")
    network = torch.nn.Module()
    network.decoder = torch.nn.Module()
    network.decoder.tok_embeddings = Q.QuantizedEmbedding(layer, torch.float32)
    network.layers_version = 0
    Q.use_cpu_int4_kernels(network)
    embedding = network.decoder.tok_embeddings
    assert isinstance(embedding.table, Q.CpuInt4Linear) and len(list(embedding.buffers())) == 2  # bytes, scales
    scales = layer.scales.float().bfloat16().float()  # the kernel's rounding of the scale/zero pairs
    zeros = (layer.offsets.float() + 8 * layer.scales.float()).bfloat16().float()
    q = Q._unpack_qweight(layer.qweight).float().reshape(208, -1, 32)
    weight = ((q - 8) * scales[..., None] + zeros[..., None]).reshape(208, -1)
    tokens = torch.tensor([[0, 63, 64, 130], [191, 192, 207, 5]])
    assert torch.equal(embedding(tokens), weight[tokens])
    h = torch.randn(2, 96)
    torch.testing.assert_close(embedding.logits(h), (h.bfloat16().float() @ weight.t()).bfloat16().float(),
                               rtol=8e-3, atol=1e-3)


def test_bad_type_is_a_usage_error_and_a_bad_row_length_a_value_error():
    with pytest.raises(UsageError, match="unknown quantization type"):
        Q.quantize_blocks(torch.zeros(2, 32), "q5_0")
    with pytest.raises(ValueError, match="not a whole number"):
        Q.quantize_blocks(torch.zeros(2, 48), "q4_0")
    assert Q.linear_qtype("q4_k", 32) == "q4_0" and Q.linear_qtype("q4_k", 512) == "q4_k"
