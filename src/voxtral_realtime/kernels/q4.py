"""Products with 4-bit weights (GGUF Q4_0 / Q4_K values in :class:`..quantization.QuantizedLinear`'s layout):
for one row by integer dot products on the packed weights (:func:`fused_q4_linear`, never dequantized in memory),
for more rows by one dequantizing kernel and cuBLAS (:func:`q4_dequantize`), in slices of bounded size."""

from __future__ import annotations

import torch

from .common import MatmulConfig, interpreted, largest_divisor, launch_options, tl, triton
from .gemv import _gemv_finish, _residual_row
from .rounding import QuantizedRow, quantize_row

if triton is not None:

    @triton.jit
    def _nibble_value(nibble):
        """int32 in [0, 16) -> float32 without the quarter-rate int-to-float instruction: the nibble as the low
        mantissa bits of 2^23, minus 2^23 (exact)."""
        return (nibble | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _dot_nibbles(words, x_low, x_high, ASM: tl.constexpr):
        """Per int32 word of 4-bit weights: its 4 low nibbles times the 4 signed bytes of ``x_low`` plus its 4
        high nibbles times those of ``x_high`` (byte i with byte i), as int32: two ``dp4a`` instructions on the
        GPU, shifts and masks in the interpreter."""
        if ASM:
            return tl.inline_asm_elementwise(
                "{ .reg .b32 lo, hi, t; and.b32 lo, $1, 0x0F0F0F0F; shr.u32 hi, $1, 4; and.b32 hi, hi, 0x0F0F0F0F;"
                " dp4a.u32.s32 t, lo, $2, 0; dp4a.u32.s32 $0, hi, $3, t; }",
                "=r,r,r,r", [words, x_low, x_high], dtype=tl.int32, is_pure=True, pack=1)
        total = tl.zeros_like(words)
        for i in tl.static_range(4):
            total += ((words >> (8 * i)) & 15) * ((x_low << (24 - 8 * i)) >> 24) \
                + ((words >> (8 * i + 4)) & 15) * ((x_high << (24 - 8 * i)) >> 24)
        return total

    @triton.jit
    def _group_terms(dot, w_scale, w_offset, x_step, x_sum, x_residual, SYMMETRIC: tl.constexpr):
        """One group's part of the 4-bit product from its integer dot product (SYMMETRIC: the offset's term is
        already in ``x_residual``)."""
        terms = w_scale.to(tl.float32) * (x_step * dot + x_residual)
        if not SYMMETRIC:
            terms += w_offset.to(tl.float32) * x_sum
        return terms

    @triton.jit
    def _fused_q4_gemv_kernel(
        xq_ptr, xstep_ptr, xsum_ptr, xresidual_ptr, squares_ptr, qw_ptr, qscale_ptr, qoffset_ptr, out_ptr, res_ptr,
        stride_qn, stride_sn, gate_rows, eps,
        K: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, SQUARES: tl.constexpr,
        SQUARES_PAD: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr, RESIDUAL: tl.constexpr,
        SYMMETRIC: tl.constexpr, PDL: tl.constexpr, ASM: tl.constexpr,
    ):
        """One row of x, quantized to 8 bits per group of 32 (:func:`_quantize_activation_kernel`), times a 4-bit
        weight (layout: :func:`quantized_matmul`), both read as int32 words: word w of a group holds the weights
        4w..4w+3 in its low nibbles and 16+4w..16+4w+3 in its high ones, which meet x's words w and 4 + w in two
        integer dot products (``dp4a``).  Per group ``scale * (step * sum(q qx) + residual) + offset * sum(x)``;
        with NORM the row's 1/rms (from the quantizer's partial sums of squares) multiplies the result.
        SYMMETRIC (Q4_0): every offset is -8 scale, so offsets are not read (a ninth of the bytes) and the group's
        term is ``scale * (step * dot + residual - 8 sum(x))``.  Integer dot products rather than FMAs keep
        instruction issue below the weights' memory time (bench/sass_count.py counts them)."""
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_g = tl.arange(0, GROUPS)
        offs_w = tl.arange(0, 4)
        q_ptrs = qw_ptr + offs_n.to(tl.int64)[:, None, None] * stride_qn + offs_g[None, :, None] * 4 \
            + offs_w[None, None, :]
        x_ptrs = xq_ptr + offs_g[None, :, None] * 8 + offs_w[None, None, :]
        s_index = offs_n.to(tl.int64)[:, None] * stride_sn + offs_g[None, :]
        up_q, up_s = gate_rows * stride_qn, gate_rows * stride_sn
        # GROUPS need not divide the row's groups: the tail is masked (a program may so take a whole row at once)
        inside = (offs_g < K // 32)[None, :]
        words = tl.load(q_ptrs, mask=inside[:, :, None], other=0)
        w_scale = tl.load(qscale_ptr + s_index, mask=inside, other=0.0)
        w_offset = w_scale
        if not SYMMETRIC:
            w_offset = tl.load(qoffset_ptr + s_index, mask=inside, other=0.0)
        if GATED:
            up_words = tl.load(q_ptrs + up_q, mask=inside[:, :, None], other=0)
            up_scale = tl.load(qscale_ptr + up_s + s_index, mask=inside, other=0.0)
            up_offset = up_scale
            if not SYMMETRIC:
                up_offset = tl.load(qoffset_ptr + up_s + s_index, mask=inside, other=0.0)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        # the epilogue's inputs first: their reads overlap the products
        residual = _residual_row(res_ptr, offs_n, BLOCK_N, RESIDUAL)
        squares = tl.zeros([1], tl.float32)
        if NORM:
            offs_s = tl.arange(0, SQUARES_PAD)
            squares += tl.sum(tl.load(squares_ptr + offs_s, mask=offs_s < SQUARES, other=0.0), axis=0)
        acc = tl.zeros([BLOCK_N, GROUPS], tl.float32)
        acc_up = tl.zeros([BLOCK_N, GROUPS], tl.float32)
        for g0 in range(0, K // 32, GROUPS):
            here = (g0 + offs_g < K // 32)[None, :]
            after = (g0 + GROUPS + offs_g < K // 32)[None, :]
            words_next = tl.load(q_ptrs + (g0 + GROUPS) * 4, mask=after[:, :, None], other=0)
            scale_next = tl.load(qscale_ptr + s_index + g0 + GROUPS, mask=after, other=0.0)
            offset_next = scale_next
            if not SYMMETRIC:
                offset_next = tl.load(qoffset_ptr + s_index + g0 + GROUPS, mask=after, other=0.0)
            if GATED:
                up_words_next = tl.load(q_ptrs + up_q + (g0 + GROUPS) * 4, mask=after[:, :, None], other=0)
                up_scale_next = tl.load(qscale_ptr + up_s + s_index + g0 + GROUPS, mask=after, other=0.0)
                up_offset_next = up_scale_next
                if not SYMMETRIC:
                    up_offset_next = tl.load(qoffset_ptr + up_s + s_index + g0 + GROUPS, mask=after, other=0.0)
            x_low = tl.load(x_ptrs + g0 * 8, mask=here[:, :, None], other=0)
            x_high = tl.load(x_ptrs + g0 * 8 + 4, mask=here[:, :, None], other=0)
            x_step = tl.load(xstep_ptr + g0 + offs_g[None, :], mask=here, other=0.0)
            x_sum = tl.load(xsum_ptr + g0 + offs_g[None, :], mask=here, other=0.0)
            x_residual = tl.load(xresidual_ptr + g0 + offs_g[None, :], mask=here, other=0.0)
            if SYMMETRIC:
                x_residual -= 8.0 * x_sum
            dot = tl.sum(_dot_nibbles(words, x_low, x_high, ASM), axis=2).to(tl.float32)
            acc += _group_terms(dot, w_scale, w_offset, x_step, x_sum, x_residual, SYMMETRIC)
            words, w_scale, w_offset = words_next, scale_next, offset_next
            if GATED:
                dot = tl.sum(_dot_nibbles(up_words, x_low, x_high, ASM), axis=2).to(tl.float32)
                acc_up += _group_terms(dot, up_scale, up_offset, x_step, x_sum, x_residual, SYMMETRIC)
                up_words, up_scale, up_offset = up_words_next, up_scale_next, up_offset_next
        _gemv_finish(tl.sum(acc, axis=1)[None, :], tl.sum(acc_up, axis=1)[None, :], squares, residual, out_ptr,
                     offs_n, eps, K, NORM, GATED, RESIDUAL)

    @triton.jit
    def _q4_dequantize_kernel(qw_ptr, scale_ptr, offset_ptr, out_ptr, stride_qn, stride_sn, stride_on,
                              GROUPS: tl.constexpr, ROWS: tl.constexpr, BLOCK_G: tl.constexpr):
        """Rows of a 4-bit weight (layout: :func:`quantized_matmul`) -> out's dtype, ROWS rows x BLOCK_G groups of 32
        values per program: w = scale * q + offset (exact in float32: q has 4 bits, scale 11), then rounded."""
        offs_n = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        offs_g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
        offs_b = tl.arange(0, 16)
        inside = (offs_g < GROUPS)[None, :]
        s_index = offs_n.to(tl.int64)[:, None] * stride_sn + offs_g[None, :]
        q = tl.load(qw_ptr + offs_n.to(tl.int64)[:, None, None] * stride_qn + offs_g[None, :, None] * 16
                    + offs_b[None, None, :], mask=inside[:, :, None], other=0).to(tl.int32)
        scale = tl.load(scale_ptr + s_index, mask=inside, other=0.0).to(tl.float32)[:, :, None]
        offset = tl.load(offset_ptr + s_index, mask=inside, other=0.0).to(tl.float32)[:, :, None]
        low = (_nibble_value(q & 15) * scale + offset).to(out_ptr.dtype.element_ty)
        high = (_nibble_value(q >> 4) * scale + offset).to(out_ptr.dtype.element_ty)
        out = out_ptr + offs_n.to(tl.int64)[:, None, None] * stride_on + offs_g[None, :, None] * 32 \
            + offs_b[None, None, :]
        tl.store(out, low, mask=inside[:, :, None])
        tl.store(out + 16, high, mask=inside[:, :, None])


def fused_q4_linear(x: torch.Tensor | QuantizedRow, qweight: torch.Tensor, scales: torch.Tensor,
                    offsets: torch.Tensor | None, *, norm: torch.Tensor | None = None, eps: float = 0.0,
                    scale: torch.Tensor | None = None, gated: bool = False, residual: torch.Tensor | None = None,
                    config: MatmulConfig | None = None, pdl: bool = False) -> torch.Tensor:
    """:func:`fused_linear` for one row of x [1, K] and a 4-bit weight (layout: :func:`quantized_matmul`), in two
    kernels: x (normed, scaled) is quantized to 8 bits per group of 32 values (:func:`quantize_row`: a relative
    error of about 0.4% per value, far below the 4-bit weights' own), then multiplied with integer dot products
    (tests/test_kernels_q4.py states the arithmetic in PyTorch).  ``x`` may come quantized already (the
    decode-attention kernel rounds its output so), then without ``norm`` or ``scale``.  ``offsets`` None: Q4_0's
    symmetric blocks (every offset -8 scale), which the kernel then does not read."""
    if isinstance(x, QuantizedRow):
        if norm is not None or scale is not None:
            raise ValueError("a quantized row takes no norm or scale: they apply before the rounding")
        row = x
    elif x.shape[0] != 1:
        raise ValueError(f"the fused 4-bit GEMV takes one row, not {x.shape[0]}")
    else:
        row = quantize_row(x, norm=norm, scale=scale, pdl=pdl)
    n, k = qweight.shape[0] // 2 if gated else qweight.shape[0], row.q.shape[0]
    config = config or q4_config(n, k, gated=gated)
    out = row.steps.new_empty((1, n), dtype=row.dtype)
    words = qweight.view(torch.int32)
    squares = row.squares if norm is not None else row.steps
    _fused_q4_gemv_kernel[(n // config.block_n,)](
        row.q.view(torch.int32), row.steps, row.sums, row.residuals, squares, words, scales,
        offsets if offsets is not None else scales, out,
        residual if residual is not None else out, words.stride(0), scales.stride(0), n, eps,
        K=k, BLOCK_N=config.block_n, GROUPS=config.block_k // 32, SQUARES=squares.numel(),
        SQUARES_PAD=triton.next_power_of_2(squares.numel()), NORM=norm is not None,
        GATED=gated, RESIDUAL=residual is not None, SYMMETRIC=offsets is None, PDL=pdl, ASM=not interpreted(),
        num_warps=config.num_warps,
        num_stages=1, **launch_options(pdl),
    )
    return out


def q4_config(n: int, k: int, *, gated: bool = False) -> MatmulConfig:
    """The tiling of :func:`fused_q4_linear` for a [1, k] x [n, k] product (``gated``: the fused step's gate/up
    product): one warp per program taking two whole rows, loaded before the wait for the previous kernel (the
    rule timed in the step: bench/results/README.md, "kernels")."""
    return MatmulConfig(block_n=largest_divisor(n, (2,)), block_k=min(4096, 32 * triton.next_power_of_2(k // 32)),
                        num_warps=1)


def q4_dequantize(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                  dtype: torch.dtype) -> torch.Tensor:
    """The 4-bit weight (layout: :func:`quantized_matmul`) as a dense [N, K] tensor of ``dtype``, by one kernel."""
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    out = torch.empty((n, k), dtype=dtype, device=qweight.device)
    rows = largest_divisor(n, (8, 4, 2))
    block_g = min(32, triton.next_power_of_2(k // 32))
    _q4_dequantize_kernel[(n // rows, triton.cdiv(k // 32, block_g))](
        qweight, scales, offsets, out, qweight.stride(0), scales.stride(0), out.stride(0),
        GROUPS=k // 32, ROWS=rows, BLOCK_G=block_g, num_warps=4)
    return out


#: Values of the dense weight one dequantization writes at most (bf16: 128 MB): a longer weight (the LM head) is
#: dequantized and multiplied in slices of rows
DEQUANTIZED_VALUES = 1 << 26


def _q4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    if x.shape[0] == 1:
        return fused_q4_linear(x, qweight, scales, offsets)
    n, k = qweight.shape[0], x.shape[1]
    rows = max(8, DEQUANTIZED_VALUES // k // 8 * 8)  # slices of whole 8-row programs of the dequantizer
    if rows >= n:
        return x @ q4_dequantize(qweight, scales, offsets, x.dtype).T
    out = x.new_empty((x.shape[0], n))
    for start in range(0, n, rows):
        part = slice(start, start + rows)
        out[:, part] = x @ q4_dequantize(qweight[part], scales[part], offsets[part], x.dtype).T
    return out


#: the same for torch.compile, which sees it as one opaque operation; eager calls skip the custom-op dispatch,
#: whose CPU time bounds an encode of hundreds of these calls
_q4_matmul_op = torch.library.custom_op("voxtral::q4_matmul", _q4_matmul, mutates_args=())


@_q4_matmul_op.register_fake
def _(x, qweight, scales, offsets):  # shapes only
    return x.new_empty((x.shape[0], qweight.shape[0]))


def quantized_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [..., K] @ w.T (+ ``bias``) with w [N, K] stored in 4 bits: ``qweight`` uint8 [N, K/2] (in each group
    of 32 values, byte b holds value b in its low nibble and value 16 + b in its high one), ``scales``/``offsets``
    [N, K/32] (w = scale * q + offset).  One row: :func:`fused_q4_linear`.  More rows: the weight is dequantized
    to x's dtype (:func:`q4_dequantize`, in slices of at most DEQUANTIZED_VALUES) for cuBLAS (docs/performance.md
    says why)."""
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    if flat.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        flat = flat.float()
    product = _q4_matmul_op if torch.compiler.is_compiling() else _q4_matmul
    out = product(flat.contiguous(), qweight, scales, offsets).reshape(*lead, qweight.shape[0])
    return out if bias is None else out + bias
