"""``/v1/realtime``: live transcription over a WebSocket, speaking vLLM's realtime protocol for this model.

Client -> server (text frames, one JSON object each): ``session.update`` (``model``; our extensions
``delay_ms``, ``word_timestamps``, ``continue_after_eos``), ``input_audio_buffer.append`` (``audio``: base64
PCM16 little-endian, 16 kHz mono), ``input_audio_buffer.commit`` (``final``).  Server -> client:
``session.created``, ``transcription.delta``, ``transcription.done`` (``text``, ``usage``), ``error``
(``error``, ``code``), and, with ``word_timestamps``, our ``transcription.words`` (completed words with start,
end and latency).  Errors leave the socket open, except ``idle_timeout`` and a client that stops reading.

Differences from vLLM, all on the side of keeping a session alive: deltas are sent when there is text (vLLM also
sends empty ones, one per 80 ms step), several steps' text may come in one delta, an always-on stream goes on
after the model says EOS (``continue_after_eos``, default on), and a session whose client sends faster than the
engine computes is slowed down by no longer reading its socket instead of being dropped: audio counts as queued
until its tokens are decided, reading pauses above ``max_buffered_seconds`` of it, and the client is told with our
``input_audio_buffer.throttled`` event (``queued_seconds``, ``max_queued_seconds``; clients ignore event types they
do not know).  The connection's keepalive does not time out meanwhile (:mod:`.keepalive`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import secrets
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from starlette.websockets import WebSocket, WebSocketState

from .state import (
    REALTIME_SUBPROTOCOL,
    Busy,
    EngineStream,
    Outbox,
    ServerState,
    api_key_accepted,
    clip,
    presented_api_key,
)
from .worker import StreamOptions, StreamUpdate, word_dict

log = logging.getLogger(__name__)

PCM16_FULL_SCALE = 32768.0
#: a client whose reading is paused is told so with an ``input_audio_buffer.throttled`` event at most this often
THROTTLE_NOTICE_SECONDS = 5.0


class ProtocolError(Exception):
    """A client mistake: sent as an ``error`` event with ``code``; the session goes on."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


async def serve_realtime(websocket: WebSocket, state: ServerState) -> None:
    """The WebSocket endpoint: check the key and the connection limit, then run the session."""
    query = dict(websocket.query_params)
    subprotocols = list(websocket.scope.get("subprotocols") or [])
    # a browser that offered subprotocols must see one of them selected, or it drops the connection
    chosen = REALTIME_SUBPROTOCOL if REALTIME_SUBPROTOCOL in subprotocols else None
    if not api_key_accepted(state.api_key, presented_api_key(websocket.headers, query, subprotocols)):
        await _refuse(websocket, chosen, state, "unauthorized", 1008,
                      "a valid API key is required (Authorization: Bearer KEY, the api-key.KEY subprotocol, or "
                      "?api_key=KEY)")
        return
    if state.connections >= state.limits.max_connections:
        await _refuse(websocket, chosen, state, "busy", 1013,
                      f"the server holds its maximum of {state.limits.max_connections} realtime connections; try "
                      "again later")
        return
    await websocket.accept(subprotocol=chosen)
    state.connections += 1
    try:
        await RealtimeSession(websocket, state).run()
    finally:
        state.connections -= 1


async def _refuse(websocket: WebSocket, subprotocol: str | None, state: ServerState, code: str, close_code: int,
                  message: str) -> None:
    """Accept, say why in an ``error`` event, close.  (Refusing the handshake itself would show a browser only a
    failed connection, without the reason.)"""
    state.metrics.errors.labels(code).inc()
    await websocket.accept(subprotocol=subprotocol)
    with contextlib.suppress(Exception):
        await websocket.send_text(json.dumps({"type": "error", "error": message, "code": code}))
        await websocket.close(code=close_code, reason=code)


