"""The full-size model (random weights) through `voxtral export web`: export time, file sizes per graph against the
arithmetic of `estimate_export_bytes`, and onnxruntime (CPU) time per audio step and per decoder step.

    python3 bench/web_export_full.py --quant q4 --out /tmp/web-q4 --json bench/results/web_export_q4.json

Needs about 60 GB of memory for the float32 model, its traced graphs and the quantizer's copies, and the disk for
the float32 graphs in a temporary folder (18 GB) plus the export.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from voxtral_realtime.api import Model
from voxtral_realtime.config import ModelConfig
from voxtral_realtime.random_weights import AUDIO_BLOCK, full_size_config, random_network, write_tekken_json
from voxtral_realtime.tokenizer import Tokenizer
from voxtral_realtime.web_export import WebExport, estimate_export_bytes, export_web


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quant", default="q4")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each graph")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--params", type=Path, help="a params.json of other shapes (a quick trial of this script)")
    args = parser.parse_args()
    report: dict = {"quant": args.quant, "cpu_count": os.cpu_count(), "machine": platform.node(),
                    "torch": torch.__version__}
    started = time.perf_counter()
    tekken_dir = tempfile.mkdtemp(prefix="voxtral-tekken-")
    config = (ModelConfig.from_params_json(json.loads(args.params.read_text()), dict(AUDIO_BLOCK)) if args.params
              else full_size_config())
    network = random_network(config, device="cpu", dtype=torch.float32, seed=0)
    model = Model(network, Tokenizer(write_tekken_json(Path(tekken_dir) / "tekken.json")), source="random-full-size")
    report["build_s"] = time.perf_counter() - started

    started = time.perf_counter()
    manifest = export_web(model, args.out, quant=args.quant,
                          progress=lambda done, total, what: print(f"[{done}/{total}] {what} "
                                                                   f"{time.perf_counter() - started:.0f} s",
                                                                   flush=True))
    report["export_s"] = time.perf_counter() - started
    del model, network
    files = {f["name"]: f["bytes"] for f in manifest["files"]}
    report["files"] = files
    measured = {key: sum(b for n, b in files.items() if n.startswith(stem + "."))
                for key, stem in (("audio_graph", "audio_step"), ("decoder_graph", "decoder_step"))}
    report["measured_bytes"] = {**measured, "download": sum(measured.values())}
    report["estimated_bytes"] = estimate_export_bytes(config, args.quant)
    report["largest_file_bytes"] = max(files.values())
    print(json.dumps({k: report[k] for k in ("measured_bytes", "estimated_bytes", "largest_file_bytes")}),
          flush=True)

    started = time.perf_counter()
    exported = WebExport(args.out, verify=False)
    report["session_load_s"] = time.perf_counter() - started
    engine = exported.engine_for_session()
    for state in (engine.audio_state, engine.decoder_state):
        state.reset()
    audio_session, decoder_session = exported.sessions["audio"], exported.sessions["decoder"]
    window = manifest["audio"]["step_window"]
    rng = np.random.default_rng(0)
    audio_times, decoder_times = [], []
    embedding = None
    for step in range(args.steps + 2):  # the first two calls warm up
        feeds = {"samples": (0.1 * rng.standard_normal(window)).astype(np.float32),
                 "position": np.array([4 * step], np.int64), **engine.audio_state.values}
        t = time.perf_counter()
        outputs = audio_session.run(engine._audio_outputs, feeds)
        audio_times.append(time.perf_counter() - t)
        engine.audio_state.update(engine._audio_outputs, outputs)
        embedding = outputs[0]
        feeds = {"token": np.array([32], np.int64), "audio": embedding, "position": np.array([step], np.int64),
                 "delay": np.array([6.0], np.float32), **engine.decoder_state.values}
        t = time.perf_counter()
        outputs = decoder_session.run(engine._decoder_outputs, feeds)
        decoder_times.append(time.perf_counter() - t)
        engine.decoder_state.update(engine._decoder_outputs, outputs)
    report["onnxruntime_cpu_audio_step_ms"] = 1000 * float(np.median(audio_times[2:]))
    report["onnxruntime_cpu_decoder_step_ms"] = 1000 * float(np.median(decoder_times[2:]))
    report["real_time_factor_cpu"] = (report["onnxruntime_cpu_audio_step_ms"]
                                      + report["onnxruntime_cpu_decoder_step_ms"]) / 80
    print(json.dumps(report, indent=2), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
