"""Rounding a row of activations to 8 bits per group of 32 values (like llama.cpp's q8_1), as the one-row 4-bit
GEMV reads it; the decode-attention kernel rounds its output the same way (:func:`round_groups`)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .common import largest_divisor, launch_options, tl, triton

if triton is not None:

    @triton.jit
    def _round_groups(x):
        """float32 values in groups of 32 along the last axis -> (int8 values, step, sum, residual) per group:
        step = max|x| / 127, q = floor(x / step + 0.5), residual = 8 sum(x - q step) (all-zero groups: q 0)."""
        biggest = tl.max(tl.abs(x), axis=-1)
        inverse = tl.where(biggest > 0, 127.0 / tl.where(biggest > 0, biggest, 1.0), 0.0)
        q = tl.floor(x * tl.expand_dims(inverse, -1) + 0.5)
        step = biggest / 127.0
        residual = 8.0 * tl.sum(x - q * tl.expand_dims(step, -1), axis=-1)
        return q.to(tl.int32).to(tl.int8), step, tl.sum(x, axis=-1), residual

    @triton.jit
    def _quantize_activation_kernel(x_ptr, gain_ptr, scale_ptr, q_ptr, step_ptr, sums_ptr, residual_ptr, squares_ptr,
                                    GROUPS: tl.constexpr, NORM: tl.constexpr, HAS_SCALE: tl.constexpr,
                                    PDL: tl.constexpr):
        """One row x [K] -> x' = x (* gain (* scale)), rounded per group of 32 values by :func:`_round_groups`;
        the residual (what rounding lost, times a 4-bit value's mean) leaves the GEMV's sums only the rounding
        errors times the nibbles' deviation from their mean.  With NORM, this program's sum of x^2 goes to
        ``squares[program]``: the 1/rms, a factor on the whole row, changes the steps, never q, so the GEMV
        applies it to its sums."""
        pid = tl.program_id(0)
        group = pid * GROUPS + tl.arange(0, GROUPS)
        index = group[:, None] * 32 + tl.arange(0, 32)[None, :]
        if NORM:
            gain = tl.load(gain_ptr + index).to(tl.float32)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        x = tl.load(x_ptr + index).to(tl.float32)
        if NORM:
            tl.store(squares_ptr + pid, tl.sum(tl.sum(x * x, axis=1), axis=0))
            x = x * gain
            if HAS_SCALE:
                x = x * tl.load(scale_ptr + index).to(tl.float32)
        q, step, total, residual = _round_groups(x)
        tl.store(q_ptr + index, q)
        tl.store(step_ptr + group, step)
        tl.store(sums_ptr + group, total)
        tl.store(residual_ptr + group, residual)


class QuantizedRow(NamedTuple):
    """One row of activations rounded to 8 bits per group of 32 values, as the one-row 4-bit GEMV reads it:
    ``q`` int8 [K], per group ``steps`` (max|x| / 127), ``sums`` (of x) and ``residuals`` (8 x what rounding lost)
    [K / 32], ``squares``: partial sums of x^2 for a norm the GEMV applies (empty without one), and the dtype of
    the row it was made from (the GEMV's output dtype)."""

    q: torch.Tensor
    steps: torch.Tensor
    sums: torch.Tensor
    residuals: torch.Tensor
    squares: torch.Tensor
    dtype: torch.dtype


def quantize_row(x: torch.Tensor, *, norm: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                 pdl: bool = False) -> QuantizedRow:
    """x [1, K] (times ``norm``'s gain and ``scale`` when given; the norm's 1/rms is left to the GEMV) rounded to
    8 bits per group of 32 values (like llama.cpp's q8_1 activations), for :func:`fused_q4_linear`."""
    k = x.shape[-1]
    per_program = largest_divisor(k // 32, (4, 2))
    row = empty_row(k, x.dtype, x.device, squares=k // 32 // per_program if norm is not None else 0)
    _quantize_activation_kernel[(k // 32 // per_program,)](
        x, norm if norm is not None else x, scale if scale is not None else x, *row[:5],
        GROUPS=per_program, NORM=norm is not None, HAS_SCALE=scale is not None, PDL=pdl, num_warps=1,
        **launch_options(pdl))
    return row


def empty_row(k: int, dtype: torch.dtype, device: torch.device, *, squares: int = 0) -> QuantizedRow:
    """Buffers for a row of ``k`` values of ``dtype`` rounded to 8 bits, with ``squares`` partial sums."""
    steps, sums, residuals = torch.empty((3, k // 32), dtype=torch.float32, device=device)
    return QuantizedRow(torch.empty(k, dtype=torch.int8, device=device), steps, sums, residuals,
                        steps.new_empty(squares), dtype)
