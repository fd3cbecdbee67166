"""Block quantization in the GGUF formats Q4_0, Q8_0 and Q4_K, in torch, and the modules that compute with it.

**Block formats** (the exact bytes of a GGUF tensor; a row of ``K`` values is ``K / block`` blocks in a row):

* Q4_0: 32 values in 18 bytes: f16 ``d``, then 16 bytes where byte ``i`` holds value ``i`` in its low nibble and
  value ``i + 16`` in its high nibble; value = ``d * (q - 8)``.  :func:`quantize_blocks` reproduces ggml's
  reference quantizer byte for byte (``d`` = the signed value of largest magnitude / -8, ``q`` = trunc(x/d + 8.5)
  clamped to 15), so our files equal what ``gguf.quants.quantize`` writes.
* Q8_0: 32 values in 34 bytes: f16 ``d`` = absmax / 127, then 32 int8 ``q`` = x/d rounded half away from zero;
  value = ``d * q``.  Byte for byte ggml's reference quantizer as well.
* Q4_K: 256 values in 144 bytes: f16 ``d``, f16 ``dmin``, 12 bytes of 6-bit sub-block scales ``sc`` and mins ``m``
  (8 sub-blocks of 32), then 128 bytes of nibbles (byte ``32p + i``: value ``i`` of sub-block ``2p`` low, of
  sub-block ``2p + 1`` high); value = ``d*sc * q - dmin*m``.  gguf-py reads Q4_K but cannot write it, so the
  quantizer here is our own, described at :func:`_q4_k_sub_block_fit`.

:func:`dequantize_blocks` turns the bytes back into float32 bit for bit as ``gguf.quants.dequantize`` does (the
products involved are exact in float32, and the one subtraction of Q4_K is rounded once in both).

**Modules.**  :class:`QuantizedLinear` holds a 4-bit weight (Q4_0 or Q4_K) in the layout the GPU kernel reads
(``kernels.quantized_matmul``): ``scales``/``offsets`` f16 [out, in/32], Q4_0 as ``d`` / ``-8d`` (exact), Q4_K as
``d*sc`` / ``-dmin*m`` rounded to f16 (relative error <= 2^-11 per sub-block step; the file keeps the exact
factors).  Without the kernel it dequantizes a slice of rows at a time, so no full-precision copy is ever held.
On the CPU each quantized layer becomes its CPU kernel (:func:`cpu_layer`: onnxruntime's, or :class:`CpuInt4Linear`
on torch's packed int4 kernel; docs/performance.md, "On the CPU").  :class:`Q8Linear` holds Q8_0; :class:`QuantizedEmbedding` is the tied token table and LM head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels, kernels
from .cpu_kernels import OnnxQuantizedLinear
from .errors import UsageError


@dataclass(frozen=True)
class BlockFormat:
    name: str
    ggml_type: int  # GGMLQuantizationType value (checked against the gguf package in the tests)
    block_values: int
    block_bytes: int

    def row_bytes(self, values: int) -> int:
        if values % self.block_values:
            raise ValueError(f"{self.name}: a row of {values} values is not a whole number of "
                             f"{self.block_values}-value blocks")
        return values // self.block_values * self.block_bytes


FORMATS: Final[dict[str, BlockFormat]] = {
    "q4_0": BlockFormat("q4_0", 2, 32, 18),
    "q8_0": BlockFormat("q8_0", 8, 32, 34),
    "q4_k": BlockFormat("q4_k", 12, 256, 144),
}
#: The 4-bit formats that share :class:`QuantizedLinear`'s layout.
FOUR_BIT: Final = ("q4_0", "q4_k")
GROUP: Final = 32  # values per scale/offset pair in QuantizedLinear (a Q4_0 block, a Q4_K sub-block)

# Elements per chunk when a large tensor is (de)quantized: bounds the temporaries without costing speed.
_CHUNK_VALUES: Final = 1 << 20
# Q4_K's search holds ~60 float copies of its chunk: on the CPU, 64K values per thread keep them near the cores
# while its arithmetic per sub-block (tensors of 21 x chunk/32 values) stays large enough to spread over the
# threads.
_Q4_K_CPU_CHUNK_VALUES_PER_THREAD: Final = 1 << 16


def block_format(qtype: str) -> BlockFormat:
    try:
        return FORMATS[qtype]
    except KeyError:
        raise UsageError(f"unknown quantization type {qtype!r}; use one of {', '.join(FORMATS)}") from None


# ---------------------------------------------------------------------------------------------------------------
# Block bytes


def quantize_blocks(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    """``weight`` [..., K] (any float dtype, any device) -> the GGUF block bytes, uint8 [..., K/block*bytes]."""
    fmt = block_format(qtype)
    values = weight.shape[-1]
    row_bytes = fmt.row_bytes(values)
    rows = weight.reshape(-1, values)
    out = torch.empty(rows.shape[0], row_bytes, dtype=torch.uint8, device=weight.device)
    chunk_values = _CHUNK_VALUES
    if qtype == "q4_k" and weight.device.type == "cpu":
        chunk_values = _Q4_K_CPU_CHUNK_VALUES_PER_THREAD * torch.get_num_threads()
    step = max(1, chunk_values // values)
    quantize = _QUANTIZERS[qtype]
    for start in range(0, rows.shape[0], step):
        chunk = rows[start:start + step].float()
        blocks = chunk.reshape(-1, fmt.block_values)
        out[start:start + step] = quantize(blocks).reshape(chunk.shape[0], row_bytes)
    return out.reshape(*weight.shape[:-1], row_bytes)


def dequantize_blocks(data: torch.Tensor, qtype: str) -> torch.Tensor:
    """GGUF block bytes uint8 [..., row_bytes] -> float32 [..., K], bit for bit as ``gguf.quants.dequantize``."""
    fmt = block_format(qtype)
    row_bytes = data.shape[-1]
    if row_bytes % fmt.block_bytes:
        raise ValueError(f"{qtype}: {row_bytes} bytes per row is not a whole number of {fmt.block_bytes}-byte blocks")
    values = row_bytes // fmt.block_bytes * fmt.block_values
    rows = data.reshape(-1, row_bytes)
    out = torch.empty(rows.shape[0], values, dtype=torch.float32, device=data.device)
    step = max(1, _CHUNK_VALUES // values)
    dequantize = _DEQUANTIZERS[qtype]
    for start in range(0, rows.shape[0], step):
        chunk = rows[start:start + step]
        out[start:start + step] = dequantize(chunk.reshape(-1, fmt.block_bytes)).reshape(chunk.shape[0], values)
    return out.reshape(*data.shape[:-1], values)


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 [n, 1] -> its f16 rounding as 2 little-endian bytes [n, 2] (ggml stores d this way)."""
    return x.half().contiguous().view(torch.uint8)


