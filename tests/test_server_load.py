"""Admission of live streams by the engine's measured load: the meter on a fake clock, and the server on the tiny
model with a known cost per stream injected in place of the measurement (no timing is asserted)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from voxtral_realtime.benchmarking.signals import speechlike
from voxtral_realtime.errors import UsageError
from voxtral_realtime.server import create_app
from voxtral_realtime.server.load import EngineLoad
from voxtral_realtime.server.state import ServerLimits

from .live_server import connect, receive_event, serve_in_thread, transcribe_over_websocket, wav_bytes


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def meter_that_saw(per_stream: float, overhead: float = 0.0, clock: FakeClock | None = None) -> EngineLoad:
    """A meter that has seen 40 s of engine runs, each two batched steps costing ``overhead + n * per_stream`` (in
    80 ms steps) for n = 1..4 streams, one run every 160 ms."""
    clock = clock or FakeClock()
    load = EngineLoad(step_seconds=0.08, time_constant=5.0, clock=clock)
    for i in range(250):
        streams = 1 + i % 4
        clock.now += 0.16
        load.record(2 * 0.08 * (overhead + streams * per_stream), steps=2, streams=2 * streams)
    return load


def known_cost(per_stream: float) -> EngineLoad:
    """Stands in for the worker's meter: every stream costs ``per_stream`` of real time, whatever the tiny model
    really takes."""
    load = meter_that_saw(per_stream)
    load.record = lambda *args, **kwargs: None  # the worker's own measurements are ignored
    return load


# -- the meter ---------------------------------------------------------------------------------------------------


def test_the_meter_fits_the_step_time_by_batch_size_and_decays_when_idle():
    clock = FakeClock()
    load = EngineLoad(step_seconds=0.08, time_constant=5.0, clock=clock)
    assert load.utilization() == 0.0 and load.step_model() is None  # just started: nothing measured
    load = meter_that_saw(per_stream=0.1, overhead=0.4, clock=clock)
    overhead, per_stream = load.step_model()
    assert overhead == pytest.approx(0.4 * 0.08) and per_stream == pytest.approx(0.1 * 0.08)
    assert load.stream_cost() == pytest.approx(0.1) and load.load_with(5) == pytest.approx(0.9)
    assert load.capacity(0.9, limit=32) == 5 and load.capacity(0.9, limit=3) == 3
    # busy (0.4 + 0.1 n) of each run's 160 ms: 0.5..0.8 of the time, 0.65 on average
    assert load.utilization() == pytest.approx(0.65, rel=0.03)
    clock.now += 30  # the streams left: the engine rests
    assert load.utilization() < 0.01
    assert load.stream_cost() == pytest.approx(0.1)  # what a stream costs is still known


def test_a_meter_started_a_moment_ago_is_not_diluted_by_time_before_it():
    clock = FakeClock()
    load = EngineLoad(step_seconds=0.08, time_constant=5.0, clock=clock)
    clock.now += 0.5
    load.record(0.5, steps=6, streams=6)  # busy all of its first half second
    assert load.utilization() == pytest.approx(1.0, rel=0.06)
    assert load.step_model() is None  # one batch size: the cost of one more stream is not known yet


def test_admission_arithmetic():
    load = meter_that_saw(per_stream=0.3)
    assert [load.admits(n, n, 0.9) for n in range(5)] == [True, True, True, False, False]
    assert load.capacity(0.9, limit=32) == 3
    assert not load.admits(3, 1, 0.9)  # uploads in the batch count too
    assert load.admits(7, 0, 0.9)  # no live stream: a stale measurement must not lock the server out
    assert load.admits(31, 31, 0.0)  # load admission off
    # a batch that costs the same for any number of streams (a GPU) admits as many as the slots
    flat = meter_that_saw(per_stream=0.0, overhead=0.2)
    assert flat.admits(200, 200, 0.9) and flat.capacity(0.9, limit=64) == 64
    # whatever the float rounding, the capacity is what admission lets in
    for per_stream, overhead, max_load in ((0.1, 0.0, 0.3), (0.07, 0.2, 0.9), (0.45, 0.0, 0.9)):
        load = meter_that_saw(per_stream, overhead)
        capacity = load.capacity(max_load, limit=100)
        assert capacity >= 2 and load.admits(capacity - 1, capacity - 1, max_load)
        assert not load.admits(capacity, capacity, max_load)


def test_unmeasured_batching_admits_while_the_engine_has_room():
    clock = FakeClock()
    load = EngineLoad(step_seconds=0.08, time_constant=5.0, clock=clock)
    assert load.admits(5, 5, 0.9)  # nothing measured: admit, the first rounds measure
    for _ in range(100):  # one stream, always alone in its step: a slope cannot be fitted
        clock.now += 0.08
        load.record(0.04, steps=1, streams=1)
    assert load.step_model() is None and load.admits(1, 1, 0.9)  # busy half the time: there is room
    for _ in range(200):
        clock.now += 0.08
        load.record(0.08, steps=1, streams=1)
    assert not load.admits(1, 1, 0.9)  # busy all the time: none


# -- the server --------------------------------------------------------------------------------------------------


def _state(app: Any) -> Any:
    return app.state.voxtral


async def _start(ws: Any) -> list[dict[str, Any]]:
    """Start a transcription; returns the events it got in answer (an ``error`` if it was refused)."""
    await ws.send(json.dumps({"type": "session.update", "model": ""}))
    await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
    await ws.send(json.dumps({"type": "test.barrier"}))  # answered, in order, with an unknown_event error
    events = []
    while (event := await receive_event(ws))["type"] != "error" or event["code"] != "unknown_event":
        events.append(event)
    return events


async def _open(base: str) -> Any:
    ws = await connect(base)
    assert (await receive_event(ws))["type"] == "session.created"
    return ws


def _wait_for_live_streams(app: Any, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while _state(app).pool.in_use["live"] != count:
        assert time.monotonic() < deadline, f"{_state(app).pool.in_use['live']} live streams, expected {count}"
        time.sleep(0.02)


def _gauge(metrics: str, name: str) -> float:
    return float(next(line for line in metrics.splitlines() if line.startswith(name + " ")).split()[-1])


def test_live_streams_beyond_the_compute_are_refused_busy_and_uploads_are_not(tiny_short):
    app = create_app(tiny_short, model_name="tiny", max_streams=8, limits=ServerLimits(max_load=0.9))
    audio = speechlike(1.0, seed=60)
    with serve_in_thread(app) as base:
        _state(app).worker.load = load = known_cost(0.3)

        async def scenario() -> dict[str, Any]:
            sockets = [await _open(base) for _ in range(4)]
            admitted = [await _start(ws) for ws in sockets[:3]]
            refused = await _start(sockets[3])
            async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=60) as client:
                health = (await client.get("/health")).json()
                metrics = (await client.get("/metrics")).text
                # an upload is offline work: the compute the live streams leave is enough for it, however slowly
                upload = await client.post("/v1/audio/transcriptions",
                                           files={"file": ("a.wav", wav_bytes(audio), "audio/wav")})
            await sockets[0].close()  # a live stream leaves: its compute is free for a new one
            await asyncio.to_thread(_wait_for_live_streams, app, 2)
            readmitted = await _start(sockets[3])
            for ws in sockets[1:]:
                await ws.close()
            return {"admitted": admitted, "refused": refused, "health": health, "metrics": metrics,
                    "upload": upload, "readmitted": readmitted}

        result = asyncio.run(scenario())
        _wait_for_live_streams(app, 0)
    assert result["admitted"] == [[], [], []]
    [refused] = result["refused"]
    assert refused["code"] == "busy" and "compute capacity" in refused["error"]
    assert result["readmitted"] == []
    assert result["upload"].status_code == 200
    assert result["upload"].json()["text"] == tiny_short.transcribe(audio).text
    health = result["health"]
    assert health["live_streams"] == 3 and health["stream_cost"] == 0.3 and health["live_stream_capacity"] == 3
    assert health["engine_utilization"] == round(load.utilization(), 4) and health["max_load"] == 0.9
    metrics = result["metrics"]
    assert _gauge(metrics, "voxtral_live_stream_capacity") == 3
    assert _gauge(metrics, "voxtral_stream_cost") == pytest.approx(0.3)
    assert _gauge(metrics, "voxtral_engine_utilization") == pytest.approx(load.utilization())
    assert _gauge(metrics, "voxtral_live_streams") == 3


def test_with_load_admission_off_live_streams_are_admitted_up_to_max_streams(tiny_short):
    app = create_app(tiny_short, model_name="tiny", max_streams=4, limits=ServerLimits(max_load=0))
    with serve_in_thread(app) as base:
        _state(app).worker.load = known_cost(0.3)

        async def scenario() -> list[list[dict[str, Any]]]:
            sockets = [await _open(base) for _ in range(5)]
            answers = [await _start(ws) for ws in sockets]
            for ws in sockets:
                await ws.close()
            return answers

        answers = asyncio.run(scenario())
        _wait_for_live_streams(app, 0)
    assert answers[:4] == [[], [], [], []]
    [refused] = answers[4]
    assert refused["code"] == "busy" and "all 4 streams are in use" in refused["error"]


def test_a_fresh_server_admits_until_measured_and_the_worker_measures(tiny_short):
    app = create_app(tiny_short, model_name="tiny", max_streams=4)
    with serve_in_thread(app) as base, httpx.Client(base_url=base, trust_env=False, timeout=60) as client:
        fresh = client.get("/health").json()

        async def two_streams() -> list[Any]:  # of different lengths: steps of one stream and of two
            return await asyncio.gather(*(transcribe_over_websocket(base, speechlike(seconds, seed=61))
                                          for seconds in (1.0, 2.5)))

        results = asyncio.run(two_streams())
        after = client.get("/health").json()
    assert fresh["stream_cost"] is None and fresh["live_stream_capacity"] is None
    assert fresh["engine_utilization"] == 0.0 and fresh["max_load"] == 0.9
    assert all(result.errors == [] and result.done is not None for result in results)
    assert after["stream_cost"] >= 0 and 0 < after["engine_utilization"] <= 1
    assert 0 <= after["live_stream_capacity"] <= 4


def test_a_load_limit_that_is_not_a_fraction_is_a_usage_error(tiny_short):
    with pytest.raises(UsageError, match="max_load"):
        create_app(tiny_short, limits=ServerLimits(max_load=-0.5))


def test_max_load_on_the_command_line(capsys):
    from voxtral_realtime.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["serve"]).max_load == 0.9
    assert parser.parse_args(["serve", "--max-load", "0"]).max_load == 0.0
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--max-load", "1.5"])
    assert "fraction of the engine's time" in capsys.readouterr().err
