#!/bin/bash
# The speed issue's measurements on the lent GPU machine: GPU tests, then `voxtral bench` with random full-size
# weights: the single-stream path compiled (one batch size: one compilation), then the decoder step and the
# concurrent-stream sweep with CUDA graphs of the eager calls (no compilation per batch size).
# Writes into $OUT (default bench/results).  Run from the repository root with the package importable.
set -u
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -4 | tee "$OUT/test_gpu.txt"
timeout 270 python3 -m voxtral_realtime.cli bench --random-weights --no-progress --compile \
    --step-batches 1 --compare transformers --check-precision \
    --json "$OUT/bench_h100_single.json" 2>&1 | grep -v Warn | tee "$OUT/bench_h100_single.txt"
timeout 200 python3 -m voxtral_realtime.cli bench --random-weights --no-progress --audio-seconds 5 \
    --step-batches 1,16,64,128,256 --streams 64,128,256,320 --stream-seconds 20 \
    --json "$OUT/bench_h100_streams.json" 2>&1 | tee "$OUT/bench_h100_streams.txt"
