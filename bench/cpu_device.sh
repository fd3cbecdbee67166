#!/bin/bash
# CPU measurements on the lent GPU machine's host CPU, ours and CrispASR's (ggml) in one run.
#   bash bench/cpu_device.sh setup write crispbuild bench    (carry .peer: wheels, crispasr.tar.xz, peer scripts)
# write / crispbuild fill the caches (~/.cache/voxtral-realtime) that `voxtral bench --device cpu --random-weights
# --compare crispasr` would otherwise build inside its first run (each command has 10 minutes there).
# .peer/ holds what the machine lacks: wheels (installed only where an import fails), CrispASR's wheel unpacked
# (duplicate .so copies as links, .tar.xz), its converter (CrispStrobe/CrispASR models/convert-voxtral4b-to-gguf.py
# at 72d3c389) and the peer harness (make_random_hf.py, quantize_gguf.py, crisp_bench.py).  Results go to $OUT.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:/tmp/site
T=${THREADS:-16}
log() { echo "[$(date +%T)] $*"; }
part_setup() {
    lscpu | grep -E "Model name|Thread|Core|Socket|L3|NUMA" | tee "$OUT/cpu.txt"
    grep -o -E 'amx_[a-z0-9]+|avx512_vnni|avx512_bf16|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ' | tee -a "$OUT/cpu.txt"; echo
    mkdir -p /tmp/site
    for pair in av:av gguf:gguf mistral_common:mistral_common pydantic:pydantic pydantic_core:pydantic_core \
                jsonschema:jsonschema jsonschema_specifications:jsonschema_specifications referencing:referencing \
                rpds:rpds_py attrs:attrs annotated_types:annotated_types typing_inspection:typing_inspection; do
        python3 -c "import ${pair%%:*}" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile \
            --target /tmp/site .peer/whl/${pair##*:}-*.whl
    done
    tar xJf .peer/crispasr.tar.xz -C /tmp/site
    python3 -c "import voxtral_realtime, onnxruntime, crispasr; print('imports ok, onnxruntime', onnxruntime.__version__)"
}
part_bandwidth() {
    python3 - <<'PY' | tee "$OUT/bandwidth.json"
import json, os, time, torch
out = {}
x = torch.ones(2**30)  # 4 GiB of float32, read by a sum
for t in (16, 8):
    torch.set_num_threads(t); x.sum()
    best = min((lambda a: (x.sum(), time.perf_counter() - a)[1])(time.perf_counter()) for _ in range(5))
    out[f"read_gb_per_s_{t}_threads"] = x.numel() * 4 / best / 1e9
print(json.dumps(out))
PY
}
part_kernels() {  # the kernel candidates on the decoder's shapes (bench/cpu_kernels_compare.py)
    timeout 300 python3 bench/cpu_kernels_compare.py --threads 16,8 --json "$OUT/cpu_kernels_compare.json"
}
part_write() {  # the GGUF writer timed afresh; the files stay in the bench's cache
    for q in ${QUANTS:-q4_k}; do
        rm -f ~/.cache/voxtral-realtime/random-full-$q.gguf
        log "write $q"; t=$(date +%s)
        timeout 500 python3 -c "from voxtral_realtime.benchmarking import cpu; print(cpu.random_gguf('$q'))"
        log "wrote $q in $(( $(date +%s) - t )) s"
    done
}
part_crispbuild() {
    log "crisp build"; timeout 500 python3 -c "from pathlib import Path; from voxtral_realtime.benchmarking import crispasr
print(crispasr.crispasr_gguf(Path('.peer/convert-voxtral4b-to-gguf.py'), threads=$T))"
}
part_bench() {  # every number of issue 24 at $T threads for each kernel; CrispASR beside the onnx run
    for k in ${KERNELS:-onnx}; do
        compare=(); [ "$k" = onnx ] && compare=(--compare crispasr --crispasr-converter .peer/convert-voxtral4b-to-gguf.py)
        log "bench $k $T"; VOXTRAL_CPU_KERNEL=$k timeout 580 python3 -m voxtral_realtime.cli bench --device cpu \
            --random-weights --threads $T --quant "$(echo ${QUANTS:-q4_k} | tr ' ' ,)" "${compare[@]}" --no-progress \
            --json "$OUT/cpu_bench_${k}_$T.json" | tee "$OUT/cpu_bench_${k}_$T.txt"
    done
    log done
}
part_crisp() {
    python3 -c "
import wave, numpy as np
from voxtral_realtime.benchmarking.signals import speechlike
a = (np.clip(speechlike(10.0, seed=1), -1, 1) * 32767).astype('<i2')
w = wave.open('/tmp/a10.wav', 'wb'); w.setnchannels(1); w.setsampwidth(2); w.setframerate(16000); w.writeframes(a.tobytes())"
    log "hf"; timeout 120 python3 .peer/make_random_hf.py /tmp/hf --size full --dtype f16 | tail -2
    log "convert"; timeout 90 python3 .peer/convert-voxtral4b-to-gguf.py --input /tmp/hf --output /tmp/f16.gguf | tail -2
    rm -rf /tmp/hf
    log "quantize"; timeout 150 python3 .peer/quantize_gguf.py /tmp/f16.gguf /tmp/q4k.gguf q4_k --threads 16 | tail -2
    rm -f /tmp/f16.gguf
    log "bench"; timeout 90 python3 .peer/crisp_bench.py /tmp/q4k.gguf /tmp/a10.wav $T \
        --env CRISPASR_VOXTRAL4B_STREAM_BATCH_ENCODER=1 | tee "$OUT/crisp_q4k_offline_$T.json"
    timeout 60 python3 .peer/crisp_bench.py /tmp/q4k.gguf /tmp/a10.wav $T --mode stream --live \
        | tee "$OUT/crisp_q4k_live_$T.json"
    log done
}
for p in "$@"; do log "part $p"; "part_$p"; done
