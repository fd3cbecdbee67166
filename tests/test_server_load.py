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
from voxtral_realtime.server.load import EngineLoad, admits_live, live_capacity
from voxtral_realtime.server.state import ServerLimits

from .live_server import connect, receive_event, serve_in_thread, transcribe_over_websocket, wav_bytes


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class KnownCost:
    """Stands in for the worker's :class:`EngineLoad`: every stream costs ``cost`` of real time, whatever the
    tiny model really takes (the worker's own records are ignored)."""

    def __init__(self, cost: float, state: Any) -> None:
        self.cost, self.state = cost, state

    def record(self, busy_seconds: float, audio_seconds: float) -> None:
        pass

    def utilization(self) -> float:
        return self.state.pool.in_use["live"] * self.cost

    def cost_per_stream(self) -> float:
        return self.cost


# -- the meter ---------------------------------------------------------------------------------------------------


def test_the_meter_measures_utilization_and_cost_and_decays_when_idle():
    clock = FakeClock()
    load = EngineLoad(time_constant=5.0, clock=clock)
    assert load.utilization() == 0.0 and load.cost_per_stream() is None  # just started: nothing measured
    for _ in range(250):  # 20 s of rounds, each 80 ms of one stream's audio computed in 24 ms
        clock.now += 0.08
        load.record(0.024, 0.08)
    assert load.utilization() == pytest.approx(0.3, rel=0.02)
    assert load.cost_per_stream() == pytest.approx(0.3)
    clock.now += 30  # the streams left: the engine rests
    assert load.utilization() < 0.01
    assert load.cost_per_stream() == pytest.approx(0.3)  # what a stream costs is still known


def test_a_meter_started_a_moment_ago_is_not_diluted_by_time_before_it():
    clock = FakeClock()
    load = EngineLoad(time_constant=5.0, clock=clock)
    clock.now += 0.5
    load.record(0.5, 0.1)  # busy all of its first half second
    assert load.utilization() == pytest.approx(1.0, rel=0.06)
    assert load.cost_per_stream() == pytest.approx(5.0)


def test_admission_arithmetic():
    assert [admits_live(n, 0.3, 0.9) for n in range(5)] == [True, True, True, False, False]
    assert live_capacity(0.3, 0.9) == 3 and live_capacity(2.0, 0.9) == 0
    for cost, max_load in ((0.1, 0.3), (0.07, 0.9), (0.45, 0.9), (0.3, 0.6)):  # whatever the float rounding,
        capacity = live_capacity(cost, max_load)  # the capacity is what admission lets in
        assert capacity is not None and capacity >= 2
        assert admits_live(capacity - 1, cost, max_load) and not admits_live(capacity, cost, max_load)
    assert admits_live(5, None, 0.9) and live_capacity(None, 0.9) is None  # unmeasured: admit
    assert admits_live(0, 2.0, 0.9)  # nothing running: a stale cost must not lock the server out
    assert admits_live(31, 0.3, 0.0)  # load admission off


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
        state = _state(app)
        state.worker.load = KnownCost(0.3, state)

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
    assert health["engine_utilization"] == pytest.approx(0.9) and health["max_load"] == 0.9
    metrics = result["metrics"]
    assert _gauge(metrics, "voxtral_live_stream_capacity") == 3
    assert _gauge(metrics, "voxtral_stream_cost") == 0.3
    assert _gauge(metrics, "voxtral_engine_utilization") == pytest.approx(0.9)
    assert _gauge(metrics, "voxtral_live_streams") == 3


def test_with_load_admission_off_live_streams_are_admitted_up_to_max_streams(tiny_short):
    app = create_app(tiny_short, model_name="tiny", max_streams=4, limits=ServerLimits(max_load=0))
    with serve_in_thread(app) as base:
        state = _state(app)
        state.worker.load = KnownCost(0.3, state)

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
        result = asyncio.run(transcribe_over_websocket(base, speechlike(1.0, seed=61)))
        measured = client.get("/health").json()
    assert fresh["stream_cost"] is None and fresh["live_stream_capacity"] is None
    assert fresh["engine_utilization"] == 0.0 and fresh["max_load"] == 0.9
    assert result.errors == [] and result.done is not None
    assert measured["stream_cost"] > 0 and 0 < measured["engine_utilization"] <= 1
    assert 0 <= measured["live_stream_capacity"] <= 4


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
