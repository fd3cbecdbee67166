"""``voxtral export web``: the browser export (:mod:`..browser`)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from .. import browser
from ..api import load
from ..browser import QUANTS
from ..errors import VoxtralError
from ..loading import DEFAULT_MODEL
from ..writers import WRITERS
from .common import DELAY_HELP, Reporter, delay_ms, positive_int

EPILOG_EXPORT_WEB = """\
examples:
  voxtral export web --model ./voxtral --out site/ --quant q4
  voxtral export web --model ./tiny --out site/ --quant fp32 --check talk.wav --output-format json
  voxtral export web --model ./voxtral --out site/ --onnxruntime-web npm   # the page and its runtime too
  cd site && python -m http.server 8000                   # then open http://localhost:8000/

OUT gets audio_step.onnx and decoder_step.onnx (one 80 ms streaming step each, all state as inputs/outputs),
their weights in files of at most 512 MB, tekken.json and manifest.json (sizes and sha256 of every file).
--check AUDIO runs the exported graphs with onnxruntime on AUDIO and prints what `voxtral transcribe` prints;
stderr says how many tokens equal the PyTorch model's.  Needs: pip install onnx onnxruntime onnxscript.
"""

def add_parser(sub: Any) -> None:
    ex = sub.add_parser("export", help="export the model for other runtimes (the browser)",
                        description="Export the model for other runtimes.")
    targets = ex.add_subparsers(dest="target", metavar="TARGET", required=True)
    web = targets.add_parser("web", help="ONNX graphs + manifest (+ the page) for a static web page",
                             description="Export ONNX step graphs, weight shards, tokenizer and manifest for the "
                                         "in-browser page (onnxruntime-web, WebGPU or WebAssembly).",
                             epilog=EPILOG_EXPORT_WEB, formatter_class=argparse.RawDescriptionHelpFormatter)
    web.add_argument("--model", default=os.environ.get("VOXTRAL_MODEL", DEFAULT_MODEL), metavar="REPO_OR_DIR",
                     help="Hub repo id or local checkpoint folder (default: %(default)s)")
    web.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder to write (created if missing)")
    web.add_argument("--quant", choices=QUANTS, default="q4",
                     help="weights: q4/q8 (onnxruntime MatMulNBits, blocks of 32), fp16 (stored half, computed in "
                          "float32) or fp32 (default: %(default)s)")
    web.add_argument("--decoder-context", type=positive_int, metavar="TOKENS",
                     help="cap the decoder's attention window (80 ms tokens) below the model's to shrink the "
                          "page's KV buffers; streams shorter than this are exact (default: the model's)")
    web.add_argument("--onnxruntime-web", metavar="TGZ|DIR|npm",
                     help="also write the page, with onnxruntime-web's files from this npm tarball (npm pack "
                          "onnxruntime-web@VERSION), node_modules/onnxruntime-web folder, or 'npm': the pinned "
                          "version fetched with npm pack into ~/.cache/voxtral-realtime")
    web.add_argument("--check", type=Path, metavar="AUDIO",
                     help="after exporting, transcribe AUDIO with the exported graphs (onnxruntime, CPU)")
    web.add_argument("--delay-ms", type=delay_ms, help=DELAY_HELP + " (for --check)")
    web.add_argument("--output-format", choices=["txt", "json"], default="txt", help="of --check (default: txt)")
    web.add_argument("--no-progress", action="store_true", help="no progress bars (default when stderr is not a tty)")
    web.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    browser.require_onnx()  # before loading gigabytes of weights
    reporter = Reporter(enabled=not args.no_progress)
    if args.check is not None and not args.check.is_file():
        raise VoxtralError(f"{args.check}: no such file")
    if args.out.exists() and not args.out.is_dir():
        raise VoxtralError(f"{args.out}: exists and is not a folder")
    with reporter.bar("loading model", total=1, unit=" tensors") as update:
        # export traces float32 on the CPU whatever the machine has: the graphs must not depend on it
        model = load(args.model, device="cpu", dtype="f32", progress=update)
    with reporter.bar("exporting", total=7, unit=" stages") as update:
        manifest = browser.export_web(model, args.out, quant=args.quant, decoder_context=args.decoder_context,
                                         progress=lambda done, total, what: update(done, total))
    if args.onnxruntime_web:
        browser.copy_page(args.out, args.onnxruntime_web)
    total = sum(f["bytes"] for f in manifest["files"])
    reporter.info(f"wrote {args.out}: {len(manifest['files'])} files, {total / 1e6:.1f} MB ({args.quant})")
    if args.check is None:
        return 0
    exported = browser.WebExport(args.out)
    result = exported.transcribe(args.check, delay_ms=args.delay_ms)
    reference = model.transcribe(args.check, delay_ms=args.delay_ms).tokens
    same = sum(a == b for a, b in zip(result.tokens, reference))
    reporter.info(f"check: {same}/{max(len(reference), len(result.tokens))} tokens equal to the PyTorch model's"
                  + (" (identical)" if result.tokens == reference else ""))
    if args.output_format == "json":
        print(json.dumps({"file": str(args.check), **result.to_dict()}, ensure_ascii=False, indent=2))
    else:
        print(WRITERS["txt"](result), end="", flush=True)
    return 0
