"""The event-loop side of the server: limits, stream slots, outgoing event queues, metrics, and the handle through
which a WebSocket session or an upload drives one stream of the :class:`~.worker.EngineWorker`.

Nothing here blocks the event loop and nothing here touches the engine: every computation happens on the
worker's thread, and its results arrive as :class:`~.worker.StreamUpdate` callbacks on the loop.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from .worker import EngineWorker, StreamOptions, StreamUpdate

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from ..api import Model

SlotKind = Literal["live", "upload"]

#: no delay the model knows is longer (its longest is 2400 ms); larger numbers are refused before any arithmetic
MAX_DELAY_MS = 10_000
#: client text quoted back in an error message is cut to this many characters
ECHO_CHARS = 80


def clip(text: str, limit: int = ECHO_CHARS) -> str:
    """``text`` cut for quoting back to a client: an error must not cost more memory than the limit."""
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} characters)"


@dataclass(frozen=True)
class ServerLimits:
    """Everything a client could otherwise use to exhaust the server."""

    #: concurrent streams, live and uploads together (the engine's rows): a hard cap, whatever the load
    max_streams: int = 32
    #: a new live stream is admitted only while the engine's measured load with it stays at most this fraction of
    #: the engine's time, so that every live stream is computed in real time (:mod:`.load`); 0: off
    max_load: float = 0.9
    #: of which uploads may hold at most this many, so live captions always find room (None: a quarter)
    max_upload_streams: int | None = None
    #: uploads waiting for a slot; more are refused with 503 busy
    max_waiting_uploads: int = 64
    #: seconds an upload waits for a slot before 503 busy
    upload_wait_seconds: float = 120.0
    #: WebSocket connections at once (idle ones included)
    max_connections: int = 256
    max_upload_bytes: int = 100 * 1024 * 1024
    #: request headers (names and values) beyond this are answered 431
    max_header_bytes: int = 64 * 1024
    #: an upload whose body stops coming for this long is answered 408 (a body cut short would hold it forever)
    body_read_timeout_seconds: float = 30.0
    max_audio_seconds: float = 2 * 3600.0
    #: one WebSocket message in bytes of UTF-8 (a base64 append of 1 MiB is about 24 s of audio)
    max_message_bytes: int = 1024 * 1024
    #: audio a WebSocket client may have waiting in the server: above it the server stops reading its messages
    #: (TCP back-pressure); audio appended before a transcription starts beyond it is refused (buffer_full)
    max_buffered_seconds: float = 60.0
    #: a WebSocket session with no message for this long (and no work in progress) is closed
    idle_timeout_seconds: float = 60.0
    #: a client that does not take an event within this long is disconnected (it is not reading)
    send_timeout_seconds: float = 30.0
    #: JSON bytes of events waiting for a client that is not reading: beyond, it is disconnected
    max_unsent_bytes: int = 1024 * 1024
    #: audio files decoded at once (decoding runs on threads beside the engine)
    max_concurrent_decodes: int = 2

    @property
    def upload_streams(self) -> int:
        if self.max_upload_streams is not None:
            return max(1, min(self.max_upload_streams, self.max_streams))
        return max(1, self.max_streams // 4)


class Busy(Exception):
    """No stream slot is free (live: at once; upload: within the wait), or no compute for one more live stream."""


class SlotPool:
    """Counts the engine's rows on the event loop, so a full engine is a clear ``busy`` and never an error inside
    the worker.  A slot comes back when the worker reports the stream released, not when the client leaves:
    until then the engine row is still in use."""

    def __init__(self, limits: ServerLimits) -> None:
        self.total = limits.max_streams
        self.upload_limit = limits.upload_streams
        self.max_waiting = limits.max_waiting_uploads
        self.in_use: dict[SlotKind, int] = {"live": 0, "upload": 0}
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def used(self) -> int:
        return self.in_use["live"] + self.in_use["upload"]

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_acquire_live(self) -> bool:
        if self.used >= self.total:
            return False
        self.in_use["live"] += 1
        return True

    async def acquire_upload(self, timeout: float) -> None:
        if not self._waiters and self._upload_fits():
            self.in_use["upload"] += 1
            return
        if len(self._waiters) >= self.max_waiting:
            raise Busy(f"{self.max_waiting} uploads are already waiting for a stream")
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
            if waiter.done() and not waiter.cancelled():  # granted just as we gave up: hand it on
                self.release("upload")
            else:
                waiter.cancel()
                self._waiters.remove(waiter)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise Busy(f"no stream was free within {timeout:g} s") from None

    def release(self, kind: SlotKind) -> None:
        self.in_use[kind] = max(0, self.in_use[kind] - 1)
        while self._waiters and self._upload_fits():
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_use["upload"] += 1
                waiter.set_result(None)

    def _upload_fits(self) -> bool:
        return self.used < self.total and self.in_use["upload"] < self.upload_limit


_MERGEABLE = ("transcription.delta", "transcription.words")
#: what a word costs in the outbox besides its text: its JSON keys and numbers
_WORD_OVERHEAD_BYTES = 64


class Outbox:
    """Events waiting to be sent to one client, bounded in bytes.

    Consecutive text deltas are merged into one delta, and consecutive word lists into one list, so a client that
    reads slowly costs memory in proportion to its transcript, not to the number of engine rounds.  Other events
    (errors, ``done``) are serialized when queued.  Everything counts in :attr:`unsent_bytes` (the JSON the client
    has not taken); past ``max_bytes`` the client is not reading: what is queued is dropped, nothing more is
    taken, and :attr:`overflow` tells the session to disconnect it (even while a send to it is blocked).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.overflowed = False
        self.overflow = asyncio.Event()
        self.unsent_bytes = 0
        #: close the connection with this (code, reason) once everything before it is sent
        self.close_after: tuple[int, str] | None = None
        self._items: deque[dict[str, Any] | str] = deque()
        self._ready = asyncio.Event()

    def put_delta(self, text: str) -> None:
        if self.overflowed:
            return
        merged = self._mergeable("transcription.delta")
        if merged is not None:
            merged["delta"] += text
        else:
            self._items.append({"type": "transcription.delta", "delta": text})
        self._count(len(text.encode()))

    def put_words(self, words: list[dict[str, Any]]) -> None:
        if self.overflowed:
            return
        merged = self._mergeable("transcription.words")
        if merged is not None:
            merged["words"].extend(words)
        else:
            self._items.append({"type": "transcription.words", "words": list(words)})
        self._count(sum(len(w["word"].encode()) + _WORD_OVERHEAD_BYTES for w in words))

    def _mergeable(self, kind: str) -> dict[str, Any] | None:
        """The unsent event of ``kind`` that new content can join: one after the last other event (an error or
        ``done`` must keep its place).  Deltas and words alternate, so both are looked for in that tail."""
        for item in reversed(self._items):
            if isinstance(item, str):
                return None
            if item["type"] == kind:
                return item
        return None

    def put(self, event: dict[str, Any]) -> None:
        if self.overflowed:
            return
        text = encode_event(event)
        self._items.append(text)
        self._count(len(text.encode()))

    def _count(self, size: int) -> None:
        self.unsent_bytes += size
        if self.unsent_bytes > self.max_bytes:
            self.overflowed = True
            self._items.clear()
            self.overflow.set()
        self._ready.set()

    def close(self, code: int, reason: str) -> None:
        self.close_after = (code, reason)
        self._ready.set()

    async def take(self) -> list[str]:
        """Wait for events, then return all of them as JSON text."""
        await self._ready.wait()
        self._ready.clear()
        items = [item if isinstance(item, str) else encode_event(item) for item in self._items]
        self._items.clear()
        self.unsent_bytes = 0
        return items


