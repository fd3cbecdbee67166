"""``voxtral download``: a Hub model into the local cache."""

from __future__ import annotations

import argparse
from typing import Any

from ..loading import DEFAULT_MODEL, download


def add_parser(sub: Any) -> None:
    dl = sub.add_parser("download", help="download a model from the Hugging Face Hub into the local cache",
                        description="Download (or resume downloading) a checkpoint into the Hugging Face cache and "
                                    "print its local folder.")
    dl.add_argument("repo", nargs="?", default=DEFAULT_MODEL, help="repo id (default: %(default)s)")
    dl.add_argument("--cache-dir", help="cache folder (default: the Hugging Face cache, $HF_HOME)")
    dl.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(download(args.repo, cache_dir=args.cache_dir))
    return 0
