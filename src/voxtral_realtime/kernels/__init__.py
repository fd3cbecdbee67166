"""GPU kernels (Triton), each beside its launcher; each has a plain PyTorch equivalent that other devices run and
the tests compare with (docs/performance.md says what each does and why).

* :mod:`.attention`: decode attention of one new query per stream over its KV ring.
* :mod:`.gemv`: the one-row product of the one-stream decoder step, with norm, SwiGLU and residual folded in.
* :mod:`.q4`: products with 4-bit weights, one row by integer dot products, more rows through cuBLAS.
* :mod:`.rounding`: rounding activations to 8 bits per group of 32 values, which the 4-bit GEMV reads.
* :mod:`.common`: Triton (absent from CPU-only torch builds), launch options, tile shapes.

Under ``TRITON_INTERPRET=1`` the kernels also run on CPU tensors (slowly): the CPU test suite checks them so.
"""

from .attention import decode_attention, decode_attention_available, decode_attention_from_qkv
from .common import MatmulConfig, programmatic_launch_available
from .gemv import fused_linear, gemv_config
from .q4 import fused_q4_linear, q4_config, q4_dequantize, quantized_matmul
from .rounding import QuantizedRow, quantize_row

__all__ = ["MatmulConfig", "QuantizedRow", "decode_attention", "decode_attention_available",
           "decode_attention_from_qkv", "fused_linear", "fused_q4_linear", "gemv_config",
           "programmatic_launch_available", "q4_config", "q4_dequantize", "quantize_row", "quantized_matmul"]
