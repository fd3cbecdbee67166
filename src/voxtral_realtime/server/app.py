"""The HTTP server: live captions over WebSocket for many users, OpenAI-compatible file transcription, a web page.

    from voxtral_realtime.server import create_app
    app = create_app(lambda: voxtral_realtime.load("mistralai/Voxtral-Mini-4B-Realtime-2602"))
    # uvicorn.run(app) -- or: voxtral serve

Endpoints: ``/v1/realtime`` (WebSocket, vLLM's realtime protocol: :mod:`.realtime`),
``POST /v1/audio/transcriptions`` (OpenAI's multipart shape; json, text, srt, vtt, verbose_json; ``stream=true``
for server-sent events that both vLLM's and OpenAI's clients read), ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus), and the browser page at ``/``.

Importing this module does no work; :func:`create_app` only builds routes.  The model is loaded once, in the
lifespan hook, and every stream (live or upload) runs on one batched engine owned by one worker thread
(:mod:`.worker`).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import AudioError, UsageError, VoxtralError
from ..writers import to_srt, to_txt, to_vtt
from .realtime import serve_realtime
from .state import Busy, EngineStream, ServerLimits, ServerState, api_key_accepted, clip, presented_api_key
from .verbose import verbose_json
from .worker import EngineWorker, StreamOptions, StreamUpdate

if TYPE_CHECKING:
    from ..api import Model

WEB_DIR = Path(__file__).parent / "web"
TRANSCRIPTIONS_PATH = "/v1/audio/transcriptions"
RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
#: an ISO-639 language code, optionally with a region (en, yue, pt-BR)
LANGUAGE = re.compile(r"[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})?")


class ApiError(Exception):
    """A request the server refuses: an OpenAI-style error body with an HTTP status."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.param = status, code, param

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


