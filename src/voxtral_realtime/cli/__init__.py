"""The ``voxtral`` command line: a thin layer over :mod:`voxtral_realtime.api`, one module per subcommand.

Transcripts go to stdout, progress bars and messages to stderr.  A user mistake (a :class:`.errors.VoxtralError`)
prints one ``error:`` line and exits non-zero; in a run over several files a bad file is reported and the others
are still transcribed.  Anything else is a bug: its traceback is shown, with a line saying so.  Each subcommand
module has ``add_parser(sub)`` and ``run(args)``; only optional dependencies (the server's, sounddevice) are
imported inside ``run``, where a missing one becomes a one-line error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import UsageError, VoxtralError
from . import batch, bench, download, export, listen, quantize, serve, transcribe
from .common import Reporter

SUBCOMMANDS = (transcribe, listen, bench, download, quantize, serve, batch, export)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="voxtral", description="Streaming speech recognition with Mistral's Voxtral Mini 4B Realtime.")
    parser.add_argument("--version", action="version", version=f"voxtral-realtime {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in SUBCOMMANDS:
        command.add_parser(sub)
    return parser


def dispatch(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except UsageError as err:  # like argparse's own option errors
        Reporter(enabled=False).error(str(err))
        return 2
    except VoxtralError as err:
        Reporter(enabled=False).error(str(err))
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:
        print("voxtral: this is a bug in voxtral-realtime, not a mistake of yours; please report it with the "
              "traceback below", file=sys.stderr)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return dispatch(args)


def rust_compat_main(argv: Sequence[str] | None = None) -> int:
    """``voxtral-transcribe --audio FILE --model DIR``: the command line of the Rust project, on this package."""
    return dispatch(transcribe.rust_compat_args(argv))
