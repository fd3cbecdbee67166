#!/bin/bash
# Second round on the GPU machine: the compiled single-stream file path with preallocated caches (no
# recompilation when a cache would grow), and 256 concurrent streams in a fresh process.
set -u
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
timeout 200 python3 -m voxtral_realtime.cli bench --random-weights --no-progress --streams 256 --stream-seconds 20 \
    --audio-seconds 5 --json "$OUT/bench_h100_256streams.json" 2>&1 | tee "$OUT/bench_h100_256streams.txt"
timeout 250 python3 -m voxtral_realtime.cli bench --random-weights --no-progress --compile --step-batches 1 \
    --json "$OUT/bench_h100_compiled_file.json" 2>&1 | tee "$OUT/bench_h100_compiled_file.txt"