def create_app(model_or_loader: Model | Callable[[], Model], *, model_name: str | Sequence[str] | None = None,
               max_streams: int = 32, decoder_context: int | None = None, api_key: str | None = None,
               limits: ServerLimits | None = None) -> FastAPI:
    """The server application.

    ``model_or_loader``: a loaded :class:`~voxtral_realtime.api.Model`, or a function that loads one (called once,
    at startup, off the event loop).  ``model_name``: the id clients name in ``model`` fields, or several ids
    (vLLM's ``--served-model-name``: the first is the one responses report; default: the model's source).
    ``max_streams``: concurrent streams on the engine (overrides ``limits.max_streams``); ``decoder_context``: cap
    on each stream's decoder window in tokens (memory, see :meth:`Model.engine`).
    ``api_key``: when set, every ``/v1`` endpoint and ``/metrics`` require it.  ``limits.max_load``: live streams
    are admitted only while the engine's measured load leaves room to compute one more in real time (0: off).
    """
    limits = _with_streams(limits or ServerLimits(), max_streams)
    if not 0 <= limits.max_load < math.inf:
        raise UsageError(f"max_load must be a fraction of the engine's time (0: off), got {limits.max_load}")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            model = await asyncio.to_thread(_resolve_model, model_or_loader)
        except VoxtralError as err:
            app.state.startup_error = err
            raise
        worker = EngineWorker(model, max_streams=limits.max_streams, decoder_context=decoder_context)
        await asyncio.to_thread(worker.prepare)
        worker.start(asyncio.get_running_loop())
        app.state.voxtral = ServerState(model=model, model_names=_served_names(model_name, model), worker=worker,
                                        limits=limits, api_key=api_key)
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    # the schema is served by a route of ours, behind the API key when there is one
    app = FastAPI(title="voxtral-realtime", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(UploadSizeLimit, max_bytes=limits.max_upload_bytes, paths=(TRANSCRIPTIONS_PATH,),
                       read_timeout=limits.body_read_timeout_seconds)
    app.add_middleware(HeaderSizeLimit, max_bytes=limits.max_header_bytes)
    app.add_middleware(StartupErrorMessage)
    app.add_exception_handler(ApiError, _api_error_response)
    app.add_exception_handler(StarletteHTTPException, _http_error_response)
    _add_routes(app)
    app.mount("/", StaticFiles(directory=WEB_DIR, html=True), name="web")
    return app


class HeaderSizeLimit:
    """431 for a request whose headers total more than ``max_bytes`` (names and values), before any route sees it.

    uvicorn's default HTTP parser (httptools) puts no limit on headers; with h11 its own limit answers a plain 400.
    This gives the status that says what is wrong; the bytes were read by then, so the bound on memory per
    connection is uvicorn's (``--http h11``'s ``h11_max_incomplete_event_size``), not this."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and \
                sum(len(name) + len(value) for name, value in scope["headers"]) > self.max_bytes:
            if scope["type"] == "websocket":  # refused handshake: the client sees 403
                await send({"type": "websocket.close", "code": 1008})
                return
            error = ApiError(431, "headers_too_large", f"the request's headers exceed {self.max_bytes} bytes")
            await JSONResponse(error.body(), status_code=431)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class StartupErrorMessage:
    """A model that cannot be loaded (a bad path, no network) is a user's mistake, not a bug: the server then
    reports its one-line message when it gives up starting, instead of a traceback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_short_failure(message: Message) -> None:
            error = getattr(scope["app"].state, "startup_error", None)
            if message["type"] == "lifespan.startup.failed" and error is not None:
                message = {**message, "message": f"cannot load the model: {error}"}
            await send(message)

        await self.app(scope, receive, send_short_failure)


def _with_streams(limits: ServerLimits, max_streams: int) -> ServerLimits:
    from dataclasses import replace

    if max_streams < 1:
        raise UsageError(f"max_streams must be at least 1, got {max_streams}")
    return replace(limits, max_streams=max_streams)


def _served_names(model_name: str | Sequence[str] | None, model: Model) -> tuple[str, ...]:
    names = [model_name] if isinstance(model_name, str) else list(model_name or [])
    return tuple(dict.fromkeys(name for name in names if name)) or (model.source,)


def _resolve_model(model_or_loader: Model | Callable[[], Model]) -> Model:
    from ..api import Model

    return model_or_loader if isinstance(model_or_loader, Model) else model_or_loader()


def _state(request: Request | WebSocket) -> ServerState:
    return request.app.state.voxtral


def _authorize(request: Request) -> ServerState:
    state = _state(request)
    presented = presented_api_key(request.headers, dict(request.query_params), [])
    if not api_key_accepted(state.api_key, presented):
        state.metrics.errors.labels("unauthorized").inc()
        raise ApiError(401, "unauthorized", "a valid API key is required: Authorization: Bearer KEY")
    return state


def _add_routes(app: FastAPI) -> None:
    @app.websocket("/v1/realtime")
    async def realtime(websocket: WebSocket) -> None:
        await serve_realtime(websocket, _state(websocket))

    @app.post(TRANSCRIPTIONS_PATH)
    async def transcriptions(request: Request) -> Response:
        return await create_transcription(request)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> JSONResponse:
        _authorize(request)
        return JSONResponse(app.openapi())

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        state = _authorize(request)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(state.started),
                                            "owned_by": "voxtral-realtime"} for name in state.model_names]}

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        state = _state(request)
        load = state.worker.load
        cost = load.stream_cost()
        body = {"status": "ok" if state.worker.alive else "unhealthy", "model": state.model_name,
                "active_streams": state.worker.active_streams, "free_stream_slots": state.worker.free_slots,
                "max_streams": state.limits.max_streams, "live_streams": state.pool.in_use["live"],
                "engine_utilization": round(load.utilization(), 4),
                "stream_cost": None if cost is None else round(cost, 4),
                "live_stream_capacity": state.live_capacity, "max_load": state.limits.max_load}
        return JSONResponse(body, status_code=200 if state.worker.alive else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        state = _authorize(request)
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# -- POST /v1/audio/transcriptions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TranscriptionRequest:
    upload: UploadFile
    response_format: str
    stream: bool
    include_usage: bool
    word_timestamps: bool
    segment_timestamps: bool
    delay_ms: int | None
    language: str | None


async def create_transcription(request: Request) -> Response:
    state = _authorize(request)
    form = await _read_form(request)
    params = _parse_transcription_form(form, state)
    samples = await _decode_upload(params.upload, state)
    if not state.worker.alive:
        raise ApiError(503, "processing_error", "the engine has stopped; the server needs a restart")
    try:
        await state.pool.acquire_upload(state.limits.upload_wait_seconds)
    except Busy as err:
        state.metrics.errors.labels("busy").inc()
        raise ApiError(503, "busy", f"the server is busy: {err}; try again later") from None
    sink = _UploadSink()
    try:
        stream = EngineStream(state, sink, StreamOptions(delay_ms=params.delay_ms), "upload")
    except BaseException:
        state.pool.release("upload")
        raise
    stream.append(samples)
    stream.finish()
    if params.stream:
        return TranscriptionEventStream(stream, sink, params, state)
    try:
        update = await _result_unless_disconnected(request, sink)
    finally:
        stream.abandon()  # a no-op once finished; frees the row when the client left first
    if update is None:
        return Response(status_code=499)  # nobody is listening; this response is never sent
    return _formatted(update, params, state)


class UploadTooLarge(Exception):
    pass


class BodyReadTimeout(Exception):
    pass


class UploadSizeLimit:
    """Refuses request bodies above ``max_bytes`` on ``paths``: at once from Content-Length, or while reading a
    body sent without one, before a multipart parser spools it to disk.  A body whose next piece takes more than
    ``read_timeout`` seconds to come (one that stops short of its Content-Length) is given up, not waited for."""

    def __init__(self, app: ASGIApp, max_bytes: int, paths: tuple[str, ...], read_timeout: float) -> None:
        self.app, self.max_bytes, self.paths, self.read_timeout = app, max_bytes, paths, read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            error = ApiError(413, "upload_too_large", self._message())
            await JSONResponse(error.body(), status_code=413)(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout)
            except asyncio.TimeoutError:
                raise BodyReadTimeout(f"the request body stopped coming for {self.read_timeout:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise UploadTooLarge(self._message())
            return message

        await self.app(scope, counting_receive, send)

    def _message(self) -> str:
        return f"the upload is larger than the server's limit of {self.max_bytes / 2**20:g} MiB"


async def _read_form(request: Request) -> Any:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise ApiError(400, "invalid_request", "send the audio as multipart/form-data with a 'file' part")
    try:
        return await request.form(max_files=1, max_fields=32, max_part_size=64 * 1024)
    except UploadTooLarge as err:
        raise ApiError(413, "upload_too_large", str(err)) from None
    except BodyReadTimeout as err:
        raise ApiError(408, "request_timeout", str(err)) from None
    except StarletteHTTPException as err:  # Starlette's multipart errors
        raise ApiError(400, "invalid_multipart", f"the multipart body cannot be read: {err.detail}") from None
    except Exception as err:  # noqa: BLE001 - a client that hung up mid-upload, or a body cut short
        raise ApiError(400, "invalid_multipart", f"the upload could not be read ({type(err).__name__}); "
                                                 "it may have been cut off") from None


def _parse_transcription_form(form: Any, state: ServerState) -> TranscriptionRequest:
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise ApiError(400, "invalid_request", "no complete 'file' part in the request (missing, not a file, or "
                                               "the upload was cut off)", param="file")
    model = form.get("model", "")
    if not isinstance(model, str) or not state.model_matches(model):
        raise ApiError(404, "model_not_found", f"model {clip(repr(model))} is not served here; this server serves "
                                               f"{state.served_names_text}", param="model")
    response_format = str(form.get("response_format", "json"))
    if response_format not in RESPONSE_FORMATS:
        raise ApiError(400, "invalid_request", f"response_format must be one of {', '.join(RESPONSE_FORMATS)}",
                       param="response_format")
    granularities = set(form.getlist("timestamp_granularities[]")) | set(form.getlist("timestamp_granularities"))
    if granularities - {"word", "segment"}:
        raise ApiError(400, "invalid_request", "timestamp_granularities are 'word' and 'segment'",
                       param="timestamp_granularities")
    if granularities and response_format != "verbose_json":
        raise ApiError(400, "invalid_request", "timestamp_granularities need response_format=verbose_json",
                       param="timestamp_granularities")
    _form_temperature(form)
    stream = _form_bool(form, "stream")
    if stream and response_format not in ("json", "text"):
        raise ApiError(400, "invalid_request", "stream=true sends text deltas: use response_format json or text",
                       param="stream")
    return TranscriptionRequest(
        upload=upload, response_format=response_format, stream=stream,
        include_usage=_form_bool(form, "stream_include_usage"), word_timestamps="word" in granularities,
        segment_timestamps="segment" in granularities or not granularities,
        delay_ms=_form_delay(form, state), language=_form_language(form))


def _form_language(form: Any) -> str | None:
    """OpenAI's ``language`` (an ISO-639 code): echoed in verbose_json, not used for decoding (the model
    transcribes any of its languages unasked)."""
    value = form.get("language")
    if value in (None, ""):
        return None
    if not isinstance(value, str) or not LANGUAGE.fullmatch(value):
        raise ApiError(400, "invalid_request", f"language must be a language code such as 'en', got "
                                               f"{clip(repr(value))}", param="language")
    return value


def _form_temperature(form: Any) -> None:
    """Decoding is greedy: temperature 0 (or none) is what the server does; OpenAI's range is checked anyway so
    that a mistaken value is an error and not silently something else."""
    value = form.get("temperature")
    if value in (None, ""):
        return
    try:
        temperature = float(str(value))
    except ValueError:
        temperature = math.nan
    if not 0.0 <= temperature <= 1.0:
        raise ApiError(400, "invalid_request", f"temperature must be a number from 0 to 1, got {clip(repr(value))}",
                       param="temperature")


def _form_bool(form: Any, name: str) -> bool:
    value = str(form.get(name, "false")).strip().lower()
    if value not in ("true", "false", "1", "0"):
        raise ApiError(400, "invalid_request", f"{name} must be true or false", param=name)
    return value in ("true", "1")


def _form_delay(form: Any, state: ServerState) -> int | None:
    value = form.get("delay_ms")
    if value in (None, ""):
        return None
    try:
        return state.check_delay(int(str(value)))
    except ValueError as err:  # int() of a non-number or of more than 4300 digits, or a delay out of range
        raise ApiError(400, "invalid_request", str(err) if str(err).startswith("delay_ms") else
                       f"delay_ms must be a whole number of milliseconds, got {clip(repr(str(value)))}",
                       param="delay_ms") from None


async def _decode_upload(upload: UploadFile, state: ServerState) -> np.ndarray:
    from ..audio import AudioTooLong, load_audio

    data = await upload.read()
    if not data:
        raise ApiError(400, "invalid_audio", "the uploaded file is empty", param="file")
    limit = state.limits.max_audio_seconds
    async with state.decodes:  # FFmpeg decoding runs beside the engine: a few at a time
        try:
            # the limit is enforced by the decoder: a header claiming hours (or 5 Hz) costs nothing to refuse
            return await asyncio.to_thread(load_audio, data, max_seconds=limit)
        except AudioTooLong as err:
            raise ApiError(413, "audio_too_long", f"the audio lasts {err.seconds:.0f} s or more; the server's limit "
                                                  f"is {limit:g} s", param="file") from None
        except AudioError as err:
            raise ApiError(400, "invalid_audio", str(err).replace(f"<{len(data)} bytes of audio>",
                                                                  repr(upload.filename or "the upload")),
                           param="file") from None


class _UploadSink:
    """Collects an upload's deltas (for streaming) and its final update."""

    def __init__(self) -> None:
        self.deltas: asyncio.Queue[str | StreamUpdate | Exception] = asyncio.Queue()
        self.done: asyncio.Future[StreamUpdate] = asyncio.get_running_loop().create_future()

    def on_text(self, text: str) -> None:
        self.deltas.put_nowait(text)

    def on_words(self, words: list[dict[str, Any]]) -> None:
        pass  # uploads take the words from the final transcription

    def on_result(self, update: StreamUpdate) -> None:
        self.deltas.put_nowait(update)
        if not self.done.done():
            self.done.set_result(update)

    def on_error(self, message: str) -> None:
        error = ApiError(500, "processing_error", message)
        self.deltas.put_nowait(error)
        if not self.done.done():
            self.done.set_exception(error)


async def _result_unless_disconnected(request: Request, sink: _UploadSink) -> StreamUpdate | None:
    """The finished transcription, or None if the client hung up first (then the stream is dropped)."""
    disconnected = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({sink.done, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnected.cancel()
    if sink.done.done():
        return sink.done.result()  # raises the ApiError of a failed stream
    return None


async def _wait_for_disconnect(request: Request) -> None:
    # the body has been read: the next message the server gives is the client's disconnect
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _formatted(update: StreamUpdate, params: TranscriptionRequest, state: ServerState) -> Response:
    result = update.result
    assert result is not None
    usage = {"type": "duration", "seconds": math.ceil(result.duration)}
    if params.response_format == "json":
        return JSONResponse({"text": result.text, "usage": usage})
    if params.response_format == "text":
        return PlainTextResponse(to_txt(result))
    if params.response_format == "srt":
        return PlainTextResponse(to_srt(result))
    if params.response_format == "vtt":
        return PlainTextResponse(to_vtt(result), media_type="text/vtt")
    return JSONResponse(verbose_json(result, update.token_scores, state.model.tokenizer, language=params.language,
                                     segments=params.segment_timestamps, words=params.word_timestamps, usage=usage))


class TranscriptionEventStream(StreamingResponse):
    """``stream=true``: server-sent events, then ``data: [DONE]``.

    Each event speaks two dialects at once, so that clients of either read it unchanged: vLLM's
    ``transcription.chunk`` (``choices[0].delta.content``, a closing chunk with ``finish_reason`` ``"stop"`` and
    an empty ``content``) and OpenAI's typed events (``type`` ``transcript.text.delta`` with ``delta``, then
    ``transcript.text.done`` with the whole ``text``).  With ``stream_include_usage`` the closing event carries the
    usage under both dialects' names (vLLM sends it in a chunk of its own, which OpenAI's SDK could not type).

    The stream is dropped in ``__call__``'s ``finally``, so a client that disconnects (even before the first
    byte) never leaves a stream behind in the engine."""

    def __init__(self, stream: EngineStream, sink: _UploadSink, params: TranscriptionRequest,
                 state: ServerState) -> None:
        self.engine_stream = stream
        self._sink, self._params, self._state = sink, params, state
        self._id = f"trsc-{secrets.token_hex(12)}"
        self._created = int(time.time())
        super().__init__(self._events(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.engine_stream.abandon()

    async def _events(self) -> AsyncIterator[str]:
        while True:
            item = await self._sink.deltas.get()
            if isinstance(item, str):
                yield self._event({"type": "transcript.text.delta", "delta": item}, content=item, finish=None)
                continue
            if isinstance(item, ApiError):
                yield _sse(item.body())
            else:
                assert item.result is not None
                done: dict[str, Any] = {"type": "transcript.text.done", "text": item.result.text}
                if self._params.include_usage and item.usage is not None:
                    usage = item.usage
                    done["usage"] = {"type": "tokens", "input_tokens": usage.prompt_tokens,
                                     "output_tokens": usage.completion_tokens, "prompt_tokens": usage.prompt_tokens,
                                     "completion_tokens": usage.completion_tokens, "total_tokens": usage.total_tokens}
                yield self._event(done, content="", finish="stop")
            yield "data: [DONE]\n\n"
            return

    def _event(self, typed: dict[str, Any], content: str, finish: str | None) -> str:
        choice = {"index": 0, "delta": {"content": content}, "finish_reason": finish, "stop_reason": None}
        return _sse({"id": self._id, "object": "transcription.chunk", "created": self._created,
                     "model": self._state.model_name, **typed, "choices": [choice]})


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


# -- errors ------------------------------------------------------------------------------------------------------


async def _api_error_response(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error_response(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse(ApiError(exc.status_code, code, str(exc.detail)).body(), status_code=exc.status_code,
                        headers=exc.headers)

