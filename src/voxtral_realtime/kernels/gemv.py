"""The one-row GEMV of the one-stream decoder step, bf16/f16/f32 weights, with its elementwise work folded in:
RMSNorm (its 1/rms applied to the sums), SwiGLU (gate and up rows in one program) and the residual add
(docs/performance.md).  The 4-bit GEMV (:mod:`.q4`) shares its epilogue."""

from __future__ import annotations

import torch

from .common import MatmulConfig, interpreted, largest_divisor, launch_options, tl, triton

if triton is not None:

    @triton.jit
    def _float_values(t, PAIRS: tl.constexpr):
        """A loaded tile in float32: PAIRS, int32 words of two bfloat16 values each -> (even, odd) values, one
        integer instruction each (a bfloat16 is the high half of a float32; the compiler's own conversion took
        two); else (t, t) converted."""
        if PAIRS:
            return (t << 16).to(tl.float32, bitcast=True), (t & -65536).to(tl.float32, bitcast=True)
        return t.to(tl.float32), t.to(tl.float32)

    @triton.jit
    def _fused_gemv_kernel(
        x_ptr, w_ptr, out_ptr, gain_ptr, scale_ptr, res_ptr, stride_wn, gate_rows, eps,
        K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        NORM: tl.constexpr, HAS_SCALE: tl.constexpr, GATED: tl.constexpr, RESIDUAL: tl.constexpr,
        PAIRS: tl.constexpr, PDL: tl.constexpr,
    ):
        """out[n] = (res[n] +) sum_k input(x)[k] * w[n, k] for one row x, FMAs reduced once at the end.

        NORM: RMSNorm's 1/rms is a per-row factor, so it is applied to the sums at the end, with the squares of x
        summed in the same pass (no pass over the row before the products).  GATED: each program also takes
        weight rows n + gate_rows (SwiGLU's "up" half of a fused gate/up matrix) and writes silu(gate) * up.
        PAIRS: x, w, gain and scale are bfloat16 read as int32 words (pointers, strides and gate_rows in words).
        A weight does not depend on the kernel before this one, so the first weight tiles are loaded before
        waiting for that kernel (PDL: programmatic dependent launch lets this kernel start while the previous one
        drains); each further tile is loaded one iteration ahead.  BLOCK_K (values) need not divide K (the tail
        is masked).  The tiles are two-dimensional on purpose: a [rows of x, BLOCK_N, BLOCK_K] product made
        Triton move every weight tile through shared memory (bench/sass_count.py)."""
        PER: tl.constexpr = 2 if PAIRS else 1  # values per loaded element
        COLS: tl.constexpr = BLOCK_K // PER
        KC: tl.constexpr = K // PER
        EVEN_K: tl.constexpr = KC % COLS == 0
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs = tl.arange(0, COLS)
        w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs[None, :]
        up_ptrs = w_ptrs + gate_rows * stride_wn
        w = tl.load(w_ptrs) if EVEN_K else tl.load(w_ptrs, mask=(offs < KC)[None, :], other=0)
        w_up = w
        if GATED:
            w_up = tl.load(up_ptrs) if EVEN_K else tl.load(up_ptrs, mask=(offs < KC)[None, :], other=0)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        residual = _residual_row(res_ptr, offs_n, BLOCK_N, RESIDUAL)
        acc = tl.zeros([BLOCK_N, COLS], tl.float32)
        acc_up = tl.zeros([BLOCK_N, COLS], tl.float32)
        squares = tl.zeros([COLS], tl.float32)
        for k0 in range(0, KC, COLS):
            offs_k = k0 + offs
            inside = offs_k < KC
            if EVEN_K:
                more = k0 + COLS < KC
                x = tl.load(x_ptr + offs_k)
            else:
                more = (offs_k + COLS < KC)[None, :]
                x = tl.load(x_ptr + offs_k, mask=inside, other=0)
            w_next = tl.load(w_ptrs + k0 + COLS, mask=more, other=0)
            if GATED:
                up_next = tl.load(up_ptrs + k0 + COLS, mask=more, other=0)
            x_a, x_b = _float_values(x, PAIRS)
            if NORM:
                squares += x_a * x_a
                if PAIRS:
                    squares += x_b * x_b
                gain = tl.load(gain_ptr + offs_k) if EVEN_K else tl.load(gain_ptr + offs_k, mask=inside, other=0)
                gain_a, gain_b = _float_values(gain, PAIRS)
                x_a, x_b = x_a * gain_a, x_b * gain_b
                if HAS_SCALE:
                    scale = tl.load(scale_ptr + offs_k) if EVEN_K else \
                        tl.load(scale_ptr + offs_k, mask=inside, other=0)
                    scale_a, scale_b = _float_values(scale, PAIRS)
                    x_a, x_b = x_a * scale_a, x_b * scale_b
            w_a, w_b = _float_values(w, PAIRS)
            acc += x_a[None, :] * w_a
            if PAIRS:
                acc += x_b[None, :] * w_b
            w = w_next
            if GATED:
                up_a, up_b = _float_values(w_up, PAIRS)
                acc_up += x_a[None, :] * up_a
                if PAIRS:
                    acc_up += x_b[None, :] * up_b
                w_up = up_next
        _gemv_finish(tl.sum(acc, axis=1)[None, :], tl.sum(acc_up, axis=1)[None, :],
                     tl.zeros([1], tl.float32) + tl.sum(squares, axis=0), residual, out_ptr, offs_n, eps, K, NORM,
                     GATED, RESIDUAL)

    @triton.jit
    def _gemv_finish(out, up, squares, residual, out_ptr, offs_n, eps, K: tl.constexpr, NORM: tl.constexpr,
                     GATED: tl.constexpr, RESIDUAL: tl.constexpr):
        """The one-row fused GEMVs' epilogue: sums ``out`` (and ``up``) [1, BLOCK_N] in float32, ``squares`` [1]
        the sum of x^2 -> times 1/rms (NORM), silu(gate) * up (GATED), + ``residual`` [1, BLOCK_N] (float32),
        stored in out's dtype."""
        if NORM:
            inv_rms = 1.0 / tl.sqrt(squares / K + eps)
            out = out * inv_rms[:, None]
            up = up * inv_rms[:, None]
        dtype = out_ptr.dtype.element_ty
        # rounded to the output's dtype where the reference's separate kernels round (their arithmetic is float32
        # rounded once per operation, also for bfloat16, which Triton's interpreter cannot do arithmetic in)
        out = out.to(dtype).to(tl.float32)
        if GATED:
            out = ((out * tl.sigmoid(out)).to(dtype).to(tl.float32) * up.to(dtype).to(tl.float32)).to(dtype)
            out = out.to(tl.float32)
        if RESIDUAL:
            out += residual
        tl.store(out_ptr + offs_n[None, :], out.to(dtype))

    @triton.jit
    def _residual_row(res_ptr, offs_n, BLOCK_N: tl.constexpr, RESIDUAL: tl.constexpr):
        """The residual's values for this program's outputs, in float32 (zeros without one).  Read right after the
        wait for the previous kernel (the residual was made before that one), so that the read overlaps the
        products instead of adding a trip to memory to the epilogue."""
        if RESIDUAL:
            return tl.load(res_ptr + offs_n[None, :]).to(tl.float32)
        return tl.zeros([1, BLOCK_N], tl.float32)