def _f16_from_bytes(raw: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 2] -> float32 [n, 1]."""
    return raw.contiguous().view(torch.float16).float()


def _pack_nibbles_halves(q: torch.Tensor) -> torch.Tensor:
    """[n, 32] of 0..15 -> [n, 16] bytes: byte i = q[i] | q[i + 16] << 4."""
    return q[:, :16] | (q[:, 16:] << 4)


def _unpack_nibbles_halves(packed: torch.Tensor) -> torch.Tensor:
    """[n, 16] bytes -> [n, 32] of 0..15, the inverse of :func:`_pack_nibbles_halves`."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1)


def _quantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    # The signed value of largest magnitude maps to q = 0 (-8 d); the first one wins ties, as numpy's argmax.
    largest = blocks.gather(-1, blocks.abs().argmax(dim=-1, keepdim=True))
    d = largest / -8
    inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = (blocks * inverse + 8.5).trunc().clamp(0, 15).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _pack_nibbles_halves(q)], dim=-1)


def _dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16_from_bytes(blocks[:, :2])
    q = _unpack_nibbles_halves(blocks[:, 2:]).float() - 8
    return d * q


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    # floor(|x| + 0.5) can round |x| = 0.5 - 2^-25 up to 1 in float32; this form is exact (and is ggml's).
    magnitude = x.abs()
    whole = magnitude.floor()
    return x.sign() * (whole + (2 * (magnitude - whole)).floor())


def _quantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127
    inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = _round_half_away(blocks * inverse).to(torch.int8)
    return torch.cat([_f16_bytes(d), q.view(torch.uint8)], dim=-1)


def _dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16_from_bytes(blocks[:, :2])
    return blocks[:, 2:].contiguous().view(torch.int8).float() * d


# Q4_K ----------------------------------------------------------------------------------------------------------

_Q4_K_SUB_BLOCKS: Final = 8
# Candidate steps for the sub-block search: the step that spans [min, max] in 15 levels, then 15/(range) scaled
# by (15 + k/10)/15 for k = -10..10 (the grid ggml's make_qkx2 searches over as well).
_Q4_K_STEP_GRID: Final = [15.0 + k / 10 for k in range(-10, 11)]


