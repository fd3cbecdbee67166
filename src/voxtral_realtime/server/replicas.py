"""Several ``voxtral serve`` replicas behind one entry point, on Ray Serve.

Each replica is the server application of :func:`.server.create_app` (its own model and batched engine, loaded in
the app's lifespan hook); Ray Serve's proxy is the one address clients use and routes every request to a replica
with the fewest requests in flight.  A WebSocket session is one request to Serve: it is routed once, when it
opens, and stays on that replica until it closes, so the replica's engine keeps the stream's state.  An open
session counts as an ongoing request, which is also what autoscaling counts.

From the command line (Ray's own)::

    serve run voxtral_realtime.server.replicas:build model=./voxtral replicas=4 max_streams=128
    serve run voxtral_realtime.server.replicas:build model=./voxtral min_replicas=1 max_replicas=8

Every response carries an ``x-voxtral-replica`` header naming the replica that served it (HTTP responses and
the WebSocket handshake), so logs and clients can tell replicas apart.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import VoxtralError

REPLICA_HEADER = b"x-voxtral-replica"


class ReplicaHeader:
    """ASGI middleware: adds ``x-voxtral-replica: NAME`` to every HTTP response and WebSocket handshake."""

    def __init__(self, app: Any, name: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER, name.encode())

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Any) -> None:
            if message["type"] in ("http.response.start", "websocket.accept"):
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


def _serve() -> Any:
    try:
        from ray import serve
    except ImportError:
        raise VoxtralError("replicated serving needs Ray Serve: pip install 'ray[serve]'") from None
    return serve


def deployment(model: str | os.PathLike[str], *, replicas: int | None = 1, min_replicas: int | None = None,
               max_replicas: int | None = None, max_streams: int = 32, decoder_context: int | None = None,
               api_key: str | None = None, device: str | None = None, dtype: str | None = None,
               gpus_per_replica: float | None = None, cpus_per_replica: float = 1.0,
               model_name: str | None = None) -> Any:
    """A Ray Serve application of ``voxtral serve`` replicas; pass it to ``serve.run``.

    ``replicas``: a fixed number; or ``min_replicas``/``max_replicas`` for autoscaling on open streams (a
    replica is added when its replicas average more than three quarters of ``max_streams`` in flight).
    ``gpus_per_replica``: default 1 if the cluster has GPUs, else 0.  ``model_name``: the id clients name in
    ``model`` fields (default: ``model`` as given, as for ``voxtral serve``).  The model path must be readable on every
    node (a Hub id is downloaded by each node into its own cache).
    """
    serve = _serve()
    import ray

    if gpus_per_replica is None:
        if not ray.is_initialized():  # serve.run would connect anyway; the cluster's GPUs decide the default
            ray.init()
        gpus_per_replica = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    scaling: dict[str, Any]
    if min_replicas is not None or max_replicas is not None:
        low = min_replicas if min_replicas is not None else 1
        scaling = {"autoscaling_config": {"min_replicas": low, "max_replicas": max(low, max_replicas or low),
                                          "target_ongoing_requests": max(1, int(0.75 * max_streams))}}
    else:
        scaling = {"num_replicas": replicas or 1}
    # a request beyond the engine's rows would only get the server's own "busy" answer: let Serve queue it
    # or send it to another replica instead
    options = {"max_ongoing_requests": max_streams, **scaling,
               "ray_actor_options": {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica}}
    settings = {"model": os.fspath(model), "model_name": model_name or os.fspath(model), "max_streams": max_streams, "decoder_context": decoder_context,
                "api_key": api_key, "device": device, "dtype": dtype}
    return serve.deployment(serve.ingress()(VoxtralReplica), name="voxtral", **options).bind(settings)


class VoxtralReplica:
    """One replica: the whole server application, built on the replica (the model never travels)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings

    def __serve_build_asgi_app__(self) -> Any:
        from ray import serve

        from ..api import load
        from .app import create_app

        s = self.settings
        app = create_app(lambda: load(s["model"], device=s["device"], dtype=s["dtype"]),
                         model_name=s["model_name"], max_streams=s["max_streams"],
                         decoder_context=s["decoder_context"], api_key=s["api_key"])
        app.add_middleware(ReplicaHeader, name=serve.get_replica_context().replica_id.unique_id)
        return app


def build(args: dict[str, str]) -> Any:
    """Application builder for ``serve run voxtral_realtime.server.replicas:build key=value ...``; keys: model,
    model_name, replicas, min_replicas, max_replicas, max_streams, decoder_context, api_key (default
    $VOXTRAL_API_KEY), device, dtype, gpus_per_replica, cpus_per_replica."""
    from ..loading import DEFAULT_MODEL

    known = {"model", "model_name", "replicas", "min_replicas", "max_replicas", "max_streams", "decoder_context", "api_key",
             "device", "dtype", "gpus_per_replica", "cpus_per_replica"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise VoxtralError(f"unknown setting {', '.join(unknown)}; known: {', '.join(sorted(known))}")

    def number(key: str, kind: type, default: Any) -> Any:
        return kind(args[key]) if args.get(key) not in (None, "") else default

    return deployment(args.get("model") or os.environ.get("VOXTRAL_MODEL", DEFAULT_MODEL),
                      replicas=number("replicas", int, 1), min_replicas=number("min_replicas", int, None),
                      max_replicas=number("max_replicas", int, None), max_streams=number("max_streams", int, 32),
                      decoder_context=number("decoder_context", int, None),
                      api_key=args.get("api_key") or os.environ.get("VOXTRAL_API_KEY"),
                      device=args.get("device"), dtype=args.get("dtype"),
                      gpus_per_replica=number("gpus_per_replica", float, None),
                      cpus_per_replica=number("cpus_per_replica", float, 1.0), model_name=args.get("model_name"))
