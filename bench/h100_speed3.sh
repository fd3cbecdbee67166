#!/bin/bash
# Third round: the Triton decode-attention kernel.  Kernel and GPU tests, then the single-stream path with CUDA
# graphs of the eager step and compiled, then the step sweep and 256 streams.
set -u
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_gpu.py 2>&1 | tail -6 | tee "$OUT/test_gpu_kernels.txt"
timeout 150 python3 -m voxtral_realtime.cli bench --random-weights --no-progress --step-batches 1 \
    --compare transformers --json "$OUT/bench_h100_kernel_file.json" 2>&1 | grep -v Warn | tee "$OUT/bench_h100_kernel_file.txt"
timeout 200 python3 -m voxtral_realtime.cli bench --random-weights --no-progress --compile --step-batches 1 \
    --json "$OUT/bench_h100_kernel_compiled.json" 2>&1 | tee "$OUT/bench_h100_kernel_compiled.txt"
