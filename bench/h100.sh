#!/bin/bash
# The speed measurements on the lent GPU machine (bench/results/): GPU and kernel tests; the compiled single
# stream against transformers in the same run; the decoder-step sweep with 64 and 128 live streams (CUDA graphs of
# the eager calls); 256 live streams in a fresh process (a process that has run the sweep first has less free
# memory).  Writes into $OUT (default bench/results).  Run from the repository root with the package importable.
set -u
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
bench() { timeout "$1" python3 -m voxtral_realtime.cli bench --random-weights --no-progress "${@:3}" \
              --json "$OUT/$2.json" 2>&1 | grep -v Warn | tee "$OUT/$2.txt"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_gpu.py 2>&1 | tail -3 \
    | tee "$OUT/test_gpu_h100.txt"
bench 260 bench_h100_compiled --compile --step-batches 1 --compare transformers --check-precision
bench 150 bench_h100_streams --audio-seconds 5 --step-batches 1,16,64,128,256 --streams 64,128 --stream-seconds 20
bench 120 bench_h100_256streams --audio-seconds 2 --streams 256 --stream-seconds 20
