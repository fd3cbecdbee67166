"""CPU memory and speed of a quantized GGUF model: peak and steady resident memory, time per decoder step (with
the encoder, through a transcription; and the decoder step alone, one stream 400 tokens in).

    python bench/cpu_quantized.py write --full --type q4_0 --out /tmp/voxtral-full-q4_0.gguf   # random weights
    python bench/cpu_quantized.py run /tmp/voxtral-full-q4_0.gguf --seconds 2                 # fresh process

``write --full`` makes a full-size file from random weights one tensor at a time (never the float model);
``write --source DIR`` quantizes a checkpoint folder.  ``run`` loads the file on the CPU in this process (so the
memory numbers are the model's alone: run it as its own command) and transcribes synthetic audio.  Memory is
the kernel's VmRSS / VmHWM of this process; times are wall clock and this process's CPU time (the latter is
what to compare on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def _memory() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 2**20  # kB -> GiB
    return fields


def cmd_write(args: argparse.Namespace) -> None:
    from voxtral_realtime.benchmarking.random_weights import AUDIO_BLOCK, write_random_gguf, write_tekken_json
    from voxtral_realtime.config import FULL_SIZE_PARAMS, ModelConfig
    from voxtral_realtime.gguf_file import write_gguf

    started = time.perf_counter()
    if args.full:
        with tempfile.TemporaryDirectory() as folder:
            tekken = write_tekken_json(Path(folder) / "tekken.json")
            config = ModelConfig.from_params_json(FULL_SIZE_PARAMS, dict(AUDIO_BLOCK))
            files = write_random_gguf(config, FULL_SIZE_PARAMS, tekken, args.out, qtype=args.type)
    else:
        files = write_gguf(args.source, args.out, qtype=args.type)
    print(json.dumps({"files": [str(f) for f in files], "bytes": sum(f.stat().st_size for f in files),
                      "seconds": time.perf_counter() - started, **_memory()}))


def cmd_run(args: argparse.Namespace) -> None:
    import torch

    import voxtral_realtime
    from voxtral_realtime.benchmarking import benchmark
    from voxtral_realtime.benchmarking.signals import speechlike
    from voxtral_realtime.protocol import prompt_ids
    from voxtral_realtime.quantization import quantized_bytes

    torch.set_num_threads(args.threads)
    before = _memory()
    started, cpu = time.perf_counter(), time.process_time()
    model = voxtral_realtime.load(args.model, device="cpu")
    load_s, load_cpu_s = time.perf_counter() - started, time.process_time() - cpu
    after_load = _memory()
    audio = speechlike(args.seconds, seed=1)
    started, cpu = time.perf_counter(), time.process_time()
    result = model.transcribe(audio)
    seconds, cpu_s = time.perf_counter() - started, time.process_time() - cpu
    after_transcribe = _memory()
    audio_cfg = model.config.audio
    steps = len(result.tokens) + len(prompt_ids(model.tokenizer, audio_cfg, audio_cfg.delay_tokens())) - 1
    step = benchmark.bench_step(model, 1, 400, steps=10)  # the decoder alone, one stream 400 tokens in
    print(json.dumps({"model": str(args.model), "threads": args.threads, "weights_gib":
                      {k: v / 2**30 for k, v in quantized_bytes(model.network).items()},
                      "rss_before_gib": before["VmRSS"], "rss_after_load_gib": after_load["VmRSS"],
                      "peak_during_load_gib": after_load["VmHWM"], "load_s": load_s,
                      "load_cpu_s": load_cpu_s, "audio_s": args.seconds, "transcribe_s": seconds,
                      "transcribe_cpu_s": cpu_s, "decoder_steps": steps, "s_per_step_incl_encoder": seconds / steps,
                      "decoder_ms_per_step": step["ms_per_step"], "decoder_gb_per_s": step["gb_per_s"],
                      "rss_after_transcribe_gib": after_transcribe["VmRSS"],
                      "peak_through_transcribe_gib": after_transcribe["VmHWM"],
                      "rss_after_step_bench_gib": _memory()["VmRSS"], "peak_gib": _memory()["VmHWM"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    wr = sub.add_parser("write")
    wr.add_argument("--full", action="store_true", help="full-size random weights")
    wr.add_argument("--source", help="checkpoint folder to quantize instead")
    wr.add_argument("--type", default="q4_0", choices=["q4_0", "q4_k", "q8_0"])
    wr.add_argument("--out", required=True, type=Path)
    wr.set_defaults(func=cmd_write)
    rn = sub.add_parser("run")
    rn.add_argument("model", help="GGUF file or checkpoint folder")
    rn.add_argument("--seconds", type=float, default=2.0)
    rn.add_argument("--threads", type=int, default=2)
    rn.set_defaults(func=cmd_run)
    args = parser.parse_args()
    if args.command == "write" and not (args.full or args.source):
        sys.exit("write: give --full or --source DIR")
    args.func(args)


if __name__ == "__main__":
    main()
