#!/bin/bash
# Sixth round: one host-to-device copy per decoder step.  GPU tests, then the compiled single-stream path against
# transformers in the same run.
set -u
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_gpu.py 2>&1 | tail -3 | tee "$OUT/test_gpu_h100.txt"
timeout 260 python3 -m voxtral_realtime.cli bench --random-weights --no-progress --compile --step-batches 1 \
    --compare transformers --check-precision --json "$OUT/bench_h100_compiled.json" 2>&1 | grep -v Warn | tee "$OUT/bench_h100_compiled.txt"
