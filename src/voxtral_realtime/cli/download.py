"""``voxtral download``: a Hub model into the local cache."""

from __future__ import annotations

import argparse
from typing import Any

from ..loading import DEFAULT_MODEL, download
from .common import Reporter, add_revision_option


def add_parser(sub: Any) -> None:
    dl = sub.add_parser("download", help="download a model from the Hugging Face Hub into the local cache",
                        description="Download (or resume downloading) the files of a checkpoint that voxtral "
                                    "loads into the Hugging Face cache, check the cached ones against the Hub's "
                                    "sizes and hashes (fetching a damaged one again), and print the local folder.")
    dl.add_argument("--no-progress", action="store_true", help="no progress bar (default when stderr is not a tty)")
    dl.add_argument("repo", nargs="?", default=DEFAULT_MODEL, help="repo id (default: %(default)s)")
    add_revision_option(dl)
    dl.add_argument("--cache-dir", help="cache folder (default: the Hugging Face cache, $HF_HOME)")
    dl.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with Reporter(enabled=not args.no_progress).stages() as stages:
        folder = download(args.repo, revision=args.revision, cache_dir=args.cache_dir, progress=stages.transfer,
                          verify=True, status=stages.stage)
    print(folder)
    return 0
