"""The Triton decode-attention kernel against plain PyTorch attention over the same KV rings (on a GPU, or
small cases in Triton's CPU interpreter)."""

from __future__ import annotations

import math

import pytest
import torch

from voxtral_realtime import kernels
from voxtral_realtime.layers import KVCache

pytestmark = pytest.mark.skipif(kernels.common.triton is None, reason="needs Triton (GPU, or its CPU interpreter)")
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def _filled_cache(rows: int, heads_kv: int, dim: int, window: int, lengths: list[int], dtype: torch.dtype,
                  generator: torch.Generator) -> KVCache:
    """A cache whose row r holds ``lengths[r]`` positions written one at a time (rings wrap past the window)."""
    cache = KVCache.empty(1, rows, heads_kv, dim, window=window, max_chunk=1, device=DEVICE,
                          dtype=dtype, preallocate=True)
    for r, n in enumerate(lengths):
        for p in range(n):
            pos = torch.tensor([[p]], device=DEVICE)
            columns, _ = cache.advance(pos, rows=slice(r, r + 1), with_mask=False)
            k = torch.randn(1, heads_kv, 1, dim, device=DEVICE, generator=generator).to(dtype)
            v = torch.randn(1, heads_kv, 1, dim, device=DEVICE, generator=generator).to(dtype)
            cache.write(0, k, v, cache.write_index(columns, slice(r, r + 1)))
    return cache


def _reference(q, cache: KVCache, qpos, row_start):
    """Float32 attention of each row's query over the columns its position may see (zeros for qpos -1)."""
    batch, heads, _, dim = q.shape
    keys = cache.keys[0][row_start:row_start + batch].float()
    values = cache.values[0][row_start:row_start + batch].float()
    group = heads // keys.shape[1]
    grouped = q.float().reshape(batch, keys.shape[1], group, dim)
    held = cache.positions[row_start:row_start + batch]
    pos = qpos[:, None]
    visible = ((held >= 0) & (held <= pos) & (held > pos - cache.window))[:, None, None, :]
    scores = torch.einsum("bhgd,bhcd->bhgc", grouped, keys) / math.sqrt(dim)
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhgc,bhcd->bhgd", weights, values).reshape(batch, heads, 1, dim)
    return torch.where(qpos[:, None, None, None] >= 0, out, 0.0)


GPU_ONLY = pytest.mark.skipif(not CUDA, reason="GPU only (the interpreter has no bfloat16; big cases are slow)")


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=GPU_ONLY)])
@pytest.mark.parametrize(("heads", "heads_kv", "dim", "window"), [
    (8, 2, 16, 10), pytest.param(32, 8, 128, 300, marks=GPU_ONLY), (4, 4, 64, 40)])
def test_matches_reference_on_rings_of_every_state(dtype, heads, heads_kv, dim, window):
    generator = torch.Generator(device=DEVICE).manual_seed(heads * dim + window)
    lengths = [0, 1, 5, window - 1, window, window + 3, 3 * window + 7]  # empty, short, full, wrapped
    cache = _filled_cache(len(lengths) + 1, heads_kv, dim, window, lengths + [2], dtype, generator)
    row_start = 1  # a batch that starts at an inner row, as engine calls over a bucket do not
    qpos = torch.tensor([n for n in lengths[1:]] + [-1], device=DEVICE)  # next position; last row disabled
    qpos = torch.where(qpos > 0, qpos - 1, qpos)  # query the newest written position (it sees itself)
    q = torch.randn(len(qpos), heads, 1, dim, device=DEVICE, generator=generator).to(dtype)
    out = kernels.decode_attention(q, cache.keys[0], cache.values[0], cache.positions, qpos, row_start,
                                   cache.capacity, cache.window)
    expected = _reference(q, cache, qpos, row_start)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.isfinite(out).all()
    assert (out.float() - expected).abs().max().item() <= tolerance * max(1.0, expected.abs().max().item())
    assert out[-1].abs().max().item() == 0  # the disabled row
    # the splits' last program combines, told by counts that it leaves at zero for the next call
    assert kernels.attention._split_counts(DEVICE, kernels.attention.SPLIT_TARGET_PROGRAMS // 2).eq(0).all()
    again = kernels.decode_attention(q, cache.keys[0], cache.values[0], cache.positions, qpos, row_start,
                                     cache.capacity, cache.window)
    torch.testing.assert_close(again, out, rtol=0, atol=0)


@GPU_ONLY
@pytest.mark.parametrize("batch", [1, 7, 64, 256])
def test_batches_of_streams_at_different_positions(batch):
    generator = torch.Generator(device=DEVICE).manual_seed(batch)
    heads, heads_kv, dim, window = 32, 8, 128, 8192
    cache = KVCache.empty(1, batch, heads_kv, dim, window=window, max_chunk=64, device=DEVICE,
                          dtype=torch.bfloat16, preallocate=True)
    lengths = torch.randint(1, 600, (batch,), generator=generator, device=DEVICE)
    columns = torch.arange(cache.positions.shape[1], device=DEVICE)
    cache.positions[:] = torch.where(columns[None] < lengths[:, None], columns[None], -1)
    cache.keys[0].normal_(generator=generator)
    cache.values[0].normal_(generator=generator)
    qpos = lengths - 1
    q = torch.randn(batch, heads, 1, dim, device=DEVICE, generator=generator, dtype=torch.bfloat16)
    out = kernels.decode_attention(q, cache.keys[0], cache.values[0], cache.positions, qpos, 0, cache.capacity,
                                   cache.window)
    expected = _reference(q, cache, qpos, 0)
    assert (out.float() - expected).abs().max().item() <= 2e-2 * expected.abs().max().item()


@pytest.mark.parametrize("window", [10, 40])  # 40: the columns split between programs (combined by the last)
def test_attention_rounds_its_output_as_the_quantizer_does(window):
    """The FROM_QKV form's 8-bit output for a 4-bit ``wo``: the values, steps, sums and residuals of
    kernels.quantize_row applied to its plain output."""
    generator = torch.Generator(device=DEVICE).manual_seed(window)
    heads, heads_kv, dim = 8, 2, 64
    caches = [_filled_cache(1, heads_kv, dim, window, [window + 3], torch.float32, torch.Generator(
        device=DEVICE).manual_seed(1)) for _ in range(2)]
    qkv = torch.randn(1, (heads + 2 * heads_kv) * dim, device=DEVICE, generator=generator)
    angles = torch.rand(1, dim // 2, device=DEVICE, generator=generator) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([-angles.sin(), angles.sin()], -1)
    qpos = torch.tensor([window + 3], device=DEVICE)
    outputs = [kernels.decode_attention_from_qkv(qkv, c.keys[0], c.values[0], c.positions, qpos, 0, c.capacity,
                                                 c.window, cos, sin, heads, quantized=quantized)
               for c, quantized in zip(caches, (False, True))]
    plain, rounded = outputs
    expected = kernels.quantize_row(plain)
    assert rounded.dtype == plain.dtype
    assert torch.equal(rounded.q, expected.q)
    for name in ("steps", "sums", "residuals"):
        torch.testing.assert_close(getattr(rounded, name), getattr(expected, name), rtol=1e-5, atol=1e-6)