def encode_event(event: dict[str, Any]) -> str:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"))


class StreamSink(Protocol):
    """Where one stream's results go (a WebSocket session, an upload)."""

    def on_text(self, text: str) -> None: ...

    def on_words(self, words: list[dict[str, Any]]) -> None: ...

    def on_result(self, update: StreamUpdate) -> None: ...

    def on_error(self, message: str) -> None: ...


class EngineStream:
    """The event loop's handle on one stream of the worker.

    Tracks the audio sent whose tokens are not decided yet, wherever it waits (here, in the worker, inside the
    engine): above ``max_buffered_seconds`` of it :attr:`has_room` is False and the sender stops reading
    (``wait_for_room`` is the back-pressure).  Appends are sent to the worker in whole 80 ms steps (the engine
    computes nothing with less), so tiny appends cost no per-append memory there.  Routes the worker's updates
    to a :class:`StreamSink`, and gives the slot back to the pool when the worker has released the engine row.
    Opened only after a slot of ``kind`` was acquired.
    """

    def __init__(self, state: ServerState, sink: StreamSink, options: StreamOptions, kind: SlotKind) -> None:
        self._state = state
        self._sink = sink
        self._kind = kind
        self.options = options
        self.queued_samples = 0
        #: the worker reported a result or an error (or the stream was abandoned): nothing more will come
        self.ended = False
        self.released = False
        self._room = asyncio.Event()
        self._room.set()
        self._room_limit = int(state.limits.max_buffered_seconds * state.sample_rate)
        audio = state.model.config.audio
        self._step = audio.samples_per_token
        # audio the model cannot decide before more arrives: its delay, plus a step being filled
        self._lookahead = (audio.delay_tokens(options.delay_ms) + 2) * self._step
        self._held: list[np.ndarray] = []  # less than a step, not sent to the worker yet
        self._held_samples = 0
        self.id = state.worker.open(self, options)
        state.metrics.streams_opened.labels(kind).inc()

    def append(self, samples: np.ndarray) -> None:
        if self.ended or not len(samples):
            return
        self.queued_samples += len(samples)
        self._state.queued_samples += len(samples)
        if self.queued_samples > self._room_limit:
            self._room.clear()
        self._held.append(samples)
        self._held_samples += len(samples)
        if self._held_samples >= self._step:
            self._send_held()

    def _send_held(self) -> None:
        if self._held:
            self._state.worker.append(self.id, self._held[0] if len(self._held) == 1 else np.concatenate(self._held))
            self._held, self._held_samples = [], 0

    @property
    def has_room(self) -> bool:
        return self._room.is_set()

    @property
    def backlogged(self) -> bool:
        """Audio is waiting for the engine beyond what the model needs more audio to decide."""
        return self.queued_samples > self._lookahead

    async def wait_for_room(self) -> None:
        await self._room.wait()

    def finish(self) -> None:
        if not self.ended:
            self._send_held()
            self._state.worker.finish(self.id)

    def abandon(self) -> None:
        """Drop the stream (client gone); its slot comes back once the worker has let go of the engine row."""
        if not self.ended:
            self.ended = True
            self._state.worker.abandon(self.id)

    def on_update(self, update: StreamUpdate) -> None:
        if update.decided_samples:
            self.queued_samples -= update.decided_samples
            self._state.queued_samples -= update.decided_samples
            if self.queued_samples <= self._room_limit:
                self._room.set()
        if update.released and not self.released:
            self.released = True
            self._state.queued_samples -= self.queued_samples
            self.queued_samples = 0
            self._room.set()
            self._state.pool.release(self._kind)
        if update.text:
            self._sink.on_text(update.text)
        if update.words:
            self._sink.on_words(update.words)
        if update.error is not None:
            self.ended = True
            self._state.metrics.errors.labels("processing_error").inc()
            self._sink.on_error(update.error)
        elif update.result is not None:
            self.ended = True
            self._state.metrics.audio_transcribed.labels(self._kind).inc(update.result.duration)
            self._sink.on_result(update)


