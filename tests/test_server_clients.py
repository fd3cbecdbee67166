"""Clients we did not write, against the server on the tiny model: the OpenAI Python SDK (strictly typed
responses and stream events) and what vLLM's three speech-to-text examples do.

vLLM's examples (vLLM 0.34.0 source distribution: ``examples/speech_to_text/realtime/openai_realtime_client.py``,
``openai_realtime_microphone_client.py``, ``examples/speech_to_text/openai/openai_transcription_client.py``) import
vLLM itself for their default audio and gradio for the microphone page, so they are not run here; each test below
makes the same calls with the same libraries (``websockets`` with its default settings, the ``openai`` SDK,
``requests``), reads the answers with the same expressions, and says which function of which example it follows.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import zlib
from typing import Any

import httpx
import numpy as np
import pytest

from voxtral_realtime.benchmarking.signals import speechlike
from voxtral_realtime.server import create_app

from .live_server import serve_in_thread, wav_bytes

openai = pytest.importorskip("openai")

HUB_NAME = "mistralai/Voxtral-Mini-4B-Realtime-2602"


@pytest.fixture(scope="module")
def served(tiny_short):
    """Started on a local checkpoint, answering to the Hub id the examples ask for by default."""
    app = create_app(tiny_short, model_name=[HUB_NAME, "tiny"], max_streams=4)
    with serve_in_thread(app) as base:
        yield base


def _sdk(base: str) -> Any:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="EMPTY", http_client=httpx.Client(trust_env=False))


def _vllm_pcm16(audio: np.ndarray) -> np.ndarray:
    """The examples' conversion: ``(audio * 32767).astype(np.int16)``; the server reads PCM16 / 32768."""
    return (audio * 32767).astype(np.int16)


def test_openai_sdk_verbose_json_validates_strictly_and_its_numbers_come_from_the_model(served, tiny_short):
    from openai.types.audio import TranscriptionVerbose

    audio = speechlike(6.0, seed=61)
    session = tiny_short.stream(continue_after_eos=False)
    session.feed(audio)
    session.finish()
    expected = session.transcription
    assert expected.text and len(expected.segments) >= 2  # several segments to tell apart
    client = _sdk(served)
    raw = client.audio.transcriptions.with_raw_response.create(
        file=("talk.wav", wav_bytes(audio)), model=HUB_NAME, response_format="verbose_json", language="en",
        timestamp_granularities=["word", "segment"]).http_response.json()
    verbose = TranscriptionVerbose.model_validate(raw, strict=True)
    assert verbose.text == expected.text and verbose.language == "en"
    assert "".join(s.text for s in verbose.segments) == verbose.text  # leading spaces kept
    assert [(s.start, s.end) for s in verbose.segments] == [
        (round(s.start, 3), round(s.end, 3)) for s in expected.segments]
    scores = session.token_scores
    position = 0
    for segment in verbose.segments:
        # the segment's tokens are a run of the model's tokens; its numbers are those tokens' scores
        first = expected.tokens.index(segment.tokens[0], position)
        while expected.tokens[first:first + len(segment.tokens)] != segment.tokens:
            first = expected.tokens.index(segment.tokens[0], first + 1)
        position = first + len(segment.tokens)
        span = scores[first:position]
        assert segment.avg_logprob == pytest.approx(np.mean([s[0] for s in span]), abs=1e-5)
        assert segment.no_speech_prob == pytest.approx(np.exp(span[0][1]), rel=1e-4)
        assert segment.avg_logprob < 0 and 0 < segment.no_speech_prob < 1
        data = segment.text.encode()
        assert segment.compression_ratio == pytest.approx(len(data) / len(zlib.compress(data)), abs=1e-5)
    assert len({s.avg_logprob for s in verbose.segments}) > 1  # not constants
    assert len({s.no_speech_prob for s in verbose.segments}) > 1
    # the SDK's own parsing of the same request
    parsed = client.audio.transcriptions.create(file=("talk.wav", wav_bytes(audio)), model="tiny",
                                                response_format="verbose_json")
    assert isinstance(parsed, TranscriptionVerbose) and parsed.language == "unknown"


def test_openai_sdk_stream_yields_typed_delta_events(served, tiny_short):
    audio = speechlike(4.0, seed=62)
    expected = tiny_short.transcribe(audio).text
    events = list(_sdk(served).audio.transcriptions.create(file=("a.wav", wav_bytes(audio)), model=HUB_NAME,
                                                           stream=True))
    assert [e.type for e in events[:-1]] == ["transcript.text.delta"] * (len(events) - 1)
    assert events[-1].type == "transcript.text.done" and events[-1].text == expected
    assert "".join(e.delta for e in events[:-1]) == expected


