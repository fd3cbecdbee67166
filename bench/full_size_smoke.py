"""Full-size model with random weights on a GPU: write a real-format checkpoint, load it, transcribe 30 s.

Proves the loader handles the real shapes (711 tensors, 8.86 GB bf16) and records load time, transcription
time and peak GPU memory.  Timing does not depend on the weight values.

    python bench/full_size_smoke.py --out bench/results/full_size_smoke.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import voxtral_realtime
from voxtral_realtime.benchmarking.random_weights import write_random_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "voxtral-full")
    args = parser.parse_args()

    from voxtral_realtime.benchmarking.random_weights import write_tekken_json
    from voxtral_realtime.benchmarking.signals import speechlike

    gib = 1024 ** 3
    result: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                    "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "python": platform.python_version()}
    tekken = write_tekken_json(args.workdir / "tekken-src.json")
    t = time.perf_counter()
    folder = write_random_checkpoint(args.workdir / "ckpt", tekken, dtype=torch.bfloat16, device="cuda")
    result["write_checkpoint_s"] = round(time.perf_counter() - t, 1)
    result["checkpoint_bytes"] = (folder / "consolidated.safetensors").stat().st_size
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()

    t = time.perf_counter()
    model = voxtral_realtime.load(folder, device="cuda", dtype="bf16")
    torch.cuda.synchronize()
    result["load_s"] = round(time.perf_counter() - t, 1)
    result["weights_gib"] = round(sum(p.numel() * p.element_size() for p in model.network.parameters()) / gib, 3)
    result["peak_gib_after_load"] = round(torch.cuda.max_memory_allocated() / gib, 3)

    model.transcribe(speechlike(2.0, seed=1))  # warm-up: cuBLAS handles, allocator
    audio = speechlike(args.seconds, seed=2)
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = model.transcribe(audio)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t
    result.update({
        "audio_s": args.seconds, "transcribe_s": round(elapsed, 3), "rtf": round(elapsed / args.seconds, 4),
        "tokens": len(out.tokens), "ms_per_token": round(1000 * elapsed / max(1, len(out.tokens)), 2),
        "peak_gib_transcribe": round(torch.cuda.max_memory_allocated() / gib, 3),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / gib, 3),
    })
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
