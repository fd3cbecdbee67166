"""The CPU kernel candidates for a 4-bit decoder step, timed on the full model's shapes in one run.

    python bench/cpu_kernels_compare.py [--threads 16,8] [--layers 26] [--json FILE]

A step's products (26 x wqkv, wo, w13, w2 and the LM head, one row each) are run back to back with a small torch
op between them, as in the model, through: torch's packed int4 kernel (bf16 activations, what the CPU used before
onnxruntime), and onnxruntime's MatMulNBits with int8 activations (accuracy_level 4; with and without thread
spinning, with and without zero points) and with float activations (level 0).  Also the encoder's products at
the row counts of a live step (4), a few steps and an offline chunk, and the machine's memory-read bandwidth.
Prints one JSON line per measurement: ms per step and the weight bytes moved per second (the Q4_0 file's bytes).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from voxtral_realtime import cpu_kernels
from voxtral_realtime.benchmarking.cpu import read_bandwidth

DECODER = [(6144, 3072), (3072, 4096), (18432, 3072), (3072, 9216)]  # wqkv, wo, w13, w2 (out, in)
HEAD = (131072, 3072)
ENCODER = [(3840, 1280), (1280, 1280), (10240, 1280), (1280, 5120)]
GROUP = 32


def q4_bytes(out_features: int, in_features: int) -> int:
    return out_features * in_features // GROUP * 18


def onnx_product(out_features: int, in_features: int, *, accuracy: int, zero_points: bool, spin: bool
                 ) -> Callable[[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(out_features * 7 + in_features)
    blocks = in_features // GROUP
    weights = [numpy_helper.from_array(rng.integers(0, 256, (out_features, blocks, GROUP // 2), np.uint8), "w"),
               numpy_helper.from_array(rng.random((out_features, blocks), np.float32) / 100, "s")]
    inputs = ["x", "w", "s"]
    if zero_points:
        weights.append(numpy_helper.from_array(
            rng.integers(0, 256, (out_features, (blocks + 1) // 2), np.uint8), "z"))
        inputs.append("z")
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=in_features, N=out_features,
                            bits=4, block_size=GROUP, accuracy_level=accuracy)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, in_features])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, out_features])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    options = cpu_kernels.session_options(torch.get_num_threads())
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x})[0]


def torch_product(out_features: int, in_features: int) -> Callable[[torch.Tensor], torch.Tensor]:
    levels = torch.randint(0, 16, (out_features, in_features), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels, 1)
    scales_and_zeros = torch.randn(in_features // GROUP, out_features, 2).bfloat16()
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, scales_and_zeros)


def timed(step: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def decoder_step(products: list[Callable], inputs: list) -> Callable[[], None]:
    between = torch.randn(3072)

    def step() -> None:
        for product, x in zip(products, inputs):
            product(x)
            torch.nn.functional.rms_norm(between, (3072,))  # a torch op between products, as in the model
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="16,8", help="thread counts; onnxruntime's pool takes the first")
    parser.add_argument("--layers", type=int, default=26)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    shapes = DECODER * args.layers + [HEAD]
    step_bytes = sum(q4_bytes(*shape) for shape in shapes)
    lines = []

    def emit(**fields: object) -> None:
        print(json.dumps(fields), flush=True)
        lines.append(fields)

    emit(what="machine", torch=torch.__version__, onnxruntime=ort.__version__, step_bytes=step_bytes)
    for count in threads:
        torch.set_num_threads(count)
        emit(what="bandwidth", threads=count, read_gb_per_s=read_bandwidth(count))
        seconds = timed(decoder_step([torch_product(*s) for s in shapes],
                                     [torch.randn(1, s[1]).bfloat16() for s in shapes]), args.repeats)
        emit(what="decoder step", kernel="torch int4 (bf16 activations)", threads=count, ms=seconds * 1e3,
             gb_per_s=step_bytes / seconds / 1e9)
    torch.set_num_threads(threads[0])  # onnxruntime's one pool is sized once per process
    for label, accuracy, zero_points, spin in [("int8 activations", 4, False, True),
                                               ("int8 activations, no spinning", 4, False, False),
                                               ("int8 activations, zero points", 4, True, True),
                                               ("float activations", 0, False, True)]:
        products = [onnx_product(*s, accuracy=accuracy, zero_points=zero_points, spin=spin) for s in shapes]
        seconds = timed(decoder_step(products, [np.random.randn(1, s[1]).astype(np.float32) for s in shapes]),
                        args.repeats)
        emit(what="decoder step", kernel=f"onnxruntime MatMulNBits, {label}", threads=threads[0],
             ms=seconds * 1e3, gb_per_s=step_bytes / seconds / 1e9)
    for rows in (1, 4, 16, 64, 256):
        products = [(torch_product(*s), onnx_product(*s, accuracy=4, zero_points=False, spin=True), s[1])
                    for s in ENCODER]
        torch_ms = sum(timed(lambda p=p, x=torch.randn(rows, k).bfloat16(): p(x), args.repeats)
                       for p, _, k in products) * 1e3
        onnx_ms = sum(timed(lambda p=p, x=np.random.randn(rows, k).astype(np.float32): p(x), args.repeats)
                      for _, p, k in products) * 1e3
        emit(what="encoder layer products", rows=rows, threads=threads[0], torch_int4_ms=torch_ms,
             onnx_int8_ms=onnx_ms)
    if args.json:
        args.json.write_text(json.dumps(lines, indent=1) + "\n")


if __name__ == "__main__":
    main()
