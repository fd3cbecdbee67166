"""A real uvicorn server on a free loopback port, in a thread of the test process, and clients for it.

The server runs in-process so tests can look at its state (engine slots, connections) after the clients are
done; the clients speak real HTTP and WebSocket over loopback.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import soundfile as sf


@contextmanager
def serve_in_thread(app: Any, **settings: Any) -> Iterator[str]:
    """Run ``app`` with uvicorn on 127.0.0.1:<free port>, with ``voxtral serve``'s WebSocket settings (``settings``
    override uvicorn.Config's); yields the base URL (http://...)."""
    import uvicorn

    from voxtral_realtime.server.keepalive import uvicorn_settings

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5,
                            **{**uvicorn_settings(2 * 1024 * 1024), **settings})
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start (see the log above)")
        if time.monotonic() > deadline:
            raise TimeoutError("the server did not start within 120 s")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def ws_url(base: str) -> str:
    return base.replace("http://", "ws://") + "/v1/realtime"


def wav_bytes(samples: np.ndarray, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def pcm16_base64(samples: np.ndarray) -> str:
    """Float samples on the 16-bit grid -> the protocol's base64 PCM16 (exact: no rounding happens)."""
    pcm = np.clip(np.round(samples * 32768), -32768, 32767).astype("<i2")
    return base64.b64encode(pcm.tobytes()).decode()


@dataclass
class RealtimeResult:
    created: dict[str, Any]
    done: dict[str, Any] | None = None
    deltas: list[str] = field(default_factory=list)
    words: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)


async def connect(base: str, **kwargs: Any) -> Any:
    from websockets.asyncio.client import connect as ws_connect

    return await ws_connect(ws_url(base), proxy=None, max_size=None, **kwargs)


async def receive_event(ws: Any, timeout: float = 30.0) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def transcribe_over_websocket(base: str, samples: np.ndarray, *, chunk: int = 1600,
                                    session: dict[str, Any] | None = None, pace: float = 0.0,
                                    timeout: float = 120.0) -> RealtimeResult:
    """One transcription over a fresh connection: update, start, append ``chunk`` samples at a time (sleeping
    ``pace`` seconds between appends), final commit; collects every event until ``transcription.done``."""
    ws = await connect(base)
    try:
        result = RealtimeResult(created=await receive_event(ws))
        await ws.send(json.dumps({"type": "session.update", "model": "", **(session or {})}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        reader = asyncio.create_task(_collect(ws, result))
        for start in range(0, len(samples), chunk):
            await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                      "audio": pcm16_base64(samples[start:start + chunk])}))
            if pace:
                await asyncio.sleep(pace)
        await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
        await asyncio.wait_for(reader, timeout)
        return result
    finally:
        await ws.close()


async def _collect(ws: Any, result: RealtimeResult) -> None:
    while True:
        event = json.loads(await ws.recv())
        kind = event["type"]
        if kind == "transcription.delta":
            result.deltas.append(event["delta"])
        elif kind == "transcription.words":
            result.words.extend(event["words"])
        elif kind == "error":
            result.errors.append(event)
        elif kind == "transcription.done":
            result.done = event
            return
