"""Block-quantized matrix products on the CPU through onnxruntime's ``MatMulNBits`` operator.

Torch has no CPU kernel that multiplies 4-bit weights by 8-bit activations; onnxruntime's (MLAS) does, with
AVX-512 VNNI / AVX2 dot products chosen at run time, from a PyPI wheel.  Each quantized linear layer becomes
one small onnxruntime session holding that layer's weight; torch calls it with the activations' memory bound in
place (no copies in or out), and every session shares one process-wide thread pool sized like torch's.

``accuracy_level=4`` makes the operator round each row of activations to int8 per block of 32 values (its
"CompInt8" path), which is what makes it fast; tests/test_gguf.py measures what that rounding costs in agreement
with float32's tokens (README, "Quantized models").

Formats.  ``MatMulNBits`` computes ``y = x W^T`` with ``W[n, 32g + j] = scale[n, g] * (q - zero)`` and, without
zero points, ``zero = 2^(bits-1)``:

* Q4_0 (``scale * (q - 8)``) and Q8_0 (``scale * q`` with q int8 = uint8 q + 128 minus 128) map onto it exactly.
* Q4_K's value is ``scale * q + offset`` with an offset of its own per group.  Its float zero points are legal
  but run a slow exact path (180x slower, measured), so the layer runs as Q4_0 (``scale * (q - 8)``) plus the
  rest, ``(offset + 8 scale) * sum(x over the group)``: a [rows, K/32] x [K/32, N] product of the activations'
  group sums with the rests held in bf16 (1/8 of the nibbles' bytes).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Final

import numpy as np
import torch
from torch import nn

GROUP: Final = 32
_BOUND_ROWS: Final = 16  # calls of up to this many rows reuse buffers bound to the session once per row count


@functools.cache
def available() -> bool:
    """Whether onnxruntime can be imported (and ``VOXTRAL_CPU_KERNEL=torch`` does not ask for torch's own int4
    kernel instead, for comparisons)."""
    if os.environ.get("VOXTRAL_CPU_KERNEL") == "torch":
        return False
    try:
        import onnx  # noqa: F401  (builds the one-node graphs)
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


_pool_threads: int | None = None


def session_options(threads: int) -> Any:
    """Options that put a session on the process-wide onnxruntime thread pool, which the first caller sizes to
    ``threads``.  Every session of the package uses them: per-session pools would start a pool per layer
    (hundreds of threads), and once a global pool exists onnxruntime refuses sessions with pools of their own."""
    import onnxruntime as ort

    global _pool_threads
    if _pool_threads is None:
        ort.capi._pybind_state.set_global_thread_pool_sizes(threads, 1)
        _pool_threads = threads
    options = ort.SessionOptions()
    options.use_per_session_threads = False
    options.log_severity_level = 3
    return options


def _session(blob: np.ndarray, scales: np.ndarray, bits: int, out_features: int, in_features: int) -> Any:
    """A one-node graph ``y = MatMulNBits(x)`` holding the weight, as an onnxruntime session."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    weights = [numpy_helper.from_array(np.ascontiguousarray(blob), "w"),
               numpy_helper.from_array(np.ascontiguousarray(scales), "s")]
    node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=in_features,
                            N=out_features, bits=bits, block_size=GROUP, accuracy_level=4)
    graph = helper.make_graph(
        [node], "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, out_features])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = min(model.ir_version, 10)  # what onnxruntime releases back to 1.20 read
    data = model.SerializeToString()
    del model, graph, weights  # onnxruntime keeps its own (packed) copy of the weight
    return ort.InferenceSession(data, session_options(torch.get_num_threads()), providers=["CPUExecutionProvider"])


def _pairs_from_halves(qweight: torch.Tensor) -> torch.Tensor:
    """Our 4-bit layout (byte b of a group: value b low, value b + 16 high) -> MatMulNBits' (byte j: value 2j
    low, value 2j + 1 high), uint8 [out, K/32, 16]."""
    rows = qweight.shape[0]
    groups = qweight.reshape(rows, -1, GROUP // 2)
    values = torch.cat([groups & 0x0F, groups >> 4], dim=-1)  # [rows, K/32, 32] in value order
    return values[..., 0::2] | (values[..., 1::2] << 4)


class OnnxQuantizedLinear(nn.Module):
    """A Q4_0, Q4_K or Q8_0 linear layer on the CPU, computed by onnxruntime's ``MatMulNBits`` (module
    docstring).  Made from a :class:`~voxtral_realtime.quantization.QuantizedLinear` or ``Q8Linear``; the weight
    lives inside onnxruntime afterwards (the original is freed), except what :meth:`rows` needs when the layer is
    also a token table (``keep_rows``)."""

    def __init__(self, blob: np.ndarray, scales: np.ndarray, bits: int, in_features: int, out_features: int, *,
                 qtype: str, group_offsets: torch.Tensor | None, bias: torch.Tensor | None,
                 keep_rows: bool) -> None:
        super().__init__()
        self.in_features, self.out_features, self.qtype, self.bits = in_features, out_features, qtype, bits
        self.session = _session(blob, scales, bits, out_features, in_features)
        #: the weight's bytes as the file holds them (onnxruntime holds them repacked, out of torch's sight)
        self.weight_bytes = out_features * in_features // GROUP * (GROUP * bits // 8 + 2)
        self.register_buffer("group_offsets", group_offsets)  # Q4_K's rest: offset + 8 scale, [out, K/32]
        self.register_buffer("bias", bias)
        self._bound: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] = {}
        # what rows() reads: the weight in the operator's layout (kept only for a token table)
        self.register_buffer("blob", torch.from_numpy(blob) if keep_rows else None)
        self.register_buffer("row_scales", torch.from_numpy(scales) if keep_rows else None)

    @classmethod
    def from_quantized(cls, module: nn.Module, *, keep_rows: bool = False) -> OnnxQuantizedLinear:
        bias = module.bias.detach().cpu().float() if module.bias is not None else None
        if module.qtype == "q8_0":
            blob = (module.qweight.cpu().to(torch.int16) + 128).to(torch.uint8)
            blob = blob.reshape(module.out_features, -1, GROUP)
            return cls(blob.numpy(), module.scales.cpu().float().numpy(), 8, module.in_features,
                       module.out_features, qtype="q8_0", group_offsets=None, bias=bias, keep_rows=keep_rows)
        scales = module.scales.cpu().float()
        offsets = module.offsets.cpu().float()
        rest = offsets + 8 * scales
        group_offsets = None if bool((rest == 0).all()) else rest.to(torch.bfloat16)
        return cls(_pairs_from_halves(module.qweight.cpu()).numpy(), scales.numpy(), 4, module.in_features,
                   module.out_features, qtype=module.qtype, group_offsets=group_offsets, bias=bias,
                   keep_rows=keep_rows)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}, "
                f"bias={self.bias is not None}")

    @torch.compiler.disable  # an opaque call on raw pointers: nothing for inductor to fuse or trace
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        rows = flat.shape[0]
        if rows <= _BOUND_ROWS:  # a step's few rows: reuse buffers bound once (a fresh binding costs 10 us a call)
            if rows not in self._bound:
                self._bound[rows] = self._bind(torch.empty(rows, self.in_features),
                                               torch.empty(rows, self.out_features))
            binding, inputs, outputs = self._bound[rows]
            inputs.copy_(flat)
        else:
            inputs = flat.float().contiguous()
            binding, _, outputs = self._bind(inputs, torch.empty(rows, self.out_features))
        self.session.run_with_iobinding(binding)
        out = outputs
        if self.group_offsets is not None:
            sums = inputs.reshape(rows, -1, GROUP).sum(-1)
            out = out + (sums.to(torch.bfloat16) @ self.group_offsets.t()).float()
        if self.bias is not None:
            out = out + self.bias
        if out is outputs:  # the bound buffer is overwritten by the next call
            out = out.to(x.dtype, copy=True)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _bind(self, inputs: torch.Tensor, outputs: torch.Tensor) -> tuple[Any, torch.Tensor, torch.Tensor]:
        binding = self.session.io_binding()
        binding.bind_input("x", "cpu", 0, np.float32, list(inputs.shape), inputs.data_ptr())
        binding.bind_output("y", "cpu", 0, np.float32, list(outputs.shape), outputs.data_ptr())
        return binding, inputs, outputs

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` [n] of the weight, float32 [n, in] (the tied token table's lookups)."""
        if self.blob is None:
            raise RuntimeError("this layer was made without keep_rows")
        blob = self.blob[index]  # [n, K/32, 16 or 32]
        if self.bits == 4:
            q = torch.stack([blob & 0x0F, blob >> 4], dim=-1).reshape(blob.shape[0], -1, GROUP).float() - 8
        else:
            q = blob.float() - 128
        values = q * self.row_scales[index][..., None]
        if self.group_offsets is not None:
            values = values + self.group_offsets[index].float()[..., None]
        return values.reshape(index.shape[0], self.in_features)

    def dequantize(self) -> torch.Tensor:
        return self.rows(torch.arange(self.out_features))
