#!/bin/bash
# CPU measurements on the lent machine's host CPU (scratch driver; results land in $OUT).
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
lscpu | grep -E "Model name|Thread|Core|Socket|L3|NUMA"
grep -o -E 'amx_[a-z0-9]+|avx512_vnni|avx512_bf16' /proc/cpuinfo | sort -u | tr '\n' ' '; echo
python3 -c "import mistral_common, av, gguf, onnxruntime; print('deps ok', onnxruntime.__version__)" 2>&1 | tail -1
part_explore() { (cd bench && timeout "${1:-240}" python3 cpu_explore.py 16 8); }
part_full() {
    t=$(date +%s); timeout 300 python3 bench/cpu_quantized.py write --full --type "$1" --out /tmp/m-$1.gguf | tee "$OUT/write_$1.json"
    echo "write $1: $(( $(date +%s) - t )) s"
    for k in onnx torch; do
        VOXTRAL_CPU_KERNEL=$k timeout 200 python3 bench/cpu_quantized.py run /tmp/m-$1.gguf --seconds 10 --threads 16 \
            | tee "$OUT/run_$1_$k.json"
    done
}
for p in "$@"; do eval "part_$p"; done
