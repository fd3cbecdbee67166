"""4-bit products of many rows (a file's encoder chunks, batched decoder steps and ticks): dequantizing the weight
for cuBLAS (``kernels.q4_dequantize`` then a bf16 matmul, what ``kernels.quantized_matmul`` does for more than
one row) against cuBLAS on a bf16 weight, per weight shape and number of rows M.  A diagnostic for developers.
(bench/results/tune_q4_rows_h200.txt has a third column: the tensor-core kernel that dequantized its tiles in
registers, 1.02x (the decoder's gate/up, M = 16) to 29x slower than this path, removed after that run.)

    python3 bench/tune_q4_rows.py [--rows 16,64,128,256,512,1024,2048] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from tune_gemv import random_q4, timed

from voxtral_realtime import kernels

#: (N, K) of the encoder's products, then the decoder's
SHAPES = {"enc_wqkv": (6144, 1280), "enc_wo": (1280, 2048), "enc_w13": (10240, 1280), "enc_w2": (1280, 5120),
          "dec_wqkv": (6144, 3072), "dec_wo": (3072, 4096), "dec_w13": (18432, 3072), "dec_w2": (3072, 9216)}


def _times(x: torch.Tensor, weights: list, dense: list[torch.Tensor]) -> dict[str, float]:
    """Seconds per product of x with the weights (two copies, alternating) by each path."""
    return {
        "dequantize + cuBLAS": timed(lambda i: x @ kernels.q4_dequantize(*weights[i % 2], x.dtype).T),
        "bf16 cuBLAS": timed(lambda i: x @ dense[i % 2].T),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="16,64,128,256,512,1024,2048")
    parser.add_argument("--json")
    args = parser.parse_args()
    report = {"command": " ".join(["python3", *sys.argv]), "device_name": torch.cuda.get_device_name(), "rows": []}
    print(report["device_name"], torch.__version__, flush=True)
    for name, (n, k) in SHAPES.items():
        weights = random_q4(n, k, copies=2)
        dense = [kernels.q4_dequantize(*w, torch.bfloat16) for w in weights]
        for m in map(int, args.rows.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            times = _times(x, weights, dense)
            row = {"shape": name, "n": n, "k": k, "m": m, **{key: 1e6 * t for key, t in times.items()}}
            report["rows"].append(row)
            print(f"{name:9s} M={m:5d}: " + ", ".join(f"{key} {1e6 * t:8.1f} us" for key, t in times.items())
                  + f"  ({2 * m * n * k / min(times.values()) / 1e12:.0f} TFLOP/s best)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