def test_vllm_transcription_client(served, tiny_short):
    """openai_transcription_client.py: ``sync_openai`` (the SDK, with vLLM's extra sampling fields) and
    ``stream_api_response`` (requests, reading ``data["choices"][0]["delta"]["content"]`` from every line until a
    ``finish_reason``)."""
    import requests

    audio = speechlike(3.0, seed=63)
    expected = tiny_short.transcribe(audio).text
    wav = wav_bytes(audio)
    client = _sdk(served)
    model = client.models.list().data[0].id
    assert model == HUB_NAME
    transcription = client.audio.transcriptions.create(
        file=("a.wav", wav), model=model, language="en", prompt="", response_format="json", temperature=0.0,
        extra_body=dict(seed=4419, repetition_penalty=1.3, hotwords=None))
    assert transcription.text == expected

    printed, finish = [], None
    session = requests.Session()
    session.trust_env = False
    response = session.post(f"{served}/v1/audio/transcriptions", headers={"User-Agent": "Transcription-Client"},
                            files={"file": ("a.wav", wav)},
                            data={"stream": "true", "model": model, "language": "en", "response_format": "json"},
                            stream=True)
    for chunk in response.iter_lines(chunk_size=8192, decode_unicode=False, delimiter=b"\n"):
        if chunk:
            data = json.loads(chunk[len("data: "):].decode("utf-8"))["choices"][0]
            printed.append(data["delta"]["content"])
            finish = data.get("finish_reason")
            if finish is not None:
                break
    response.close()
    assert "".join(printed) == expected and finish == "stop"


def test_vllm_realtime_client(served, tiny_short):
    """openai_realtime_client.py's ``realtime_transcribe``: default ``websockets.connect``, 4096-byte appends
    sent as fast as the socket takes them, then the final commit; deltas printed until done."""
    import websockets

    audio = speechlike(5.0, seed=64)
    pcm = _vllm_pcm16(audio)
    expected = tiny_short.transcribe(pcm.astype(np.float32) / 32768).text

    async def realtime_transcribe() -> tuple[str, str]:
        uri = served.replace("http://", "ws://") + "/v1/realtime"
        async with websockets.connect(uri, proxy=None) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
            await ws.send(json.dumps({"type": "session.update", "model": HUB_NAME}))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            audio_bytes = pcm.tobytes()
            for i in range(0, len(audio_bytes), 4096):
                await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": base64.b64encode(audio_bytes[i:i + 4096]).decode("utf-8")}))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
            printed = []
            while True:
                response = json.loads(await ws.recv())
                if response["type"] == "transcription.delta":
                    printed.append(response["delta"])
                elif response["type"] == "transcription.done":
                    return "".join(printed), response["text"]
                elif response["type"] == "error":
                    raise AssertionError(response)

    printed, final = asyncio.run(asyncio.wait_for(realtime_transcribe(), 120))
    assert printed == final == expected


def test_vllm_microphone_client(served, tiny_short):
    """openai_realtime_microphone_client.py's ``websocket_handler``: no final commit ever; microphone chunks
    (gradio's, converted with ``/ 32767`` and ``* 32767``) are appended as they come, and the page shows the
    deltas received so far, which must be the live transcript's beginning."""
    import websockets

    audio = speechlike(6.0, seed=65)
    chunks = [base64.b64encode(_vllm_pcm16(audio[i:i + 8000]).tobytes()).decode("utf-8")
              for i in range(0, len(audio), 8000)]
    offline = tiny_short.transcribe(_vllm_pcm16(audio).astype(np.float32) / 32768).text

    async def websocket_handler() -> str:
        text = ""
        async with websockets.connect(served.replace("http://", "ws://") + "/v1/realtime", proxy=None) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "session.update", "model": HUB_NAME}))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            for chunk in chunks:  # a microphone: half a second at a time
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
                await asyncio.sleep(0.05)
            with contextlib.suppress(asyncio.TimeoutError):
                while True:
                    data = json.loads(await asyncio.wait_for(ws.recv(), 3))
                    if data.get("type") == "transcription.delta":
                        text += data["delta"]
        return text

    shown = asyncio.run(websocket_handler())
    assert shown and offline.startswith(shown)