def _q4_k_sub_block_fit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sub-block of 32 values x [n, 32]: the (scale >= 0, minimum >= 0) with x ~ scale * q - minimum, q in
    0..15.

    For each candidate step (``_Q4_K_STEP_GRID`` over the range [min(x, 0), max(x)]) the levels ``q`` are rounded,
    then scale and minimum are refit by weighted least squares with ``q`` fixed (minimum clamped at >= 0, i.e. the
    represented range always contains 0, as the format's non-negative ``m`` requires); the candidate with the
    smallest weighted squared error wins (the first of equal ones).  Weights ``|x| + rms(x)`` favour the large
    values, which dominate a dot product.  Plain rounding over [min, max] is one of the candidates, so the result
    is never worse than it.  All candidates are computed at once, a leading dimension of the tensors (this costs
    ~3 copies of ``x`` per candidate: :func:`quantize_blocks` keeps ``n`` cache-sized).
    """
    lo = x.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = x.amax(dim=-1, keepdim=True)
    span = hi - lo
    shifted = x - lo
    weight = x.abs() + x.pow(2).mean(dim=-1, keepdim=True).sqrt()
    weighted_x = weight * x
    sw = weight.sum(-1, keepdim=True)
    swx = weighted_x.sum(-1, keepdim=True)
    swx2 = (weighted_x * x).sum(-1, keepdim=True)
    levels = torch.tensor(_Q4_K_STEP_GRID, device=x.device).reshape(-1, 1, 1)
    # levels / span as reciprocal, then product (how torch applies a Python number to a tensor): the bytes our
    # Q4_K files have always had
    inv_step = torch.where(span > 0, span.reciprocal() * levels, torch.zeros_like(span))  # [candidates, n, 1]
    q = (shifted * inv_step).round_().clamp_(0, 15)  # [candidates, n, 32]
    weighted_q = weight * q
    swq = weighted_q.sum(-1, keepdim=True)
    swq2 = weighted_q.mul_(q).sum(-1, keepdim=True)
    swqx = q.mul_(weighted_x).sum(-1, keepdim=True)
    det = sw * swq2 - swq * swq
    safe_det = torch.where(det > 0, det, torch.ones_like(det))
    scale_alone = torch.where(swq2 > 0, swqx / swq2.clamp(min=1e-30), torch.zeros_like(swq2))
    # All levels equal (a constant sub-block): fit the scale alone, or the offset alone when every q is 0.
    scale = torch.where(det > 0, (sw * swqx - swq * swx) / safe_det, scale_alone)
    offset = torch.where(det > 0, (swq2 * swx - swq * swqx) / safe_det,
                         torch.where(swq2 > 0, torch.zeros_like(sw), swx / sw.clamp(min=1e-30)))
    # A positive offset would need a negative minimum: pin it at 0 and refit the scale alone.
    positive = offset > 0
    scale = torch.where(positive, scale_alone, scale).clamp(min=0)
    offset = torch.where(positive, torch.zeros_like(offset), offset)
    # sum w (scale q + offset - x)^2, expanded into the sums above (no per-value pass needed).
    err = (scale * scale * swq2 + 2 * scale * offset * swq + offset * offset * sw
           - 2 * scale * swqx - 2 * offset * swx + swx2)
    err = torch.where(err.isnan(), float("inf"), err)
    best_err, best = err.min(dim=0, keepdim=True)  # the first of equal errors (min over dim 0: faster than argmin)
    # Only a sub-block whose every candidate errs without bound (non-finite input) keeps plain rounding.
    found = best_err < float("inf")
    best_scale = torch.where(found, scale.gather(0, best), span / 15)
    best_min = torch.where(found, -offset.gather(0, best), -lo)
    return best_scale.reshape(-1), best_min.reshape(-1)


def _quantize_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    sub = blocks.reshape(n * _Q4_K_SUB_BLOCKS, GROUP)
    scale, minimum = (t.reshape(n, _Q4_K_SUB_BLOCKS) for t in _q4_k_sub_block_fit(sub))
    # Super-block factors in f16, then 6-bit multiples of them; the levels are recomputed against the rounded
    # factors so that rounding of d, dmin, sc and m is compensated where it can be.
    d = (scale.amax(-1, keepdim=True) / 63).half().float()
    dmin = (minimum.amax(-1, keepdim=True) / 63).half().float()
    sc = torch.where(d > 0, (scale / d).round(), torch.zeros_like(scale)).clamp(0, 63)
    m = torch.where(dmin > 0, (minimum / dmin).round(), torch.zeros_like(minimum)).clamp(0, 63)
    step = (d * sc).unsqueeze(-1)
    shift = (dmin * m).unsqueeze(-1)
    x = blocks.reshape(n, _Q4_K_SUB_BLOCKS, GROUP)
    q = torch.where(step > 0, ((x + shift) / step).round(), torch.zeros_like(x)).clamp(0, 15).to(torch.uint8)
    sc, m = sc.to(torch.uint8), m.to(torch.uint8)
    # 12 scale bytes: bytes 0-3 = sc[0..3] | (sc[4..7] >> 4) << 6; bytes 4-7 = m[0..3] | (m[4..7] >> 4) << 6;
    # bytes 8-11 = (sc[4..7] & 15) | (m[4..7] & 15) << 4.
    packed_scales = torch.cat([
        sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
        m[:, :4] | ((m[:, 4:] >> 4) << 6),
        (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4),
    ], dim=-1)
    pairs = q.reshape(n, 4, 2, GROUP)  # sub-blocks 2p and 2p + 1 share bytes 32p..32p+31
    nibbles = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, 128)
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), packed_scales, nibbles], dim=-1)


def _q4_k_fields(blocks: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Q4_K blocks [n, 144] -> d, dmin [n, 1] f32; sc, m [n, 8] f32; q [n, 8, 32] uint8."""
    n = blocks.shape[0]
    d = _f16_from_bytes(blocks[:, 0:2])
    dmin = _f16_from_bytes(blocks[:, 2:4])
    packed = blocks[:, 4:16]
    low_sc, low_m, rest = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = torch.cat([low_sc & 0x3F, (rest & 0x0F) | ((low_sc >> 2) & 0x30)], dim=-1)
    m = torch.cat([low_m & 0x3F, (rest >> 4) | ((low_m >> 2) & 0x30)], dim=-1)
    nibbles = blocks[:, 16:].reshape(n, 4, 1, GROUP)
    q = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=2).reshape(n, _Q4_K_SUB_BLOCKS, GROUP)
    return d, dmin, sc.float(), m.float(), q


