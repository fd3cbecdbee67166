"""``voxtral quantize``: a checkpoint to a quantized GGUF file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..gguf_file import EMBEDDING_TYPES, write_gguf
from .common import Reporter, size

EPILOG_QUANTIZE = """\
examples:
  voxtral quantize mistralai/Voxtral-Mini-4B-Realtime-2602 --out voxtral-q4.gguf      # Q4_K
  voxtral quantize ./voxtral --out voxtral-q4_0.gguf --quant q4_0   # the Rust project's types exactly
  voxtral quantize ./voxtral --out web/voxtral.gguf --split-size 512M   # web/voxtral-0000i-of-0000N.gguf
  voxtral transcribe talk.wav --gguf voxtral-q4.gguf

Linear weights get --quant (q4_k rows that are not whole 256-value blocks get q4_0); the tied token table gets
--embeddings; norms, biases and the conv stem stay float32.  Names are the Mistral checkpoint's, as in the Rust
project's file; params.json and tekken.json go into the metadata.  On the CPU the 4-bit model runs with torch's
int4 kernel without ever expanding the weights.
"""

def add_parser(sub: Any) -> None:
    qu = sub.add_parser("quantize", help="write a quantized GGUF file (Q4_0, Q4_K, Q8_0) of a checkpoint",
                        description="Quantize a checkpoint (Mistral or transformers folder, or Hub repo id) into "
                                    "a GGUF file that `voxtral transcribe --gguf` and the Rust project load.",
                        epilog=EPILOG_QUANTIZE, formatter_class=argparse.RawDescriptionHelpFormatter)
    qu.add_argument("source", metavar="SRC", help="Hub repo id or local checkpoint folder")
    qu.add_argument("--out", required=True, type=Path, metavar="FILE.gguf", help="the file to write")
    qu.add_argument("--quant", "--type", dest="quant", choices=["q4_0", "q4_k", "q8_0"], default="q4_k",
                    help="block format of the linear weights (default: %(default)s; q4_0 is what the Rust project "
                         "writes, q8_0 is closest to the float model)")
    qu.add_argument("--embeddings", choices=EMBEDDING_TYPES, default="same",
                    help="format of the tied token table / LM head ('same': --quant; default: %(default)s)")
    qu.add_argument("--split-size", type=size, metavar="SIZE",
                    help="cut the file into shards of at most SIZE bytes (e.g. 512M, 2G): FILE-00001-of-0000N.gguf...")
    qu.add_argument("--no-tokenizer", action="store_true",
                    help="do not copy tekken.json into the file (15 MB); the file then names 'tekken.json' beside "
                         "it, or loads with --tokenizer")
    qu.add_argument("--cache-dir", help="Hub cache folder (default: the Hugging Face cache, $HF_HOME)")
    qu.add_argument("--no-progress", action="store_true", help="no progress bar (default when stderr is not a tty)")
    qu.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    reporter = Reporter(enabled=not args.no_progress)
    with reporter.bar(f"quantizing to {args.quant}", total=1, unit=" tensors") as update:
        files = write_gguf(args.source, args.out, qtype=args.quant, embeddings=args.embeddings,
                           split_size=args.split_size, embed_tokenizer=not args.no_tokenizer,
                           cache_dir=args.cache_dir, progress=update)
    for file in files:
        reporter.info(f"wrote {file} ({file.stat().st_size / 2**20:.1f} MiB)")
    return 0