class RealtimeSession:
    """One WebSocket connection: a sequence of transcriptions, each from a start commit to a final one."""

    def __init__(self, websocket: WebSocket, state: ServerState) -> None:
        self.websocket = websocket
        self.state = state
        self.outbox = Outbox(state.limits.max_unsent_bytes)
        self.model_validated = False
        self.options = StreamOptions(continue_after_eos=True)
        self.stream: EngineStream | None = None
        self.finalizing = False
        # audio appended before a transcription starts (the protocol allows it; it opens the transcription), as
        # the PCM16 bytes it came in: 2 bytes a sample however small the appends
        self.early_audio = bytearray()
        self.max_buffered_samples = int(state.limits.max_buffered_seconds * state.sample_rate)
        self._throttle_told = -math.inf
        self._handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            "session.update": self._session_update,
            "input_audio_buffer.append": self._append,
            "input_audio_buffer.commit": self._commit,
        }

    async def run(self) -> None:
        self.outbox.put({"type": "session.created", "id": f"sess-{secrets.token_hex(8)}", "created": int(time.time())})
        sender = asyncio.create_task(self._send_loop())
        receiver = asyncio.create_task(self._receive_loop())
        overflow = asyncio.create_task(self.outbox.overflow.wait())
        try:
            done, _ = await asyncio.wait({sender, receiver, overflow}, return_when=asyncio.FIRST_COMPLETED)
            if overflow in done:
                sender.cancel()
                await self._close(1008, "too many unread events: the client is not reading")
            elif receiver in done and receiver.exception() is not None:
                log.error("realtime session failed", exc_info=receiver.exception())
            elif receiver in done and receiver.result() == "closing":
                # let the sender deliver the last error event and close the socket
                await asyncio.wait({sender}, timeout=self.state.limits.send_timeout_seconds)
        finally:
            if self.stream is not None:
                self.stream.abandon()  # a client gone mid-stream: the slot comes back once the worker drops it
                self.stream = None
            for task in (sender, receiver, overflow):
                task.cancel()
            for task in (sender, receiver, overflow):
                with contextlib.suppress(BaseException):
                    await task

    # -- receiving ---------------------------------------------------------------------------------------------

    async def _receive_loop(self) -> str:
        """Read and handle messages until the client leaves ("gone") or the session closes for idling
        ("closing")."""
        while True:
            if self.stream is not None and not self.stream.has_room:
                # back-pressure: while this client's audio waits for the engine, its socket is not read, so a
                # client sending faster than the engine computes is slowed down by TCP instead of filling memory
                self._tell_throttled()
                await self.stream.wait_for_room()
            message = await self._receive_or_idle()
            if message is None:
                return "closing"
            if message["type"] == "websocket.disconnect":
                return "gone"
            try:
                self._handle(message)
            except ProtocolError as err:
                self._send_error(err.code, str(err))
            except Exception:  # a bug must cost the client one event, not its session and the stream in progress
                log.exception("realtime event failed")
                self._send_error("processing_error", "the server could not handle this event")

    async def _receive_or_idle(self) -> dict[str, Any] | None:
        """The next message; None once the session has been closed for idling."""
        timeout = self.state.limits.idle_timeout_seconds
        while True:
            try:
                return await asyncio.wait_for(self.websocket.receive(), timeout)
            except asyncio.TimeoutError:
                if self._working():
                    continue  # the client waits for us (a long final flush), it is not idle
                self._send_error("idle_timeout", f"no message for {timeout:g} s: closing the session")
                self.outbox.close(1000, "idle timeout")
                return None

    def _working(self) -> bool:
        return self.stream is not None and (self.finalizing or self.stream.backlogged)

    def _tell_throttled(self) -> None:
        """Say that reading is paused (at most every THROTTLE_NOTICE_SECONDS: a fast sender pauses at every
        message)."""
        now = time.monotonic()
        if now - self._throttle_told < THROTTLE_NOTICE_SECONDS:
            return
        self._throttle_told = now
        assert self.stream is not None
        self.outbox.put({"type": "input_audio_buffer.throttled",
                         "queued_seconds": round(self.stream.queued_samples / self.state.sample_rate, 3),
                         "max_queued_seconds": self.state.limits.max_buffered_seconds})

    def _handle(self, message: dict[str, Any]) -> None:
        text = message.get("text")
        if text is None:
            raise ProtocolError("invalid_event", "binary frames are not part of the protocol: send each event as "
                                                 "a JSON text frame (audio goes base64-encoded in 'audio')")
        limit = self.state.limits.max_message_bytes
        if len(text) > limit or len(text.encode()) > limit:  # characters are at least a byte each
            raise ProtocolError("message_too_large", f"a message may hold at most {limit} bytes; send audio in "
                                                     "smaller appends")
        try:
            event = json.loads(text)
        except ValueError as err:
            raise ProtocolError("invalid_json", f"the message is not valid JSON ({err})") from None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise ProtocolError("invalid_event", "an event is a JSON object with a string 'type'")
        handler = self._handlers.get(event["type"])
        if handler is None:
            raise ProtocolError("unknown_event", f"unknown event type {clip(repr(event['type']))}")
        handler(event)

    # -- events ------------------------------------------------------------------------------------------------

    def _session_update(self, event: dict[str, Any]) -> None:
        model = event.get("model")
        if not isinstance(model, str):
            raise ProtocolError("invalid_event", "session.update needs 'model' (the served model's name, or \"\")")
        if not self.state.model_matches(model):
            raise ProtocolError("model_not_found", f"model {clip(repr(model))} is not served here; this server "
                                                   f"serves {self.state.served_names_text}")
        self.options = self._updated_options(event)
        self.model_validated = True

    def _updated_options(self, event: dict[str, Any]) -> StreamOptions:
        """Our extensions of session.update; they apply from the next transcription on."""
        options = self.options
        field = "delay_ms" if "delay_ms" in event else "target_streaming_delay_ms"
        delay = event.get(field)
        if delay is not None:
            try:
                delay = self.state.check_delay(delay, field)
            except ValueError as err:
                raise ProtocolError("invalid_event", str(err)) from None
        flags = {}
        for name in ("word_timestamps", "continue_after_eos"):
            value = event.get(name)
            if value is not None and not isinstance(value, bool):
                raise ProtocolError("invalid_event", f"{name} must be true or false")
            flags[name] = getattr(options, name) if value is None else value
        return StreamOptions(delay_ms=options.delay_ms if delay is None else delay, **flags)

    def _append(self, event: dict[str, Any]) -> None:
        pcm = self._decode_audio(event.get("audio"))
        if self.finalizing:
            return  # audio after the final commit and before done is dropped, as in vLLM
        if self.stream is not None:
            self.stream.append(_samples(pcm))
            return
        if (len(self.early_audio) + len(pcm)) // 2 > self.max_buffered_samples:
            raise ProtocolError("buffer_full", f"more than {self.state.limits.max_buffered_seconds:g} s of audio "
                                               "appended before a transcription started; commit to start one")
        self.early_audio += pcm

    def _decode_audio(self, audio: object) -> bytes:
        """The PCM16 bytes of an append's ``audio``."""
        if not isinstance(audio, str):
            raise ProtocolError("invalid_audio", "'audio' must be a base64 string of PCM16 little-endian samples")
        try:
            raw = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("invalid_audio", "'audio' is not valid base64") from None
        if not raw:
            raise ProtocolError("invalid_audio", "'audio' holds no samples")
        if len(raw) % 2:
            raise ProtocolError("invalid_audio", f"'audio' has {len(raw)} bytes, an odd number: PCM16 samples are "
                                                 "2 bytes each (16 kHz mono, little-endian)")
        return raw

    def _commit(self, event: dict[str, Any]) -> None:
        final = event.get("final", False)
        if not isinstance(final, bool):
            raise ProtocolError("invalid_event", "'final' must be true or false")
        if not self.model_validated:
            raise ProtocolError("model_not_validated", "send session.update with the model before committing")
        if self.stream is None:
            self._start()
        if final and self.stream is not None and not self.finalizing:
            self.finalizing = True
            self.stream.finish()

    def _start(self) -> None:
        if not self.state.worker.alive:
            raise ProtocolError("processing_error", "the engine has stopped; the server needs a restart")
        try:
            self.state.acquire_live()
        except Busy as err:
            raise ProtocolError("busy", f"{err}; try again later") from None
        self.stream = EngineStream(self.state, _SessionSink(self), self.options, "live")
        if self.early_audio:
            self.stream.append(_samples(self.early_audio))
        self.early_audio = bytearray()

    # -- results (called by the stream, on the event loop) --------------------------------------------------------

    def transcription_done(self, update: StreamUpdate) -> None:
        assert update.result is not None and update.usage is not None
        usage = update.usage
        event: dict[str, Any] = {
            "type": "transcription.done", "text": update.result.text,
            "usage": {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.total_tokens,
                      "completion_tokens": usage.completion_tokens, "prompt_tokens_details": None},
            "duration": round(update.result.duration, 3), "delay_ms": update.result.delay_ms,
        }
        if self.stream is not None and self.stream.options.word_timestamps:
            event["words"] = [word_dict(w) for w in update.result.words]
        self.outbox.put(event)
        self._end_transcription()

    def transcription_failed(self, message: str) -> None:
        self._send_error("processing_error", message)
        self._end_transcription()

    def _end_transcription(self) -> None:
        self.stream = None
        self.finalizing = False

    def _send_error(self, code: str, message: str) -> None:
        self.state.metrics.errors.labels(code).inc()
        self.outbox.put({"type": "error", "error": message, "code": code})

    # -- sending -------------------------------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        """Send what the outbox holds; returns when the session is over (closed, client gone or not reading)."""
        timeout = self.state.limits.send_timeout_seconds
        try:
            while True:
                for text in await self.outbox.take():
                    await asyncio.wait_for(self.websocket.send_text(text), timeout)
                if self.outbox.close_after is not None:
                    await self._close(*self.outbox.close_after)
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - gone, or too slow to read: either way this session is over
            log.debug("realtime send failed: %s", exc)
            await self._close(1008, "the client did not take its events in time")

    async def _close(self, code: int, reason: str) -> None:
        if self.websocket.application_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.websocket.close(code=code, reason=reason), 5)


def _samples(pcm: bytes | bytearray) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / np.float32(PCM16_FULL_SCALE)


class _SessionSink:
    """Routes one transcription's results into its session (a fresh sink per transcription)."""

    def __init__(self, session: RealtimeSession) -> None:
        self.session = session

    def on_text(self, text: str) -> None:
        self.session.outbox.put_delta(text)

    def on_words(self, words: list[dict[str, Any]]) -> None:
        self.session.outbox.put_words(words)

    def on_result(self, update: StreamUpdate) -> None:
        self.session.transcription_done(update)

    def on_error(self, message: str) -> None:
        self.session.transcription_failed(message)
