"""``voxtral serve``: the HTTP/WebSocket server (:mod:`..server`)."""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path
from typing import Any

from ..browser import mount_local
from ..errors import VoxtralError
from .common import Reporter, add_model_options, load_model, positive_float, positive_int

EPILOG_SERVE = """\
examples:
  voxtral serve                                   # http://127.0.0.1:8000: page, /v1/realtime, /v1/audio/...
  voxtral serve --model ./voxtral --max-streams 128 --decoder-context 2048 --host 0.0.0.0 --api-key "$KEY"
  voxtral serve --device cpu --max-load 0.8       # a CPU: live streams beyond what it computes in real time: busy

Endpoints: / (browser page), /v1/realtime (WebSocket, vLLM's realtime protocol), POST /v1/audio/transcriptions
(OpenAI's shape), GET /v1/models, /health, /metrics (Prometheus).  With an API key (--api-key or
VOXTRAL_API_KEY), /v1/* and /metrics need "Authorization: Bearer KEY"; browsers send it as the WebSocket
subprotocol api-key.KEY.  Needs the server extra: pip install 'voxtral-realtime[server]'.
"""

def add_parser(sub: Any) -> None:
    sv = sub.add_parser("serve", help="serve live captions (WebSocket), file transcription (REST) and a web page",
                        description="Run the HTTP server: every stream, live or uploaded, on one batched engine.",
                        epilog=EPILOG_SERVE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    sv.add_argument("--port", type=positive_int, default=8000, help="port (default: %(default)s)")
    sv.add_argument("--max-streams", type=positive_int, default=32,
                    help="concurrent streams, live and uploads, a hard cap (default: %(default)s); more live ones "
                         "get a 'busy' error, more uploads wait")
    sv.add_argument("--max-load", type=load_fraction, default=0.9, metavar="FRACTION",
                    help="admit a new live stream only while the engine's measured compute, with that stream, stays "
                         "within this fraction of its time, so that every live stream keeps up in real time; "
                         "beyond it a new one gets 'busy' (default: %(default)s; 0: off, only --max-streams "
                         "limits; uploads are never refused for load, they take the compute left)")
    sv.add_argument("--decoder-context", type=positive_int, metavar="TOKENS",
                    help="cap each stream's decoder window at this many 80 ms tokens to bound memory "
                         "(default: the model's full window; exact for streams shorter than the cap)")
    sv.add_argument("--served-model-name", action="append", metavar="NAME",
                    help="a model id clients may name (in /v1/models, session.update and uploads); repeat for "
                         "several, the first is the one reported (default: the --model value)")
    sv.add_argument("--api-key", default=os.environ.get("VOXTRAL_API_KEY"),
                    help="require this key from clients (default: $VOXTRAL_API_KEY; none: open to all)")
    sv.add_argument("--max-upload-mb", type=positive_float, default=100.0,
                    help="largest accepted upload in MiB (default: %(default)s)")
    sv.add_argument("--max-audio-seconds", type=positive_float, default=7200.0,
                    help="longest accepted uploaded audio (default: %(default)s)")
    sv.add_argument("--idle-timeout", type=positive_float, default=60.0, metavar="SECONDS",
                    help="close a WebSocket session silent for this long (default: %(default)s)")
    sv.add_argument("--web-export", type=Path, metavar="DIR",
                    help="also serve this `voxtral export web --onnxruntime-web` folder at /local: the page that "
                         "runs the model in the visitor's browser")
    sv.add_argument("--no-progress", action="store_true", help="no progress bar while loading")
    sv.set_defaults(func=run)


def load_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a fraction of the engine's time, 0 to 1 (0: off)")
    return value


def run(args: argparse.Namespace) -> int:
    _check_server_dependencies()
    import uvicorn

    from ..server import create_app
    from ..server.keepalive import Server, uvicorn_settings
    from ..server.state import ServerLimits

    reporter = Reporter(enabled=not args.no_progress)
    limits = ServerLimits(max_streams=args.max_streams, max_load=args.max_load,
                          max_upload_bytes=int(args.max_upload_mb * 2**20), max_audio_seconds=args.max_audio_seconds,
                          idle_timeout_seconds=args.idle_timeout)
    if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        reporter.info(f"warning: listening on {args.host} without an API key: anyone who can reach it can use it")
    app = create_app(lambda: load_model(args, reporter), model_name=args.served_model_name or args.model,
                     max_streams=args.max_streams, decoder_context=args.decoder_context, api_key=args.api_key,
                     limits=limits)
    if args.web_export is not None:
        mount_local(app, args.web_export)
    Server(uvicorn.Config(app, host=args.host, port=args.port, timeout_graceful_shutdown=5,
                          **uvicorn_settings(limits.max_message_bytes))).run()
    return 0


def _check_server_dependencies() -> None:
    needed = {"fastapi": "fastapi", "uvicorn": "uvicorn", "python_multipart": "python-multipart",
              "prometheus_client": "prometheus_client"}
    missing = [package for module, package in needed.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise VoxtralError(f"voxtral serve needs {', '.join(missing)}: pip install 'voxtral-realtime[server]'")