def fused_linear(x: torch.Tensor, weight: torch.Tensor, *, norm: torch.Tensor | None = None, eps: float = 0.0,
                 scale: torch.Tensor | None = None, gated: bool = False, residual: torch.Tensor | None = None,
                 config: MatmulConfig | None = None, pdl: bool = False) -> torch.Tensor:
    """``f(x) @ weight.T (+ residual)`` for one row x [1, K], where ``f`` is the identity or, with ``norm``,
    ``RMSNorm(x) * norm`` (times ``scale`` [1, K] or [K] when given).  ``gated``: ``weight`` [2N, K] is a fused
    gate/up matrix and the result is ``silu(gate) * up`` [1, N].  The decoder step's elementwise work so rides on
    the matmuls, which read their weights at memory speed.

    Rounding differs from separate kernels in one place: the normalised input is not rounded to x's dtype
    before the product (the 1/rms factor is applied to the sums)."""
    m, k = x.shape
    if m != 1:
        raise ValueError(f"the fused GEMV takes one row, not {m}")
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    config = config or gemv_config(n, k, gated=gated)
    out, (gain, scale_row, res) = _fused_arguments(x, n, norm, scale, residual)
    pairs = k % 2 == 0 and all(t.dtype == torch.bfloat16 for t in (x, weight, gain, scale_row))
    x, weight, gain, scale_row = (t.view(torch.int32) if pairs else t for t in (x, weight, gain, scale_row))
    _fused_gemv_kernel[(n // config.block_n,)](
        x, weight, out, gain, scale_row, res, weight.stride(0), n, eps,
        K=k, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        NORM=norm is not None, HAS_SCALE=scale is not None, GATED=gated, RESIDUAL=residual is not None,
        PAIRS=pairs, PDL=pdl, num_warps=config.num_warps, num_stages=1, **launch_options(pdl),
    )
    return out


def _fused_arguments(x: torch.Tensor, n: int, norm: torch.Tensor | None, scale: torch.Tensor | None,
                     residual: torch.Tensor | None) -> tuple[torch.Tensor, tuple]:
    """The output [1, n] and (gain, scale, residual) for the fused GEMV; what is not given is passed as x (never
    read)."""
    if any(t is not None and not t.is_contiguous() for t in (x, scale, residual)):
        raise ValueError("the fused GEMV takes contiguous rows")
    return x.new_empty((1, n)), tuple(t if t is not None else x for t in (norm, scale, residual))


def gemv_config(n: int, k: int, *, gated: bool = False) -> MatmulConfig:
    """The :func:`fused_linear` tiling for a [1, k] x [n, k] product, a rule timed in the decoder step
    (bench/results/README.md, "kernels"): two whole rows per program (up to 4096 values at a time, all requested
    before the wait for the previous kernel), four warps, eight for longer rows; short tiles where N alone gives
    thousands of programs (the LM head)."""
    if n >= 32768:
        return MatmulConfig(block_n=largest_divisor(n, (4, 2)), block_k=256, num_warps=2)
    # Triton's interpreter runs the programs one after another in Python: fewer, larger ones for the CPU tests
    rows = (16, 8, 4, 2) if interpreted() else (2,)
    return MatmulConfig(block_n=largest_divisor(n, rows), block_k=min(4096, triton.next_power_of_2(k)),
                        num_warps=8 if k > 4096 else 4)
