#!/bin/bash
# Fifth round: split ("flash decoding") decode-attention kernel.  Kernel and GPU tests; the compiled single-stream
# path against transformers in the same run; the decoder-step sweep and 256 live streams (CUDA graphs of the
# eager calls) in a fresh process.
set -u
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_gpu.py 2>&1 | tail -3 | tee "$OUT/test_gpu_h100.txt"
timeout 260 python3 -m voxtral_realtime.cli bench --random-weights --no-progress --compile --step-batches 1 \
    --compare transformers --check-precision --json "$OUT/bench_h100_compiled.json" 2>&1 | grep -v Warn | tee "$OUT/bench_h100_compiled.txt"
timeout 150 python3 -m voxtral_realtime.cli bench --random-weights --no-progress --audio-seconds 5 \
    --step-batches 1,16,64,128,256 --streams 64,128 --stream-seconds 20 \
    --json "$OUT/bench_h100_streams.json" 2>&1 | tee "$OUT/bench_h100_streams.txt"
timeout 120 python3 -m voxtral_realtime.cli bench --random-weights --no-progress --audio-seconds 2 \
    --streams 256 --stream-seconds 20 \
    --json "$OUT/bench_h100_256streams.json" 2>&1 | tail -8 | tee "$OUT/bench_h100_256streams.txt"