def _dequantize_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    d, dmin, sc, m, q = _q4_k_fields(blocks)
    step = (d * sc).unsqueeze(-1)
    shift = (dmin * m).unsqueeze(-1)
    return (step * q.float() - shift).reshape(blocks.shape[0], -1)


_QUANTIZERS: Final[dict[str, Callable[[torch.Tensor], torch.Tensor]]] = {
    "q4_0": _quantize_q4_0, "q8_0": _quantize_q8_0, "q4_k": _quantize_q4_k}
_DEQUANTIZERS: Final[dict[str, Callable[[torch.Tensor], torch.Tensor]]] = {
    "q4_0": _dequantize_q4_0, "q8_0": _dequantize_q8_0, "q4_k": _dequantize_q4_k}


# ---------------------------------------------------------------------------------------------------------------
# Block bytes -> the modules' layouts


def four_bit_layout(data: torch.Tensor, qtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 / Q4_K bytes uint8 [rows, row_bytes] -> (qweight uint8 [rows, K/2], scales f16, offsets f16
    [rows, K/32]) as :class:`QuantizedLinear` holds them."""
    fmt = block_format(qtype)
    rows, row_bytes = data.shape
    values = row_bytes // fmt.block_bytes * fmt.block_values
    blocks = data.reshape(-1, fmt.block_bytes)
    if qtype == "q4_0":
        d = _f16_from_bytes(blocks[:, :2])
        qweight = blocks[:, 2:]  # already "byte b = value b | value b+16 << 4"
        scales, offsets = d, -8 * d  # exact in f16: -8d is d with the exponent moved
    elif qtype == "q4_k":
        d, dmin, sc, m, q = _q4_k_fields(blocks)
        qweight = _pack_nibbles_halves(q.reshape(-1, GROUP))
        scales, offsets = d * sc, -(dmin * m)
    else:
        raise ValueError(f"{qtype} is not a 4-bit format")
    groups = values // GROUP
    return (qweight.reshape(rows, values // 2).contiguous(), _to_f16(scales).reshape(rows, groups),
            _to_f16(offsets).reshape(rows, groups))


def q8_layout(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 bytes uint8 [rows, row_bytes] -> (qweight int8 [rows, K], scales f16 [rows, K/32])."""
    rows = data.shape[0]
    blocks = data.reshape(-1, FORMATS["q8_0"].block_bytes)
    scales = blocks[:, :2].contiguous().view(torch.float16).reshape(rows, -1)
    qweight = blocks[:, 2:].contiguous().view(torch.int8).reshape(rows, -1)
    return qweight, scales


def _to_f16(x: torch.Tensor) -> torch.Tensor:
    if x.numel() and not torch.isfinite(x.half()).all():
        raise ValueError("a block scale does not fit in float16")
    return x.half()


def _unpack_qweight(qweight: torch.Tensor) -> torch.Tensor:
    """qweight uint8 [rows, K/2] -> q uint8 [rows, K] (0..15) in value order."""
    rows = qweight.shape[0]
    groups = qweight.reshape(rows, -1, GROUP // 2)
    return torch.cat([groups & 0x0F, groups >> 4], dim=-1).reshape(rows, -1)


# ---------------------------------------------------------------------------------------------------------------
# Modules


class _KeepsF16Scales(nn.Module):
    """``module.to(dtype)`` casts every floating buffer; the block scales are float16 by format and must stay so
    (a round trip through bf16 would lose bits).  Device moves still apply."""

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        kept = {name: buf for name, buf in self._buffers.items()
                if buf is not None and buf.dtype == torch.float16 and name in ("scales", "offsets")}
        super()._apply(fn, recurse)
        for name, original in kept.items():
            moved = self._buffers[name]
            if moved is not None and moved.dtype != torch.float16:
                self._buffers[name] = original.to(moved.device)
        return self


def _rows_per_slice(in_features: int) -> int:
    return max(1, _CHUNK_VALUES * 4 // in_features)


class QuantizedLinear(_KeepsF16Scales):
    """A linear layer with a 4-bit (Q4_0 / Q4_K) weight: ``y = x W^T + b``, ``W = scales * q + offsets`` per group
    of 32 input values: ``qweight`` uint8 [out, in/2] (in each group of 32, byte b holds value b in its low nibble
    and value 16 + b in its high one: Q4_0's own order), ``scales``/``offsets`` f16 [out, in/32]."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                 bias: torch.Tensor | None = None, *, qtype: str = "q4_0") -> None:
        super().__init__()
        out_features, half = qweight.shape
        if qweight.dtype != torch.uint8 or scales.dtype != torch.float16 or offsets.dtype != torch.float16:
            raise TypeError("QuantizedLinear needs uint8 qweight and float16 scales/offsets")
        if scales.shape != (out_features, 2 * half // GROUP) or offsets.shape != scales.shape:
            raise ValueError(f"scales/offsets {tuple(scales.shape)} do not match qweight {tuple(qweight.shape)}")
        self.in_features, self.out_features, self.qtype = 2 * half, out_features, qtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("offsets", offsets)
        self.register_buffer("bias", bias)

    @classmethod
    def from_blocks(cls, data: torch.Tensor, qtype: str, bias: torch.Tensor | None = None) -> QuantizedLinear:
        return cls(*four_bit_layout(data, qtype), bias, qtype=qtype)

    @classmethod
    def from_float(cls, weight: torch.Tensor, qtype: str = "q4_0", bias: torch.Tensor | None = None
                   ) -> QuantizedLinear:
        return cls.from_blocks(quantize_blocks(weight, qtype), qtype, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}, "
                f"bias={self.bias is not None}")

    @property
    def kernel_offsets(self) -> torch.Tensor | None:
        """The offsets as the one-row kernel (``kernels.fused_q4_linear``) takes them: None for Q4_0, whose offsets
        are all -8 x the scales, so that the kernel derives them instead of reading them."""
        return None if self.qtype == "q4_0" else self.offsets

    def dequantize(self, rows: slice = slice(None)) -> torch.Tensor:
        """The weight (or a slice of its rows) in float32, [out, in]."""
        q = _unpack_qweight(self.qweight[rows]).float()
        scales, offsets = self.scales[rows].float(), self.offsets[rows].float()
        groups = q.reshape(q.shape[0], -1, GROUP)
        return (scales[..., None] * groups + offsets[..., None]).reshape(q.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and hasattr(kernels, "quantized_matmul"):
            return kernels.quantized_matmul(x, self.qweight, self.scales, self.offsets, self.bias)
        return _linear_by_row_slices(x, self.dequantize, self.out_features, self.in_features, self.bias)


def _linear_by_row_slices(x: torch.Tensor, dequantize: Callable[[slice], torch.Tensor], out_features: int,
                          in_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """``x W^T + b`` with W dequantized a slice of rows at a time (bounded memory, any device)."""
    step = _rows_per_slice(in_features)
    pieces = [F.linear(x, dequantize(slice(start, start + step)).to(x.dtype))
              for start in range(0, out_features, step)]
    out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
    return out + bias.to(x.dtype) if bias is not None else out


class Q8Linear(_KeepsF16Scales):
    """A linear layer with a Q8_0 weight: int8 ``qweight`` [out, in], f16 ``scales`` [out, in/32]; W = scales * q."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        out_features, in_features = qweight.shape
        if qweight.dtype != torch.int8 or scales.dtype != torch.float16:
            raise TypeError("Q8Linear needs int8 qweight and float16 scales")
        if scales.shape != (out_features, in_features // GROUP):
            raise ValueError(f"scales {tuple(scales.shape)} do not match qweight {tuple(qweight.shape)}")
        self.in_features, self.out_features, self.qtype = in_features, out_features, "q8_0"
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    @classmethod
    def from_blocks(cls, data: torch.Tensor, bias: torch.Tensor | None = None) -> Q8Linear:
        return cls(*q8_layout(data), bias)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Q8Linear:
        return cls.from_blocks(quantize_blocks(weight, "q8_0"), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype=q8_0"

    def dequantize(self, rows: slice = slice(None)) -> torch.Tensor:
        q = self.qweight[rows].float()
        groups = q.reshape(q.shape[0], -1, GROUP)
        return (groups * self.scales[rows].float()[..., None]).reshape(q.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear_by_row_slices(x, self.dequantize, self.out_features, self.in_features, self.bias)


class CpuInt4Linear(nn.Module):
    """A 4-bit linear layer for the CPU in torch's packed int4 layout (``_convert_weight_to_int4pack_for_cpu``,
    whose byte order depends on the CPU's vector width and is private to torch).

    Same weights as the :class:`QuantizedLinear` it is made from, with two roundings that the kernel imposes: its
    scale/zero pairs are bf16 (Q4_0's zero is 0, so only ``d`` is rounded: relative 2^-9), and it multiplies bf16
    activations into a bf16 result (accumulating in float32).  Held in memory: 0.5 byte per weight + 4 bytes per
    32 weights, the same as the file.
    """

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, in_features: int, out_features: int,
                 bias: torch.Tensor | None, qtype: str) -> None:
        super().__init__()
        self.in_features, self.out_features, self.qtype = in_features, out_features, qtype
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.register_buffer("bias", bias)

    @staticmethod
    def supports(module: QuantizedLinear) -> bool:
        """The kernel's shape limits: out_features a multiple of 16, in_features of the 32-value group."""
        return module.out_features % 16 == 0 and module.in_features % GROUP == 0

    @classmethod
    def from_quantized(cls, module: QuantizedLinear) -> CpuInt4Linear:
        packed = _pack_for_cpu(module.qweight.cpu())
        scales = module.scales.cpu().float()
        # The kernel computes (q - 8) * scale + zero; ours is scales * q + offsets, so zero = offsets + 8 scales.
        zeros = module.offsets.cpu().float() + 8 * scales
        scales_and_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous()
        bias = module.bias.cpu() if module.bias is not None else None
        return cls(packed, scales_and_zeros, module.in_features, module.out_features, bias, module.qtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}, "
                f"bias={self.bias is not None}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, GROUP, self.scales_and_zeros)
        out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return out + self.bias.to(x.dtype) if self.bias is not None else out

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` [n] of the weight the kernel uses, float32 [n, in]: the tied token table's lookups read
        this layout, so the table is held once.  Torch packs each block of 64 rows (or 32 or 16, by CPU) on its
        own, contiguous in row order, so one map of where each value of a 64-row group lies (and one for a
        shorter last group) serves every row."""
        k = self.in_features
        group, local = torch.div(index, _PACK_GROUP, rounding_mode="floor"), index % _PACK_GROUP
        tail_start = self.out_features - self.out_features % _PACK_GROUP
        values = torch.empty(index.shape[0], k, dtype=torch.float32)
        packed = self.packed.reshape(-1)
        for in_tail, rows_in_group in ((False, _PACK_GROUP), (True, self.out_features % _PACK_GROUP)):
            chosen = (index >= tail_start) if in_tail else (index < tail_start)
            if rows_in_group == 0 or not bool(chosen.any()):
                continue
            nibble = self._nibble_map(rows_in_group)[local[chosen]]  # [n, k]: nibble index within the group
            base = (group[chosen] * (_PACK_GROUP * k // 2))[:, None]
            byte = packed[base + torch.div(nibble, 2, rounding_mode="floor")].to(torch.int32)
            values[chosen] = ((byte >> (4 * (nibble % 2))) & 15).float()
        pairs = self.scales_and_zeros[:, index].float()  # [k/32, n, 2]
        scales, zeros = pairs[..., 0].t()[..., None], pairs[..., 1].t()[..., None]
        return ((values.reshape(-1, k // GROUP, GROUP) - 8) * scales + zeros).reshape(-1, k)

    def _nibble_map(self, rows: int) -> torch.Tensor:
        """[rows, in] int64: where value (r, c) of a group of ``rows`` rows lies among the group's packed nibbles
        (byte j // 2, high nibble if j is odd).  Found by packing index patterns with torch's own packer, 4 bits
        of the index at a time; cached per group size."""
        cache = self.__dict__.setdefault("_nibble_maps", {})
        if rows not in cache:
            n, k = rows, self.in_features
            index = torch.arange(n * k, dtype=torch.int64).reshape(n, k)
            source = torch.zeros(n * k, dtype=torch.int64)  # flat [rows, in] position of each packed nibble
            for shift in range(0, max(4, (n * k - 1).bit_length()), 4):
                probe = torch.ops.aten._convert_weight_to_int4pack_for_cpu(((index >> shift) & 15).to(torch.int32), 1)
                probe = probe.reshape(-1).long()
                source[0::2] |= (probe & 15) << shift
                source[1::2] |= (probe >> 4) << shift
            where = torch.empty_like(source)
            where[source] = torch.arange(n * k)
            cache[rows] = where.reshape(n, k)
        return cache[rows]

    def dequantize(self) -> torch.Tensor:
        """The weight the kernel uses, float32 [out, in] (row blocks at a time: the lookup's index temporaries
        take 8 bytes per value)."""
        n = self.out_features
        return torch.cat([self.rows(torch.arange(start, min(start + _PACK_ROWS, n)))
                          for start in range(0, n, _PACK_ROWS)])


# Rows packed per call: the packer needs int32 levels (4 bytes per weight), so a whole token table at once would
# take 1.6 GB.  Torch packs blocks of 64 (AVX-512), 32 (AVX2, scalar) or 16 rows independently, each block's
# bytes contiguous in row order, so packing a multiple of 64 rows at a time gives the same bytes (tested).
_PACK_ROWS: Final = 4096
_PACK_GROUP: Final = 64


def _pack_for_cpu(qweight: torch.Tensor) -> torch.Tensor:
    pieces = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        _unpack_qweight(qweight[start:start + _PACK_ROWS]).to(torch.int32), 1)
        for start in range(0, qweight.shape[0], _PACK_ROWS)]
    return pieces[0] if len(pieces) == 1 else torch.cat([p.reshape(-1) for p in pieces]).reshape(
        qweight.shape[0], -1)


QuantizedWeightModule = QuantizedLinear | Q8Linear | CpuInt4Linear | OnnxQuantizedLinear


class QuantizedEmbedding(nn.Module):
    """The tied token table in a block format: :meth:`forward` looks rows up (dequantizing only those rows) and
    :meth:`logits` is the LM head ``h E^T``.

    ``table`` (a :class:`QuantizedLinear`, :class:`Q8Linear` or, on the CPU, its :func:`cpu_layer`) is both:
    the rows are read from its layout, and it is the LM head.
    """

    def __init__(self, table: QuantizedWeightModule, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.qtype = table.qtype
        self.dtype = dtype  # of the looked-up rows: the network's compute dtype
        self.table = table

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.reshape(-1)
        table = self.table
        if isinstance(table, (CpuInt4Linear, OnnxQuantizedLinear)):
            rows = table.rows(flat)
        elif isinstance(table, Q8Linear):
            q = table.qweight[flat].float().reshape(flat.shape[0], -1, GROUP)
            rows = q * table.scales[flat].float()[..., None]
        else:
            q = _unpack_qweight(table.qweight[flat]).float().reshape(flat.shape[0], -1, GROUP)
            rows = table.scales[flat].float()[..., None] * q + table.offsets[flat].float()[..., None]
        return rows.reshape(*tokens.shape, self.embedding_dim).to(self.dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.table(hidden)

    def dequantize(self) -> torch.Tensor:
        return self.table.dequantize()


# ---------------------------------------------------------------------------------------------------------------
# Whole networks


def quantize_linear(weight: torch.Tensor, qtype: str, bias: torch.Tensor | None = None) -> QuantizedLinear | Q8Linear:
    """A float weight [out, in] as the module of ``qtype`` (on the weight's device)."""
    if qtype == "q8_0":
        return Q8Linear.from_float(weight, bias)
    return QuantizedLinear.from_float(weight, qtype, bias)


def linear_qtype(qtype: str, in_features: int) -> str:
    """The format a linear weight of ``in_features`` gets when ``qtype`` is asked for: Q4_K needs rows of whole
    256-value super-blocks, and other rows fall back to Q4_0 (same 4-bit layout, same kernel)."""
    if qtype == "q4_k" and in_features % FORMATS["q4_k"].block_values:
        return "q4_0"
    return qtype


@torch.no_grad()
def quantize_network(network: nn.Module, qtype: str, *, embeddings: str | None = None) -> nn.Module:
    """Replace every linear layer of a loaded network by its ``qtype`` version, in place, on its device; the tied
    token table becomes a :class:`QuantizedEmbedding` of ``embeddings`` (default: ``qtype``; "f32"/"f16"/"bf16"
    or "keep" leave it as it is).  Norms, the conv stem and biases keep their precision.  On the CPU the 4-bit
    layers then use the packed int4 kernel (:func:`use_cpu_int4_kernels`)."""
    block_format(qtype)
    embeddings = embeddings or qtype
    decoder = network.decoder  # type: ignore[union-attr]
    compute_dtype = decoder.norm.weight.dtype
    for name, module in list(network.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                bias = child.bias.detach() if child.bias is not None else None
                kind = linear_qtype(qtype, child.in_features)
                setattr(module, child_name, quantize_linear(child.weight.detach(), kind, bias))
    if embeddings in FORMATS:
        table = quantize_linear(decoder.tok_embeddings.weight.detach(), linear_qtype(embeddings,
                                                                                     decoder.tok_embeddings.embedding_dim))
        decoder.tok_embeddings = QuantizedEmbedding(table, compute_dtype)
    elif embeddings not in ("keep", "f32", "f16", "bf16"):
        raise UsageError(f"unknown embeddings type {embeddings!r}")
    if decoder.norm.weight.device.type == "cpu":
        use_cpu_int4_kernels(network)
    network.layers_version += 1  # engines made before hold code and graphs of the old layers
    return network


def use_cpu_int4_kernels(network: nn.Module) -> nn.Module:
    """Swap every CPU quantized layer (the token table's too) for its CPU kernel (:func:`cpu_layer`), freeing the
    original, and give the network bf16 KV rings (:func:`use_bf16_caches_with_int4`)."""
    table = getattr(network.decoder.tok_embeddings, "table", None)  # type: ignore[union-attr]
    for module in list(network.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, (QuantizedLinear, Q8Linear)) and child.qweight.device.type == "cpu":
                setattr(module, child_name, cpu_layer(child, token_table=child is table))
    use_bf16_caches_with_int4(network)
    network.layers_version += 1
    return network


def cpu_layer(module: QuantizedLinear | Q8Linear, *, token_table: bool = False) -> nn.Module:
    """The fastest CPU form of a quantized layer: an :class:`~voxtral_realtime.cpu_kernels.OnnxQuantizedLinear`
    (Q4_0, Q4_K, Q8_0 with int8 activations) when onnxruntime is installed, else a :class:`CpuInt4Linear` for
    the 4-bit formats, else the layer itself.  ``token_table``: keep what row lookups read."""
    if cpu_kernels.available():
        return OnnxQuantizedLinear.from_quantized(module, keep_rows=token_table)
    if isinstance(module, QuantizedLinear) and CpuInt4Linear.supports(module):
        return CpuInt4Linear.from_quantized(module)
    return module


def use_bf16_caches_with_int4(network: nn.Module) -> None:
    """A network on the CPU int4 kernel keeps its KV rings (and computes attention) in bfloat16, as that kernel
    takes its inputs: half the memory of the rings, which are most of what a long transcription adds."""
    if any(isinstance(m, CpuInt4Linear) or (isinstance(m, OnnxQuantizedLinear) and m.bits == 4)
           for m in network.modules()):
        network.cache_dtype = torch.bfloat16


def quantized_bytes(network: nn.Module) -> dict[str, int]:
    """Bytes of every parameter and buffer of the network, by kind: quantized weights vs everything else."""
    quantized = other = 0
    seen: set[int] = set()
    for module in network.modules():
        is_quantized = isinstance(module, (QuantizedLinear, Q8Linear, CpuInt4Linear, OnnxQuantizedLinear))
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            size = tensor.numel() * tensor.element_size()
            if is_quantized and tensor.dtype in (torch.uint8, torch.int8, torch.float16, torch.bfloat16) and \
                    tensor.dim() > 1:
                quantized += size
            else:
                other += size
        if isinstance(module, OnnxQuantizedLinear):
            quantized += module.weight_bytes  # held inside onnxruntime
    return {"quantized": quantized, "other": other}
