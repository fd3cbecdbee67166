"""What the kernel modules share: Triton (absent from CPU-only torch builds), launch options, tile shapes."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds come without Triton
    triton = None
    tl = None


def interpreted() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1), which the CPU test suite runs the kernels in."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def programmatic_launch_available(device: torch.device) -> bool:
    """Programmatic dependent launch (Hopper and newer, compiled Triton): a kernel may start while the one before
    it drains, and waits for that one's results only where it reads them."""
    return device.type == "cuda" and _programmatic_launch(torch.cuda.current_device() if device.index is None
                                                          else device.index)


@functools.cache
def _programmatic_launch(index: int) -> bool:
    return (triton is not None and not interpreted() and hasattr(tl.extra.cuda, "gdc_wait")
            and torch.cuda.get_device_capability(index)[0] >= 9)


def launch_options(pdl: bool) -> dict:
    """Triton launch keywords: programmatic dependent launch when asked (the kernel then calls gdc_wait)."""
    return {"launch_pdl": True} if pdl else {}


@dataclass(frozen=True)
class MatmulConfig:
    """Tile shape of the few-row matmul kernels; ``bench/tune_gemv.py`` measures the choices."""

    block_n: int = 16
    block_k: int = 256  # for the 4-bit kernel: values per iteration, a multiple of 32
    num_warps: int = 4


def largest_divisor(n: int, choices: tuple[int, ...]) -> int:
    return next((c for c in choices if n % c == 0), 1)
