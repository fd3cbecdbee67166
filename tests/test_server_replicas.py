"""Replicated serving: two ``voxtral serve`` replicas of the tiny model behind Ray Serve's one entry point.

Concurrent WebSocket sessions and uploads through the proxy must spread over both replicas, and each session's
transcript must equal the offline transcription of its audio (a session moved between replicas mid-stream would
lose its engine state and its text).  Skipped without Ray Serve or the server extra.
"""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("websockets")
pytest.importorskip("soundfile")

from voxtral_realtime.benchmarking.signals import speechlike

from .live_server import connect, pcm16_base64, receive_event, wav_bytes

REPLICAS = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def entry_point(checkpoints):
    import ray
    from ray import serve

    from voxtral_realtime.server.replicas import deployment

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # half a CPU per replica: both fit on the 2-CPU test cluster next to Serve's own actors
    app = deployment(checkpoints["short"].mistral_dir, replicas=REPLICAS, max_streams=8, device="cpu", dtype="f32",
                     cpus_per_replica=0.5, model_name="tiny")
    serve.run(app, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def _clips(model, count: int) -> list:
    """Speech-like clips whose offline transcript has no EOS (a live session goes on after one, offline stops)."""
    clips, seed = [], 100
    while len(clips) < count:
        audio = speechlike(1.6, seed=seed)
        seed += 1
        if model.tokenizer.eos_id not in model.transcribe(audio).tokens:
            clips.append(audio)
    return clips


async def _session(base: str, audio) -> tuple[str, str]:
    """One live session, paced so that the sessions overlap; returns (replica, final text)."""
    ws = await connect(base)
    try:
        replica = ws.response.headers["x-voxtral-replica"]
        assert (await receive_event(ws))["type"] == "session.created"
        await ws.send(json.dumps({"type": "session.update", "model": ""}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        for start in range(0, len(audio), 1280):
            await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                      "audio": pcm16_base64(audio[start:start + 1280])}))
            await asyncio.sleep(0.02)
        await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
        while True:
            event = await receive_event(ws, timeout=120)
            assert event["type"] != "error", event
            if event["type"] == "transcription.done":
                return replica, event["text"]
    finally:
        await ws.close()


def test_websocket_sessions_spread_over_replicas_and_stay_on_theirs(entry_point, tiny_short) -> None:
    clips = _clips(tiny_short, 6)

    async def all_sessions():
        return await asyncio.gather(*[_session(entry_point, clip) for clip in clips])

    results = asyncio.run(all_sessions())
    assert [text for _, text in results] == [tiny_short.transcribe(clip).text for clip in clips]
    assert len({replica for replica, _ in results}) == REPLICAS


def test_uploads_and_health_through_the_entry_point(entry_point, tiny_short) -> None:
    clips = _clips(tiny_short, 2)

    async def uploads():
        async with httpx.AsyncClient(base_url=entry_point, trust_env=False, timeout=120) as client:
            requests = [client.post("/v1/audio/transcriptions", data={"model": "tiny", "response_format": "json"},
                                    files={"file": ("clip.wav", wav_bytes(clip), "audio/wav")})
                        for clip in clips * 3]
            return await asyncio.gather(*requests)

    responses = asyncio.run(uploads())
    assert [r.status_code for r in responses] == [200] * len(responses), [r.text for r in responses]
    # the upload is PCM16: compare with the offline transcript of the same quantized samples
    expected = [tiny_short.transcribe(wav_bytes_to_samples(wav_bytes(clip))).text for clip in clips * 3]
    assert [r.json()["text"] for r in responses] == expected
    health = httpx.get(entry_point + "/health", trust_env=False, timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.headers["x-voxtral-replica"]


def wav_bytes_to_samples(data: bytes):
    from voxtral_realtime.audio import load_audio

    return load_audio(data)
