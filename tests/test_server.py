"""The server on the tiny model, over real loopback HTTP and WebSocket: every transcript equals
``Model.transcribe`` of the same audio, the protocol's errors keep sessions alive, limits hold, and after every
fault the engine's slots all come back."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import httpx
import numpy as np
import pytest

from voxtral_realtime.benchmarking.signals import speechlike
from voxtral_realtime.errors import UsageError
from voxtral_realtime.server import create_app
from voxtral_realtime.server.keepalive import ANNOUNCED_SEGMENT_BYTES
from voxtral_realtime.server.state import ServerLimits
from voxtral_realtime.writers import to_srt, to_txt, to_vtt

from .live_server import connect, pcm16_base64, receive_event, serve_in_thread, transcribe_over_websocket, wav_bytes
from .test_audio import pcm_wav_saying
from .test_streaming_eos import AUDIO as EOS_AUDIO
from .test_streaming_eos import eos_prone_model  # noqa: F401 - a fixture

LOAD_LIVE_CLIENTS = 50
LOAD_UPLOADS = 20
API_KEY = "test-key_123"
#: the id clients of the real model ask for (vLLM's examples default to it)
HUB_NAME = "mistralai/Voxtral-Mini-4B-Realtime-2602"


def _words(transcription) -> list[tuple[str, float, float]]:
    return [(w.text, round(w.start, 3), round(w.end, 3)) for w in transcription.words]


def _event_words(words: list[dict[str, Any]]) -> list[tuple[str, float, float]]:
    return [(w["word"], w["start"], w["end"]) for w in words]


@pytest.fixture(scope="module")
def server(tiny_short):
    """Room for the load test: 50 live streams and 16 of the uploads at once (admitted by slots, not by load: its
    clients send faster than real time, on whatever CPU runs the tests)."""
    app = create_app(tiny_short, model_name="tiny", max_streams=72,
                     limits=ServerLimits(max_upload_streams=16, max_audio_seconds=60, max_load=0))
    with serve_in_thread(app) as base:
        yield base, app


@pytest.fixture(scope="module")
def strict_server(tiny_short):
    """Small limits, an API key and a short idle timeout, for the fault tests."""
    limits = ServerLimits(max_upload_bytes=200_000, max_audio_seconds=4.0, max_message_bytes=64_000,
                          max_buffered_seconds=1.0, idle_timeout_seconds=1.0, max_connections=8,
                          body_read_timeout_seconds=1.0)
    app = create_app(tiny_short, model_name="tiny", max_streams=2, api_key=API_KEY, limits=limits)
    with serve_in_thread(app) as base:
        yield base, app


def _state(app):
    return app.state.voxtral


def _assert_all_released(app, timeout: float = 10.0) -> None:
    """Every engine row free, no stream in the worker, no slot counted, no audio queued, no connection open."""
    state = _state(app)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (state.worker.free_slots == state.limits.max_streams and state.worker.active_streams == 0
                and state.pool.used == 0 and state.pool.waiting == 0 and state.queued_samples == 0
                and state.connections == 0):
            return
        time.sleep(0.05)
    raise AssertionError(f"not released: free {state.worker.free_slots}/{state.limits.max_streams}, active "
                         f"{state.worker.active_streams}, pool {state.pool.in_use}, queued {state.queued_samples}, "
                         f"connections {state.connections}")


def _client(base: str, **kwargs: Any) -> httpx.Client:
    kwargs.setdefault("timeout", 60)
    return httpx.Client(base_url=base, trust_env=False, **kwargs)


# -- the realtime protocol -------------------------------------------------------------------------------------


def test_websocket_stream_equals_offline_transcript(server, tiny_short):
    base, app = server
    audio = speechlike(2.6, seed=31)
    expected = tiny_short.transcribe(audio)
    assert tiny_short.tokenizer.eos_id not in expected.tokens  # an always-on stream would go on after an EOS
    result = asyncio.run(transcribe_over_websocket(base, audio, chunk=1000, session={"word_timestamps": True}))
    assert result.created["type"] == "session.created"
    assert result.created["id"].startswith("sess-") and len(result.created["id"]) == 5 + 16
    done = result.done
    assert done["text"] == expected.text
    assert "".join(result.deltas) == expected.text
    assert done["usage"] == {"prompt_tokens": 39, "completion_tokens": len(expected.tokens),
                             "total_tokens": 39 + len(expected.tokens), "prompt_tokens_details": None}
    assert _event_words(done["words"]) == _words(expected)
    # words arrive while streaming, each once, with a latency; the final list closes the last one
    assert _event_words(result.words) == _words(expected)[:len(result.words)]
    assert len(result.words) >= len(expected.words) - 1 > 0
    assert all(w["latency"] is not None and 0 <= w["latency"] < 30 for w in result.words)
    assert result.errors == []
    _assert_all_released(app)


def test_a_connection_runs_utterances_one_after_another_with_their_own_delay(server, tiny_short):
    base, app = server
    first, second = speechlike(1.5, seed=32), speechlike(1.8, seed=33)

    async def two_utterances() -> list[dict[str, Any]]:
        ws = await connect(base)
        await receive_event(ws)
        done = []
        for audio, delay in ((first, None), (second, 960)):
            update = {"type": "session.update", "model": "tiny"}
            if delay:
                update["delay_ms"] = delay
            await ws.send(json.dumps(update))
            # audio before the start commit is kept and transcribed (the protocol allows it)
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": pcm16_base64(audio[:4000])}))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": pcm16_base64(audio[4000:])}))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
            while (event := await receive_event(ws))["type"] != "transcription.done":
                assert event["type"] == "transcription.delta"
            done.append(event)
        await ws.close()
        return done

    done = asyncio.run(two_utterances())
    assert done[0]["text"] == tiny_short.transcribe(first).text
    assert done[0]["delay_ms"] == 480
    assert done[1]["text"] == tiny_short.transcribe(second, delay_ms=960).text
    assert done[1]["delay_ms"] == 960 and done[1]["usage"]["prompt_tokens"] == 1 + 32 + 12
    _assert_all_released(app)


def test_bad_messages_get_error_events_and_the_session_goes_on(server, tiny_short):
    base, app = server
    audio = speechlike(1.2, seed=34)

    async def scenario() -> tuple[list[str], dict[str, Any]]:
        ws = await connect(base)
        await receive_event(ws)
        bad = [
            json.dumps({"type": "input_audio_buffer.commit"}),  # before session.update
            "{not json",
            json.dumps([1, 2, 3]),
            json.dumps({"type": "response.create"}),
            json.dumps({"type": "session.update"}),  # no model
            json.dumps({"type": "session.update", "model": "whisper-1"}),
            json.dumps({"type": "session.update", "model": "", "delay_ms": 500}),
            json.dumps({"type": "session.update", "model": "", "word_timestamps": "yes"}),
            json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\x01\x02\x03").decode()}),
            json.dumps({"type": "input_audio_buffer.append", "audio": "%%% not base64 %%%"}),
            json.dumps({"type": "input_audio_buffer.append", "audio": ""}),
            json.dumps({"type": "input_audio_buffer.append", "audio": 12}),
            json.dumps({"type": "input_audio_buffer.commit", "final": "yes"}),
        ]
        codes = []
        for message in bad:
            await ws.send(message)
            event = await receive_event(ws)
            assert event["type"] == "error" and event["error"], event
            codes.append(event["code"])
        await ws.send(b"\x00\x01 binary garbage")
        codes.append((await receive_event(ws))["code"])
        # the same socket still transcribes
        await ws.send(json.dumps({"type": "session.update", "model": "", "extra_field": {"ignored": True}}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": pcm16_base64(audio)}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
        while (event := await receive_event(ws))["type"] != "transcription.done":
            pass
        await ws.close()
        return codes, event

    codes, done = asyncio.run(scenario())
    assert codes == ["model_not_validated", "invalid_json", "invalid_event", "unknown_event", "invalid_event",
                     "model_not_found", "invalid_event", "invalid_event", "invalid_audio", "invalid_audio",
                     "invalid_audio", "invalid_audio", "invalid_event", "invalid_event"]
    assert done["text"] == tiny_short.transcribe(audio).text
    _assert_all_released(app)


def test_an_always_on_stream_goes_on_live_after_the_model_says_eos(eos_prone_model):  # noqa: F811 - the fixture
    """With a model that says EOS every few seconds, a default session restarts right after each EOS (its text
    after the EOS arrives before the final commit), and ``continue_after_eos: false`` stops like transcribe."""
    app = create_app(eos_prone_model, model_name="eos", max_streams=2)
    always_on = eos_prone_model.stream(continue_after_eos=True)
    always_on.feed(EOS_AUDIO)
    always_on.finish()
    offline = eos_prone_model.transcribe(EOS_AUDIO)
    assert eos_prone_model.tokenizer.eos_id in offline.tokens and len(always_on.text) > len(offline.text)

    async def live(base: str) -> tuple[str, str]:
        ws = await connect(base)
        await receive_event(ws)
        await ws.send(json.dumps({"type": "session.update", "model": ""}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        for start in range(0, len(EOS_AUDIO), 4000):
            await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                      "audio": pcm16_base64(EOS_AUDIO[start:start + 4000])}))
        before_final = []
        with contextlib.suppress(asyncio.TimeoutError):  # everything the audio allows, before the final commit
            while True:
                before_final.append((await receive_event(ws, timeout=2.0))["delta"])
        await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
        while (event := await receive_event(ws))["type"] != "transcription.done":
            pass
        await ws.close()
        return "".join(before_final), event["text"]

    with serve_in_thread(app) as base:
        early, final = asyncio.run(live(base))
        stopped = asyncio.run(transcribe_over_websocket(base, EOS_AUDIO, session={"continue_after_eos": False}))
        _assert_all_released(app)
    assert final == always_on.text
    assert len(early) > len(offline.text)  # the words after the first EOS came live, not at the end
    assert stopped.done["text"] == offline.text


# -- REST --------------------------------------------------------------------------------------------------------


def test_rest_transcription_in_every_format(server, tiny_short):
    base, app = server
    audio = speechlike(3.2, seed=35)
    expected = tiny_short.transcribe(audio)
    wav = wav_bytes(audio)
    with _client(base) as client:
        def post(**data: Any) -> httpx.Response:
            response = client.post("/v1/audio/transcriptions", files={"file": ("talk.wav", wav, "audio/wav")},
                                   data={"model": "tiny", **data})
            assert response.status_code == 200, response.text
            return response

        assert post().json() == {"text": expected.text, "usage": {"type": "duration", "seconds": 4}}
        assert post(response_format="text").text == to_txt(expected)
        assert post(response_format="srt").text == to_srt(expected)
        vtt = post(response_format="vtt")
        assert vtt.text == to_vtt(expected) and vtt.headers["content-type"].startswith("text/vtt")
        verbose = post(response_format="verbose_json", **{"timestamp_granularities[]": ["word", "segment"]}).json()
        assert verbose["text"] == expected.text and verbose["duration"] == pytest.approx(3.2)
        assert [(w["word"], w["start"], w["end"]) for w in verbose["words"]] == _words(expected)
        assert [s["text"].strip() for s in verbose["segments"]] == [s.text for s in expected.segments]
        assert post(delay_ms="240").json()["text"] == tiny_short.transcribe(audio, delay_ms=240).text

        events = _sse_events(post(stream="true", stream_include_usage="true").text)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(c["object"] == "transcription.chunk" and c["model"] == "tiny" for c in chunks)
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == expected.text
        # the closing chunk: vLLM's finish_reason with an empty content, OpenAI's done event, the usage in both
        assert chunks[-1]["choices"][0] == {"index": 0, "delta": {"content": ""}, "finish_reason": "stop",
                                            "stop_reason": None}
        assert chunks[-1]["type"] == "transcript.text.done" and chunks[-1]["text"] == expected.text
        assert chunks[-1]["usage"]["completion_tokens"] == chunks[-1]["usage"]["output_tokens"] == \
            len(expected.tokens)
        assert all(c["type"] == "transcript.text.delta" and c["delta"] == c["choices"][0]["delta"]["content"]
                   for c in chunks[:-1])
    _assert_all_released(app)


def _sse_events(body: str) -> list[str]:
    return [block.removeprefix("data: ") for block in body.split("\n\n") if block.strip()]


def test_rest_refuses_bad_requests_clearly(server, tiny_short):
    base, app = server
    wav = wav_bytes(speechlike(1.0, seed=36))
    with _client(base) as client:
        def error(expected_status: int, **request: Any) -> dict[str, Any]:
            response = client.post("/v1/audio/transcriptions", **request)
            assert response.status_code == expected_status, response.text
            return response.json()["error"]

        file = {"file": ("a.wav", wav, "audio/wav")}
        assert error(400, files={"audio": ("a.wav", wav, "audio/wav")})["param"] == "file"
        assert error(400, data={"model": ""})["code"] == "invalid_request"  # not multipart at all
        assert error(404, files=file, data={"model": "whisper-1"})["code"] == "model_not_found"
        assert error(400, files=file, data={"response_format": "xml"})["param"] == "response_format"
        assert error(400, files=file, data={"timestamp_granularities[]": "word"})["param"] == \
            "timestamp_granularities"
        assert error(400, files=file, data={"delay_ms": "500"})["param"] == "delay_ms"
        assert error(400, files=file, data={"stream": "true", "response_format": "srt"})["param"] == "stream"
        not_audio = error(400, files={"file": ("notes.txt", b"this is not audio at all" * 40, "text/plain")})
        assert not_audio["code"] == "invalid_audio" and "notes.txt" in not_audio["message"]
        assert error(400, files={"file": ("empty.wav", b"", "audio/wav")})["code"] == "invalid_audio"
        assert error(400, content=b"{}", headers={"content-type": "application/json"})["code"] == "invalid_request"
        # a multipart body cut off in the middle of the file part
        body, content_type = _multipart(wav)
        cut = error(400, content=body[:len(body) // 2], headers={"content-type": content_type})
        assert "cut off" in cut["message"]
        assert client.post("/v1/audio/transcriptions", files=file).status_code == 200
    _assert_all_released(app)


def _multipart(wav: bytes) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://x/", files={"file": ("a.wav", wav, "audio/wav")})
    return request.read(), request.headers["content-type"]


def test_models_health_and_metrics(server):
    base, _ = server
    with _client(base) as client:
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["max_streams"] == 72
        metrics = client.get("/metrics").text
        page = client.get("/")
    for name in ("voxtral_active_streams", "voxtral_queued_audio_seconds", "voxtral_decode_step_seconds_count",
                 "voxtral_real_time_factor", "voxtral_free_stream_slots 72.0"):
        assert name in metrics
    steps = next(line for line in metrics.splitlines() if line.startswith("voxtral_decode_step_seconds_count"))
    assert float(steps.split()[-1]) > 0  # earlier tests ran decoder steps
    assert page.status_code == 200 and "<title>Voxtral Realtime" in page.text


# -- load --------------------------------------------------------------------------------------------------------


def test_load_50_websocket_clients_and_20_uploads_at_once(server, tiny_short):
    base, app = server
    live_audio = [speechlike(1.0 + 0.02 * i, seed=100 + i) for i in range(LOAD_LIVE_CLIENTS)]
    upload_audio = [speechlike(1.2 + 0.03 * i, seed=200 + i) for i in range(LOAD_UPLOADS)]
    live_expected = [tiny_short.transcribe(a).text for a in live_audio]
    upload_expected = [tiny_short.transcribe(a).text for a in upload_audio]
    engine = _state(app).worker.engine
    calls_before, rows_before = engine.decode_calls, engine.decode_rows

    async def everyone() -> tuple[list[str], list[str]]:
        async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=120) as client:
            async def upload(audio: np.ndarray) -> str:
                response = await client.post("/v1/audio/transcriptions",
                                             files={"file": ("a.wav", wav_bytes(audio), "audio/wav")})
                response.raise_for_status()
                return response.json()["text"]

            async def live(audio: np.ndarray) -> str:
                result = await transcribe_over_websocket(base, audio, chunk=2560, pace=0.02)
                assert result.errors == []
                return result.done["text"]

            tasks = [live(a) for a in live_audio] + [upload(a) for a in upload_audio]
            texts = await asyncio.gather(*tasks)
        return texts[:LOAD_LIVE_CLIENTS], texts[LOAD_LIVE_CLIENTS:]

    started = time.monotonic()
    live_texts, upload_texts = asyncio.run(asyncio.wait_for(everyone(), 150))
    elapsed = time.monotonic() - started
    assert live_texts == live_expected
    assert upload_texts == upload_expected
    assert elapsed < 120
    # the streams really shared decoder steps
    assert (engine.decode_rows - rows_before) > 1.5 * (engine.decode_calls - calls_before)
    _assert_all_released(app)


# -- faults and limits -------------------------------------------------------------------------------------------


def test_clients_vanishing_mid_stream_give_their_slots_back(server, tiny_short):
    base, app = server
    audio = speechlike(2.0, seed=37)

    async def vanish(abort: bool) -> None:
        ws = await connect(base)
        await receive_event(ws)
        await ws.send(json.dumps({"type": "session.update", "model": ""}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": pcm16_base64(audio)}))
        await asyncio.sleep(0.2)
        if abort:
            ws.transport.abort()  # no closing handshake: the TCP connection just drops
        else:
            await ws.close()

    async def many() -> None:
        await asyncio.gather(*(vanish(abort=i % 2 == 0) for i in range(10)))

    asyncio.run(many())
    _assert_all_released(app)
    # an upload that hangs up while waiting for its result is dropped too
    with _client(base, timeout=0.05) as client, pytest.raises(httpx.TimeoutException):
        client.post("/v1/audio/transcriptions", files={"file": ("a.wav", wav_bytes(speechlike(8, seed=38)),
                                                                "audio/wav")})
    _assert_all_released(app)
    # and so is a streamed (server-sent events) upload whose client leaves after the first event
    with _client(base) as client, client.stream(
            "POST", "/v1/audio/transcriptions", data={"stream": "true"},
            files={"file": ("a.wav", wav_bytes(speechlike(20, seed=43)), "audio/wav")}) as response:
        assert next(response.iter_lines()).startswith("data: ")
    _assert_all_released(app)
    # and the server still answers correctly
    result = asyncio.run(transcribe_over_websocket(base, audio))
    assert result.done["text"] == tiny_short.transcribe(audio).text


def test_api_key_is_required_everywhere(strict_server, tiny_short):
    base, app = strict_server

    async def first_event(**kwargs: Any) -> tuple[dict[str, Any], int | None]:
        """The first event and, for a refused client, the close code."""
        ws = await connect(base, **kwargs)
        event = await receive_event(ws)
        if event["type"] == "error":
            await asyncio.wait_for(ws.wait_closed(), 5)
        await ws.close()
        return event, ws.close_code

    refused, close_code = asyncio.run(first_event())
    assert refused["code"] == "unauthorized" and "API key" in refused["error"] and close_code == 1008
    assert asyncio.run(first_event(additional_headers={"Authorization": "Bearer wrong"}))[0]["code"] == \
        "unauthorized"
    assert asyncio.run(first_event(additional_headers={"Authorization": f"Bearer {API_KEY}"}))[0]["type"] == \
        "session.created"

    async def by_subprotocol() -> str | None:
        ws = await connect(base, subprotocols=["voxtral-realtime", f"api-key.{API_KEY}"])
        chosen = ws.subprotocol
        await ws.close()
        return chosen

    assert asyncio.run(by_subprotocol()) == "voxtral-realtime"  # what a browser needs to see selected
    wav = {"file": ("a.wav", wav_bytes(speechlike(1.0, seed=39)), "audio/wav")}
    with _client(base) as client:
        assert client.post("/v1/audio/transcriptions", files=wav).status_code == 401
        assert client.get("/v1/models").status_code == 401
        assert client.get("/metrics").status_code == 401
        assert client.get("/health").status_code == 200  # for load balancers
        assert client.get("/").status_code == 200  # the page asks for the key itself
        assert client.post("/v1/audio/transcriptions", files=wav,
                           headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
        assert client.get("/v1/models", params={"api_key": API_KEY}).status_code == 200
    _assert_all_released(app)


def _strict_ws(base: str) -> Any:
    return connect(base, additional_headers={"Authorization": f"Bearer {API_KEY}"})


async def _processed(ws: Any) -> None:
    """Wait until the server has handled everything sent on ``ws`` so far (an unknown event is answered with an
    error, in order)."""
    await ws.send(json.dumps({"type": "test.barrier"}))
    while (event := await receive_event(ws))["type"] != "error" or event["code"] != "unknown_event":
        pass


def test_upload_limits(strict_server):
    base, app = strict_server
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with _client(base, headers=auth) as client:
        big = client.post("/v1/audio/transcriptions", files={"file": ("big.wav", b"\0" * 300_000, "audio/wav")})
        assert big.status_code == 413 and big.json()["error"]["code"] == "upload_too_large"

        body, content_type = _multipart(b"\0" * 300_000)

        def chunks():  # no Content-Length: the server counts while reading
            for i in range(0, len(body), 16384):
                yield body[i:i + 16384]

        chunked = client.post("/v1/audio/transcriptions", content=chunks(), headers={"content-type": content_type})
        assert chunked.status_code == 413
        long = client.post("/v1/audio/transcriptions",
                           files={"file": ("long.wav", wav_bytes(np.zeros(16000 * 5, np.float32)), "audio/wav")})
        assert long.status_code == 413 and long.json()["error"]["code"] == "audio_too_long"
        # a sample-rate bomb (20 KB saying 5 Hz: 2000 s, 128 MB of float32 once decoded) costs nothing
        bomb = client.post("/v1/audio/transcriptions", files={"file": ("bomb.wav", pcm_wav_saying(5, 10_000),
                                                                       "audio/wav")})
        assert bomb.status_code == 400 and "5 Hz" in bomb.json()["error"]["message"]
    _assert_all_released(app)



def test_stream_limits_busy_idle_and_message_size(strict_server, tiny_short):
    base, app = strict_server
    audio = speechlike(1.0, seed=40)

    async def scenario() -> dict[str, Any]:
        sockets = [await _strict_ws(base) for _ in range(3)]
        for ws in sockets:
            await receive_event(ws)
            await ws.send(json.dumps({"type": "session.update", "model": ""}))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            if ws is not sockets[2]:
                await _processed(ws)
        busy = await receive_event(sockets[2])  # two streams is all this server holds
        # an oversized message is refused, and the session goes on
        await sockets[0].send(json.dumps({"type": "input_audio_buffer.append", "audio": "A" * 70_000}))
        too_large = await receive_event(sockets[0])
        # audio appended before a start beyond the buffer limit
        await sockets[2].send(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": pcm16_base64(np.zeros(20000, np.float32))}))
        buffer_full = await receive_event(sockets[2])
        await sockets[0].send(json.dumps({"type": "input_audio_buffer.append", "audio": pcm16_base64(audio)}))
        await sockets[0].send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
        while (done := await receive_event(sockets[0]))["type"] != "transcription.done":
            pass
        # a slot is free again: the third client can start now
        await sockets[2].send(json.dumps({"type": "input_audio_buffer.commit"}))
        # idle sessions are closed after a second without a message (the started one too)
        idle = await receive_event(sockets[1], timeout=5)
        await asyncio.wait_for(sockets[1].wait_closed(), 5)
        for ws in sockets:
            await ws.close()
        return {"busy": busy, "too_large": too_large, "buffer_full": buffer_full, "done": done, "idle": idle,
                "close_code": sockets[1].close_code}

    events = asyncio.run(scenario())
    assert events["busy"]["code"] == "busy"
    assert events["too_large"]["code"] == "message_too_large"
    assert events["buffer_full"]["code"] == "buffer_full"
    assert events["done"]["text"] == tiny_short.transcribe(audio).text
    assert events["idle"]["code"] == "idle_timeout" and events["close_code"] == 1000
    _assert_all_released(app)


def test_connections_beyond_the_limit_are_told_to_come_back_later(strict_server):
    base, app = strict_server

    async def scenario() -> tuple[dict[str, Any], int | None]:
        held = [await _strict_ws(base) for _ in range(_state(app).limits.max_connections)]
        for ws in held:
            assert (await receive_event(ws))["type"] == "session.created"
        extra = await _strict_ws(base)
        refused = await receive_event(extra)
        await asyncio.wait_for(extra.wait_closed(), 5)
        for ws in held:
            await ws.close()
        return refused, extra.close_code

    refused, close_code = asyncio.run(scenario())
    assert refused["code"] == "busy" and close_code == 1013
    _assert_all_released(app)


def test_fast_sender_is_slowed_not_dropped_and_a_reader_that_never_reads_stalls_no_one(strict_server, tiny_short):
    """30 s sent at once through a 1 s buffer: the server stops reading the socket while the engine catches up,
    and the transcript is complete.  Meanwhile a client that never reads its events does not hold it up."""
    base, app = strict_server
    audio = speechlike(30.0, seed=41)
    expected = tiny_short.transcribe(audio).text

    async def scenario() -> str:
        silent_reader = await _strict_ws(base)
        await silent_reader.send(json.dumps({"type": "session.update", "model": ""}))
        await silent_reader.send(json.dumps({"type": "input_audio_buffer.commit"}))
        for start in range(0, 16000 * 10, 16000):
            await silent_reader.send(json.dumps({"type": "input_audio_buffer.append",
                                                 "audio": pcm16_base64(speechlike(1.0, seed=start))}))
        ws = await _strict_ws(base)
        await receive_event(ws)
        await ws.send(json.dumps({"type": "session.update", "model": ""}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        for start in range(0, len(audio), 16000):
            await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                      "audio": pcm16_base64(audio[start:start + 16000])}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
        throttled = []
        while (event := await receive_event(ws, timeout=60))["type"] != "transcription.done":
            assert event["type"] in ("transcription.delta", "input_audio_buffer.throttled")
            if event["type"] == "input_audio_buffer.throttled":
                throttled.append(event)
        await ws.close()
        await silent_reader.close()
        # told that it is being slowed down
        assert throttled and throttled[0]["max_queued_seconds"] == 1.0 and throttled[0]["queued_seconds"] > 1.0
        return event["text"]

    assert asyncio.run(asyncio.wait_for(scenario(), 120)) == expected
    _assert_all_released(app)


def test_a_dead_engine_is_reported_not_waited_for(tiny_short):
    app = create_app(tiny_short, model_name="tiny", max_streams=1)
    with serve_in_thread(app) as base:
        _state(app).worker.stop()  # as if the engine thread had died
        with _client(base) as client:
            assert client.get("/health").status_code == 503
            upload = client.post("/v1/audio/transcriptions",
                                 files={"file": ("a.wav", wav_bytes(speechlike(1.0, seed=44)), "audio/wav")})
            assert upload.status_code == 503 and upload.json()["error"]["code"] == "processing_error"

        async def commit() -> dict[str, Any]:
            ws = await connect(base)
            await receive_event(ws)
            await ws.send(json.dumps({"type": "session.update", "model": ""}))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            event = await receive_event(ws)
            await ws.close()
            return event

        assert asyncio.run(commit())["code"] == "processing_error"


def test_outbox_of_a_client_that_does_not_read_stays_small():
    """Text and words of many ticks merge into one event each; an error keeps its place; past its bytes the client
    is marked as not reading, and what it had queued is dropped."""
    from voxtral_realtime.server.state import Outbox

    outbox = Outbox(max_bytes=100_000)
    for tick in range(1000):
        outbox.put_delta(f"{tick} ")
        outbox.put_words([{"word": str(tick)}])
    outbox.put({"type": "error", "code": "invalid_json"})
    outbox.put_delta("after")
    events = [json.loads(text) for text in asyncio.run(outbox.take())]
    assert [e["type"] for e in events] == ["transcription.delta", "transcription.words", "error",
                                           "transcription.delta"]
    assert events[0]["delta"] == "".join(f"{t} " for t in range(1000)) and len(events[1]["words"]) == 1000
    assert not outbox.overflowed and outbox.unsent_bytes == 0
    big = "x" * 30_000
    for _ in range(3):
        outbox.put({"type": "error", "error": big})
    assert not outbox.overflowed and 90_000 < outbox.unsent_bytes <= 100_000
    outbox.put({"type": "error", "error": big})
    assert outbox.overflowed and outbox.overflow.is_set() and not outbox._items
    outbox.put_delta("more")  # nothing more is kept
    assert not outbox._items


# -- the command line --------------------------------------------------------------------------------------------


def test_voxtral_serve_command(checkpoints, tiny_short):
    folder = checkpoints["short"].mistral_dir
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "VOXTRAL_API_KEY": API_KEY}
    process = subprocess.Popen([sys.executable, "-m", "voxtral_realtime.cli", "serve", "--model", str(folder),
                                "--device", "cpu", "--port", str(port), "--max-streams", "2", "--no-progress",
                                "--served-model-name", "tiny", "--served-model-name", HUB_NAME],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        with _client(base, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
            deadline = time.monotonic() + 90
            while True:
                assert process.poll() is None, process.communicate()[0]
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "voxtral serve did not come up"
                time.sleep(0.2)
            audio = speechlike(1.5, seed=42)
            response = client.post("/v1/audio/transcriptions", files={"file": ("a.wav", wav_bytes(audio),
                                                                                "audio/wav")})
            assert response.json()["text"] == tiny_short.transcribe(audio).text
            assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny", HUB_NAME]
    finally:
        process.terminate()
        process.wait(30)


def test_voxtral_serve_without_the_server_extra_says_what_to_install(monkeypatch, capsys):
    import importlib.util

    from voxtral_realtime.cli import main

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "fastapi" else real_find_spec(name, *a))
    assert main(["serve"]) == 1
    err = capsys.readouterr().err
    assert "fastapi" in err and "pip install 'voxtral-realtime[server]'" in err
    assert len(err.strip().splitlines()) == 1


# -- issue 22: hostile numbers, served names, clients we did not write ------------------------------------------


def test_an_absurd_number_is_an_error_event_and_the_stream_in_progress_goes_on(server, tiny_short):
    """``delay_ms`` = 10^400 once raised OverflowError inside the handler: no error event, the socket dropped and
    the transcription in progress lost.  Now: an error naming the field, and the stream finishes."""
    base, app = server
    audio = speechlike(1.5, seed=45)

    async def scenario() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        ws = await connect(base)
        await receive_event(ws)
        await ws.send(json.dumps({"type": "session.update", "model": ""}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": pcm16_base64(audio[:8000])}))
        errors = []
        for bad in ({"delay_ms": 10 ** 400}, {"target_streaming_delay_ms": -(10 ** 400)}, {"delay_ms": 1e308},
                    {"delay_ms": float("inf")}, {"delay_ms": 480.5}):
            await ws.send(json.dumps({"type": "session.update", "model": "", **bad}))
            errors.append(await receive_event(ws))
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": pcm16_base64(audio[8000:])}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
        while (event := await receive_event(ws))["type"] != "transcription.done":
            assert event["type"] == "transcription.delta", event
        await ws.close()
        return errors, event

    errors, done = asyncio.run(scenario())
    assert [e["code"] for e in errors] == ["invalid_event"] * 5
    assert "delay_ms" in errors[0]["error"] and "target_streaming_delay_ms" in errors[1]["error"]
    assert all(len(e["error"]) < 300 for e in errors)  # the 400 digits are not echoed
    assert done["text"] == tiny_short.transcribe(audio).text
    with _client(base) as client:
        wav = {"file": ("a.wav", wav_bytes(audio), "audio/wav")}
        for value in ("1" + "0" * 400, "9" * 5000, "-1", "1e3", "nan"):
            response = client.post("/v1/audio/transcriptions", files=wav, data={"delay_ms": value})
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == "delay_ms" and len(response.text) < 500
    _assert_all_released(app)


def test_served_model_names(tiny_short):
    """``--served-model-name``: a server started on a local folder answers to the Hub id clients ask for."""
    app = create_app(tiny_short, model_name=["local-tiny", HUB_NAME], max_streams=2)
    audio = speechlike(1.2, seed=46)
    expected = tiny_short.transcribe(audio).text
    with serve_in_thread(app) as base:
        with _client(base) as client:
            assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["local-tiny", HUB_NAME]
            for name in (HUB_NAME, "local-tiny"):
                response = client.post("/v1/audio/transcriptions", data={"model": name},
                                       files={"file": ("a.wav", wav_bytes(audio), "audio/wav")})
                assert response.status_code == 200 and response.json()["text"] == expected
            refused = client.post("/v1/audio/transcriptions", data={"model": "whisper-1"},
                                  files={"file": ("a.wav", wav_bytes(audio), "audio/wav")})
            assert refused.status_code == 404 and HUB_NAME in refused.json()["error"]["message"]
        result = asyncio.run(transcribe_over_websocket(base, audio, session={"model": HUB_NAME}))
        assert result.errors == [] and result.done["text"] == expected
        _assert_all_released(app)


def test_a_bad_stream_count_is_a_usage_error():
    """The CLI reports VoxtralError in one line; a plain ValueError from an option would be a traceback."""
    with pytest.raises(UsageError, match="max_streams"):
        create_app(lambda: None, max_streams=0)


def _undecided_in_worker(app) -> int:
    """Samples of audio inside the worker and the engine whose tokens are not decided yet, over all streams
    (read from the test thread: a snapshot)."""
    total = 0
    for stream in list(_state(app).worker._streams.values()):
        session = stream.session
        total += stream.pending_samples + max(0, session.samples_fed - len(session.tokens) * 1280)
    return total


def test_fast_senders_are_slowed_not_dropped_and_the_buffer_cap_holds(tiny_short):
    """Two clients send 40 s each as fast as the socket takes it, through a 1 s buffer, to a server whose
    keepalive pings every 0.2 s and gives up 0.2 s later: reading them pauses far longer than that.  Both get the
    whole transcript (their pongs wait behind their audio, which is no sign of death), and the audio waiting
    anywhere in the server never exceeds the cap (audio counts until its tokens are decided: the engine takes 16
    steps a round but decodes 2), and the queue metric says so while it waits."""
    limits = ServerLimits(max_buffered_seconds=1.0, max_message_bytes=64_000)
    app = create_app(tiny_short, model_name="tiny", max_streams=2, limits=limits)
    audio = [speechlike(40.0, seed=47), speechlike(40.0, seed=48)]
    expected = [tiny_short.transcribe(a).text for a in audio]
    undecided, queued = [], []

    async def sender(base: str, samples: np.ndarray) -> str:
        result = await transcribe_over_websocket(base, samples, chunk=8000, timeout=300)
        assert result.errors == []
        return result.done["text"]

    async def watch() -> None:
        while True:
            undecided.append(_undecided_in_worker(app))
            queued.append(_state(app).queued_samples)
            await asyncio.sleep(0.02)

    async def scenario(base: str) -> list[str]:
        watcher = asyncio.create_task(watch())
        try:
            return await asyncio.gather(*(sender(base, a) for a in audio))
        finally:
            watcher.cancel()

    with serve_in_thread(app, ws_ping_interval=0.2, ws_ping_timeout=0.2) as base:
        texts = asyncio.run(asyncio.wait_for(scenario(base), 300))
        _assert_all_released(app)
    assert texts == expected
    # per stream: the cap, one message over it, and the look-ahead of the model's delay
    bound = 2 * (16000 * 1.0 + 8000 + 8 * 1280)
    assert 0 < max(undecided) <= bound
    assert max(queued) <= bound and max(queued) > 16000  # the metric saw the backlog


@pytest.mark.skipif(not hasattr(socket, "TCP_MAXSEG"), reason="the platform cannot set a TCP segment size")
def test_clients_are_offered_ethernet_sized_segments(server):
    """A client's kernel sizes its send buffer by the connection's TCP segments: on loopback's 64 KiB ones, MBs of
    its audio waited ahead of its keepalive pings, longer than its ping timeout while the engine lagged."""
    base, _ = server
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as client:
        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG) <= ANNOUNCED_SEGMENT_BYTES


def test_schema_behind_the_key_limits_in_bytes_a_body_cut_short_and_huge_headers(strict_server):
    base, app = strict_server
    with _client(base) as client:
        assert client.get("/openapi.json").status_code == 401
        schema = client.get("/openapi.json", headers={"Authorization": f"Bearer {API_KEY}"})
        assert schema.status_code == 200 and "/v1/audio/transcriptions" in schema.json()["paths"]
        assert client.get("/docs").status_code == 404
        huge = client.get("/health", headers={f"x-filler-{i}": "a" * 1000 for i in range(100)})
        assert huge.status_code == 431 and huge.json()["error"]["code"] == "headers_too_large"
    # a body that stops short of its Content-Length is given up after the read timeout, with 408
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
                    API_KEY.encode() + b"\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                    b"Content-Length: 5000\r\n\r\n--b\r\n")
        assert raw.recv(100).startswith(b"HTTP/1.1 408")

    async def non_ascii() -> dict[str, Any]:
        ws = await _strict_ws(base)
        await receive_event(ws)
        # 40 000 characters, 80 000 bytes: over the 64 000-byte limit
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": "é" * 40_000}, ensure_ascii=False))
        event = await receive_event(ws)
        await ws.close()
        return event

    assert asyncio.run(non_ascii())["code"] == "message_too_large"
    _assert_all_released(app)


def test_memory_of_a_connection_is_bounded_in_bytes(strict_server):
    """A client that never reads, flooding the server with events whose error echoes its own 60 KB strings (once:
    256 unsent events of 60 KB each, held per connection), and one-sample appends before the first commit (once:
    an array per append, 63-80 bytes a sample): the Python memory the server holds for them stays small."""
    import tracemalloc

    base, app = strict_server

    async def flood() -> int:
        ws = await _strict_ws(base)  # never reads
        await ws.send(json.dumps({"type": "session.update", "model": ""}))
        for i in range(300):
            await ws.send(json.dumps({"type": "x" * 60_000 + str(i)}))
        await asyncio.sleep(0.5)
        held = tracemalloc.get_traced_memory()[0]
        await ws.close()
        return held

    async def one_sample_appends() -> int:
        ws = await _strict_ws(base)
        await receive_event(ws)
        await ws.send(json.dumps({"type": "session.update", "model": ""}))
        one = pcm16_base64(np.full(1, 0.25, np.float32))
        for _ in range(12_000):  # 0.75 s: under the 1 s buffer this server allows before a start
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": one}))
        await _processed(ws)
        held = tracemalloc.get_traced_memory()[0]
        await ws.close()
        return held

    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        flooded = asyncio.run(flood()) - baseline
        _assert_all_released(app)
        baseline = tracemalloc.get_traced_memory()[0]
        appended = asyncio.run(one_sample_appends()) - baseline
    finally:
        tracemalloc.stop()
    assert flooded < 3_000_000, flooded
    assert appended < 300_000, appended  # 24 KB of PCM16, plus the client's own bookkeeping
    _assert_all_released(app)


def _json_values():
    from hypothesis import strategies as st

    scalars = (st.none() | st.booleans() | st.integers() | st.sampled_from([10 ** 400, -10 ** 400, 2 ** 63, 480, 960])
               | st.floats() | st.text(max_size=40))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(max_size=8), inner, max_size=3), max_leaves=6)


def test_property_every_event_field_gets_an_answer_never_a_dropped_session(server):
    """Any JSON in any field of the three client events: an error event naming the problem or acceptance, and the
    session stays open (checked by a barrier event after each)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    base, app = server
    values = _json_values()
    events = st.one_of(
        st.fixed_dictionaries({"type": st.just("session.update")}, optional={
            "model": values | st.sampled_from(["", "tiny"]), "delay_ms": values,
            "target_streaming_delay_ms": values, "word_timestamps": values, "continue_after_eos": values}),
        st.fixed_dictionaries({"type": st.just("input_audio_buffer.append")}, optional={
            "audio": values | st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode())}),
        st.fixed_dictionaries({"type": st.just("input_audio_buffer.commit")}, optional={"final": values}),
        st.fixed_dictionaries({"type": values}))
    loop = asyncio.new_event_loop()
    ws = loop.run_until_complete(connect(base))
    loop.run_until_complete(receive_event(ws))

    async def answered(event: dict[str, Any]) -> list[dict[str, Any]]:
        await ws.send(json.dumps(event))
        await ws.send(json.dumps({"type": "test.barrier"}))
        errors = []
        while True:
            reply = await receive_event(ws, timeout=10)
            if reply["type"] == "error":
                if reply["code"] == "unknown_event" and "test.barrier" in reply["error"]:
                    return errors
                errors.append(reply)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(events)
    def one_event(event: dict[str, Any]) -> None:
        for error in loop.run_until_complete(answered(event)):
            assert isinstance(error["code"], str) and isinstance(error["error"], str) and len(error["error"]) < 400
            assert error["code"] != "processing_error", error  # a bug, not the client's mistake

    try:
        one_event()
    finally:
        loop.run_until_complete(ws.close())
        loop.close()
    _assert_all_released(app)


def test_property_every_form_field_gets_a_status_never_a_500(server):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    base, app = server
    wav = wav_bytes(speechlike(0.3, seed=49))
    text = st.text(max_size=30) | st.sampled_from(["480", "1" + "0" * 400, "nan", "-1", "0.5", "true", "en", "json",
                                                     "verbose_json", "word", "2400", "1e3", "inf"])
    fields = st.fixed_dictionaries({}, optional={name: text for name in (
        "delay_ms", "temperature", "stream", "stream_include_usage", "response_format", "language", "model",
        "timestamp_granularities[]")})

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(fields)
    def one_form(data: dict[str, str]) -> None:
        with _client(base) as client:
            response = client.post("/v1/audio/transcriptions", data=data,
                                   files={"file": ("a.wav", wav, "audio/wav")})
        assert response.status_code in (200, 400, 404), (data, response.status_code, response.text[:200])
        if response.status_code != 200:
            named = response.json()["error"]["param"]
            assert named in {name.removesuffix("[]") for name in data} | {"model"}, (data, response.text)

    one_form()
    _assert_all_released(app)
