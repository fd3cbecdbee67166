"""Time from a model on disk to its first decided text, the stages a user waits through on a first run.

    python bench/first_text.py MODEL [--device cuda|cpu] [--threads N] [--seconds 10] [--json FILE]

MODEL is what `voxtral transcribe --model` takes (a folder, a GGUF file, a Hub id already in the cache).  Stages:
``load`` (tokenizer, weights to the device), ``warm_up`` (compilation / CUDA graph capture, as `voxtral transcribe`
does before the first audio), then synthetic speech-like audio fed 80 ms at a time as fast as it is computed
until the session returns its first non-empty text (``first_text``: the audio's arrival is not waited for, so this
is compute only).  Run it in a fresh process: a second load in one process finds warm caches.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import voxtral_realtime
from voxtral_realtime.benchmarking.signals import speechlike


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=10.0, help="audio available to reach the first text")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = voxtral_realtime.load(args.model, device=args.device)
    loaded = time.perf_counter()
    model.warm_up()
    warm = time.perf_counter()
    session = model.stream()
    audio = speechlike(args.seconds, seed=1)
    step = model.config.audio.samples_per_token
    text, fed = "", 0
    while not text and fed < len(audio):
        text = session.feed(audio[fed:fed + step])
        fed += step
    done = time.perf_counter()
    report = {"model": args.model, "device": str(model.device), "threads": torch.get_num_threads(),
              "load_s": loaded - started, "warm_up_s": warm - loaded, "first_text_s": done - warm,
              "total_s": done - started, "audio_fed_s": fed / model.config.audio.sample_rate, "text": text,
              "gpu": torch.cuda.get_device_name() if model.device.type == "cuda" else None}
    print(json.dumps(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