class ServerMetrics:
    """Prometheus metrics of one app (its own registry, so several apps in one process do not collide)."""

    def __init__(self, state: ServerState) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry: CollectorRegistry = CollectorRegistry()
        r = self.registry
        Gauge("voxtral_active_streams", "Streams in the engine (live and uploads)", registry=r).set_function(
            lambda: state.worker.active_streams)
        Gauge("voxtral_stream_slots", "Streams the engine holds at most", registry=r).set(state.limits.max_streams)
        Gauge("voxtral_free_stream_slots", "Engine rows free now", registry=r).set_function(
            lambda: state.worker.free_slots)
        Gauge("voxtral_queued_audio_seconds", "Audio received whose tokens are not decided yet, wherever it waits "
              "(queue depth; the model's look-ahead of a few hundred ms per live stream included)",
              registry=r).set_function(lambda: state.queued_samples / state.sample_rate)
        Gauge("voxtral_pending_engine_commands", "Commands waiting for the engine thread",
              registry=r).set_function(lambda: state.worker.pending_commands)
        Gauge("voxtral_waiting_uploads", "Uploads waiting for a free stream", registry=r).set_function(
            lambda: state.pool.waiting)
        Gauge("voxtral_websocket_connections", "Open realtime WebSocket connections", registry=r).set_function(
            lambda: state.connections)
        Gauge("voxtral_live_streams", "Live (WebSocket) streams holding a slot", registry=r).set_function(
            lambda: state.pool.in_use["live"])
        Gauge("voxtral_engine_utilization", "Engine busy time over wall time, exponentially weighted over the last "
              "few seconds", registry=r).set_function(lambda: state.worker.load.utilization())
        Gauge("voxtral_stream_cost", "What one more stream adds to the engine's load in real time, a fraction of its "
              "time (NaN until measured)", registry=r).set_function(lambda: _or_nan(state.worker.load.stream_cost()))
        Gauge("voxtral_live_stream_capacity", "Live streams the engine is estimated to compute in real time within "
              "max_load (NaN until measured)", registry=r).set_function(lambda: _or_nan(state.live_capacity))
        Gauge("voxtral_real_time_factor", "Engine time over audio time, last minute (below 1: faster than real "
              "time, summed over all streams)", registry=r).set_function(lambda: state.recent_rtf.value())
        self.step_seconds = Histogram(
            "voxtral_decode_step_seconds", "Wall time of one batched decoder step (engine run time / steps)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64), registry=r)
        self.run_seconds = Histogram(
            "voxtral_engine_run_seconds", "Wall time of one engine run (one worker round)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5), registry=r)
        self.engine_audio = Counter("voxtral_engine_audio_seconds", "Audio handed to the engine", registry=r)
        self.engine_time = Counter("voxtral_engine_busy_seconds", "Time the engine spent computing", registry=r)
        self.audio_transcribed = Counter("voxtral_transcribed_audio_seconds", "Audio of finished transcriptions",
                                         ["kind"], registry=r)
        self.streams_opened = Counter("voxtral_streams_opened", "Streams started", ["kind"], registry=r)
        self.errors = Counter("voxtral_errors", "Errors sent to clients, by code", ["code"], registry=r)

    def on_engine_run(self, seconds: float, steps: int, audio_seconds: float) -> None:
        """Called on the worker thread after each engine run (prometheus_client is thread-safe)."""
        self.run_seconds.observe(seconds)
        if steps:
            self.step_seconds.observe(seconds / steps)
        self.engine_time.inc(seconds)
        self.engine_audio.inc(audio_seconds)


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


class RecentRatio:
    """Sum of a over sum of b over the last ``window`` seconds (the real-time factor of the recent runs)."""

    def __init__(self, window: float = 60.0) -> None:
        self.window = window
        self._samples: deque[tuple[float, float, float]] = deque()
        self._lock = threading.Lock()

    def add(self, a: float, b: float) -> None:
        now = time.monotonic()
        with self._lock:
            self._samples.append((now, a, b))
            while self._samples and self._samples[0][0] < now - self.window:
                self._samples.popleft()

    def value(self) -> float:
        with self._lock:
            b = sum(s[2] for s in self._samples)
            return sum(s[1] for s in self._samples) / b if b else 0.0


@dataclass
class ServerState:
    """What every request handler needs; one per app, made in the lifespan hook."""

    model: Model
    #: the ids clients may name in ``model`` fields (``--served-model-name``); the first is the one reported
    model_names: tuple[str, ...]
    worker: EngineWorker
    limits: ServerLimits
    api_key: str | None
    started: float = field(default_factory=time.time)
    connections: int = 0
    #: audio sent to the worker and not yet taken into the engine, over all streams
    queued_samples: int = 0
    recent_rtf: RecentRatio = field(default_factory=RecentRatio)

    def __post_init__(self) -> None:
        self.sample_rate = self.model.config.audio.sample_rate
        self.pool = SlotPool(self.limits)
        self.decodes = asyncio.Semaphore(self.limits.max_concurrent_decodes)
        self.metrics = ServerMetrics(self)
        self.worker.stats.on_run = self._on_run

    def _on_run(self, seconds: float, steps: int, audio_seconds: float) -> None:
        self.metrics.on_engine_run(seconds, steps, audio_seconds)
        self.recent_rtf.add(seconds, audio_seconds)

    def acquire_live(self) -> None:
        """A slot for a new live stream, or :class:`Busy` saying why not: every slot is in use, or the engine's
        measured load leaves no room to compute one more stream in real time."""
        pool, max_load = self.pool, self.limits.max_load
        if pool.used >= pool.total:
            raise Busy(f"all {pool.total} streams are in use")
        load = self.worker.load
        if not load.admits(pool.used, pool.in_use["live"], max_load):
            predicted = load.load_with(pool.used + 1)
            need = f"would need {predicted:.0%}" if predicted is not None else f"is {load.utilization():.0%} busy"
            raise Busy(f"the server is at its compute capacity: with one more stream the engine {need} of its time "
                       f"(limit {max_load:.0%}), and its streams would fall behind real time")
        pool.try_acquire_live()

    @property
    def live_capacity(self) -> int | None:
        """Live streams the engine is estimated to compute in real time within ``max_load`` (with load admission
        off: within all its time), at most ``max_streams``; None until measured."""
        return self.worker.load.capacity(self.limits.max_load or 1.0, self.limits.max_streams)

    def check_delay(self, delay_ms: object, field: str = "delay_ms") -> int:
        """A delay the model supports, or ValueError naming ``field`` with the reason (range before arithmetic:
        a 400-digit number must not reach a float division)."""
        if isinstance(delay_ms, float) and delay_ms.is_integer():
            delay_ms = int(delay_ms)  # JSON does not tell 480 from 480.0
        if isinstance(delay_ms, bool) or not isinstance(delay_ms, int):
            raise ValueError(f"{field} must be a whole number of milliseconds, got {clip(repr(delay_ms))}")
        if not 0 < delay_ms <= MAX_DELAY_MS:
            raise ValueError(f"{field} must be between 1 and {MAX_DELAY_MS} ms, got {clip(repr(delay_ms))}")
        try:
            self.model.config.audio.delay_tokens(delay_ms)
        except ValueError as err:
            raise ValueError(f"{field}: {err}") from None
        return delay_ms

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    @property
    def served_names_text(self) -> str:
        return ", ".join(repr(name) for name in self.model_names)

    def model_matches(self, name: str) -> bool:
        """Clients name a served model, or send an empty name (vLLM accepts that too)."""
        return name == "" or name in self.model_names


# -- API keys ------------------------------------------------------------------------------------------------

#: WebSocket subprotocol a browser offers with its key (browsers cannot set an Authorization header), next to
#: :data:`REALTIME_SUBPROTOCOL`, which the server then selects.
API_KEY_SUBPROTOCOL_PREFIX = "api-key."
REALTIME_SUBPROTOCOL = "voxtral-realtime"


def presented_api_key(headers: Mapping[str, str], query: Mapping[str, str], subprotocols: list[str]) -> str | None:
    """The key a client sent: ``Authorization: Bearer KEY``, the ``api-key.KEY`` subprotocol, or ``?api_key=``."""
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    for protocol in subprotocols:
        if protocol.startswith(API_KEY_SUBPROTOCOL_PREFIX):
            return protocol[len(API_KEY_SUBPROTOCOL_PREFIX):]
    return query.get("api_key") or None


def api_key_accepted(expected: str | None, presented: str | None) -> bool:
    if expected is None:
        return True
    if presented is None:
        return False
    # constant time: how much of a guess matches must not show in the response time
    return hmac.compare_digest(expected.encode(), presented.encode())
