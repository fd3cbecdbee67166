#!/bin/bash
# The speed issue's measurements on the lent GPU machine: GPU tests, then `voxtral bench` with random full-size
# weights.  Writes into $OUT (default bench/results).  Run from the repository root with the package importable.
set -u
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -8 | tee "$OUT/test_gpu.txt"
timeout 480 python3 -m voxtral_realtime.cli bench --random-weights --no-progress \
    --step-batches 1,16,64,128,256 --streams 64,128,256 --stream-seconds 20 \
    --compare transformers --check-precision --json "$OUT/bench_h100.json" 2>&1 | tee "$OUT/bench_h100.txt"
