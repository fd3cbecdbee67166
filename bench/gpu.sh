#!/bin/bash
# The speed measurements on the lent GPU machine (bench/results/).  Parts, run in the order given (default: all,
# in the order of their value if time runs out):
#   tests    GPU and kernel tests (tiny model on CUDA, compiled engines, the matmul kernels on every model shape)
#   tune     the matmul tuner: one-row 4-bit kernel tilings and the fused bf16 GEMV (M = 1) against cuBLAS
#   step     the decoder step: plain layers compiled vs the fused step (with / without PDL), their logits, profiles
#   fused    the fused GEMV's tilings (kernels.fused_linear, one row) against cuBLAS
#   bench    the compiled single stream against transformers in the same run, bf16 vs f32, q4_0 and q4_k rows
#   q4       the 4-bit kernel alone: its tests, the tuner on M = 1, the compiled bf16 and q4_0 single stream
#   batch    `voxtral batch` throughput over 256 synthetic 30 s files (issue 7)
#   streams  the decoder-step sweep and 64 / 128 live streams
#   streams256  256 live streams in a fresh process (a process that has run the sweep has less free memory)
#   ortgpu   keeps a carried .ortgpu/pN/part (onnxruntime-gpu in six parts: the wheel is over the carry limit) in
#            /tmp/ortparts, which lasts while the machine stays warm (a carried path the next call does not name is
#            removed), and installs the wheel once all six are there; run it with one part carried per call
#   webexport   issue 9: the full-size q4 export (sizes) and onnxruntime step times (CUDA when onnxruntime-gpu is
#               installed by the ortgpu part; else CPU only)
# Writes into $OUT (default bench/results), file names tagged with $TAG (default: the GPU's model, e.g. h200).
# Run from the repository root with the package importable:  bash bench/gpu.sh tests tune
set -u
OUT=${OUT:-bench/results}
TAG=${TAG:-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE 'h100|h200|a100|l40s|b200' \
             | tr '[:upper:]' '[:lower:]')}
TAG=${TAG:-gpu}
mkdir -p "$OUT"
bench() { timeout "$1" python3 -m voxtral_realtime.cli bench --random-weights --no-progress "${@:3}" \
              --json "$OUT/$2.json" 2>&1 | grep -v Warn | tee "$OUT/$2.txt"; }

part_tests() {
    timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_attention.py tests/test_kernels_q4.py \
        tests/test_devices.py tests/test_decoder_step.py 2>&1 | tail -15 | tee "$OUT/test_gpu_$TAG.txt"
}
part_tune() {
    timeout 330 python3 bench/tune_gemv.py --seconds-per-case "${TUNE_SECONDS:-12}" --json "$OUT/tune_gemv_$TAG.json" \
        2>&1 | grep -v Warn | tee "$OUT/tune_gemv_$TAG.txt"
}
part_step() {
    timeout 420 python3 bench/tune_step.py --json "$OUT/tune_step_$TAG.json" 2>&1 | grep -v Warn \
        | tee "$OUT/tune_step_$TAG.txt"
}
part_fused() {
    timeout 200 python3 bench/tune_gemv.py --q4-rows "" --fused-rows 1 \
        --seconds-per-case "${TUNE_SECONDS:-8}" --json "$OUT/tune_fused_$TAG.json" 2>&1 | grep -v Warn \
        | tee "$OUT/tune_fused_$TAG.txt"
}
part_bench() {
    bench 420 "bench_${TAG}_compiled" --compile --step-batches 1 --compare transformers --check-precision \
        --quant "${QUANT:-q4_0,q4_k}"
}
part_q4() {
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_q4.py 2>&1 | tail -2
    timeout 150 python3 bench/tune_gemv.py --fused-rows "" --q4-rows 1 --seconds-per-case "${TUNE_SECONDS:-12}" \
        --json "$OUT/tune_q4_$TAG.json" 2>&1 | grep -v Warn > "$OUT/tune_q4_$TAG.txt"
    grep -A8 "best per case" "$OUT/tune_q4_$TAG.txt"
    bench 250 "bench_${TAG}_q4" --compile --step-batches 1 --quant q4_0
}
part_batch() {
    python3 - <<'PY'
import pathlib, wave
import numpy as np
from voxtral_realtime.benchmarking.signals import speechlike
folder = pathlib.Path("/tmp/batch_audio")
folder.mkdir(exist_ok=True)
for i in range(256):
    pcm = (np.clip(speechlike(30.0, seed=i), -1, 1) * 32767).astype("<i2")
    with wave.open(str(folder / f"{i:03d}.wav"), "wb") as out:
        out.setnchannels(1), out.setsampwidth(2), out.setframerate(16000), out.writeframes(pcm.tobytes())
PY
    rm -f /tmp/batch_out.jsonl
    timeout 300 python3 -m voxtral_realtime.cli batch /tmp/batch_audio --output /tmp/batch_out.jsonl \
        --random-weights --streams-per-worker 128 --no-progress 2>&1 | grep -v Warn | tee "$OUT/batch_$TAG.txt"
    head -c 600 /tmp/batch_out.jsonl; echo
}
part_streams() {
    bench 150 "bench_${TAG}_streams" --audio-seconds 5 --step-batches 1,16,64,128,256 --streams 64,128 \
        --stream-seconds 20
}
part_streams256() {
    bench 120 "bench_${TAG}_256streams" --audio-seconds 2 --streams 256 --stream-seconds 20
}

part_ortgpu() {
    mkdir -p /tmp/ortparts
    for part in .ortgpu/p?/part; do [ -f "$part" ] && cp "$part" "/tmp/ortparts/$(basename "$(dirname "$part")")"; done
    ls /tmp/ortparts
    if [ "$(ls /tmp/ortparts | wc -l)" -eq 6 ] && [ ! -d /tmp/ortgpu-site ]; then
        local wheel=/tmp/onnxruntime_gpu-1.30.0-cp312-cp312-manylinux_2_28_x86_64.whl
        cat /tmp/ortparts/p0 /tmp/ortparts/p1 /tmp/ortparts/p2 /tmp/ortparts/p3 /tmp/ortparts/p4 /tmp/ortparts/p5 > $wheel
        sha256sum $wheel
        python3 -m pip install -q --no-deps --no-index --target /tmp/ortgpu-site $wheel
    fi
}
part_webexport() {
    [ -d /tmp/ortgpu-site ] && export PYTHONPATH=/tmp/ortgpu-site:$PYTHONPATH
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 timeout -k 5 585 python3 bench/web_export_full.py --quant q4 \
        --out /tmp/web-q4 --steps 20 --cuda-numpy-steps 5 --cpu-steps 10 --budget-s 530 \
        --json "$OUT/web_export_full_q4_$TAG.json" 2>&1 | tee "$OUT/web_export_full_q4_$TAG.txt" | tail -30
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu_$TAG.txt"
for part in "${@:-tests tune bench batch streams streams256}"; do
    for p in $part; do echo "=== $p"; "part_$p"; done
done
