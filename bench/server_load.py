"""Live captions through the whole server: N WebSocket clients each sending 80 ms of audio every 80 ms.

    python bench/server_load.py --model DIR --clients 50 --seconds 10
    python bench/server_load.py --random-weights --device cuda --clients 128 --seconds 30 --json out.json
    python bench/server_load.py --random-weights --device cpu --clients 16 --seconds 20   # how many a CPU carries

The server runs in this process (uvicorn on a loopback port, its engine worker on its own thread); the clients
run on an asyncio loop in another thread.  Reported: each word's latency as the server measured it (from the
arrival of the audio that let it be decided, the delay included, to the decision), the time from the final
commit to ``transcription.done``, how late the clients' 80 ms sends were (a sign of an overloaded machine,
not of the server), and the server's own metrics (decoder step time, real-time factor).  Clients the server
refuses for load (``busy``: one more would not be computed in real time, ``--max-load``) are counted, with the
live-stream capacity the server estimated and the engine utilization it measured while the most streams ran.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

from voxtral_realtime.benchmarking.signals import speechlike

STEP = 1280  # samples per 80 ms


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


async def client(url: str, audio: np.ndarray, record: dict, start_delay: float) -> None:
    import websockets

    await asyncio.sleep(start_delay)  # users do not all start (and stop) in the same 80 ms

    pcm = np.clip(np.round(audio * 32768), -32768, 32767).astype("<i2").tobytes()
    async with websockets.connect(url, max_size=None, proxy=None) as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "session.update", "model": "", "word_timestamps": True}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))

        async def receive() -> None:
            while True:
                event = json.loads(await ws.recv())
                if event["type"] == "error" and event["code"] == "busy":
                    record["refused"] = True
                    return
                if event["type"] == "transcription.words":
                    # words decided while the audio streams in; those decided by the closing silence after the
                    # final commit are counted in done_after_final instead
                    key = "latencies" if "final_sent" not in record else "closing_latencies"
                    record[key] += [w["latency"] for w in event["words"] if w["latency"] is not None]
                elif event["type"] == "transcription.done":
                    record["done_after_final"] = time.perf_counter() - record["final_sent"]
                    return
                elif event["type"] == "error":
                    record["errors"].append(event["code"])

        reader = asyncio.create_task(receive())
        started = time.perf_counter()
        step_bytes = 2 * STEP  # PCM16: two bytes a sample
        for i, offset in enumerate(range(0, len(pcm), step_bytes)):
            if reader.done():  # refused
                return
            due = started + i * STEP / 16000
            record["send_lag"].append(max(0.0, time.perf_counter() - due))
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            chunk = base64.b64encode(pcm[offset:offset + step_bytes]).decode()
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
        record["final_sent"] = time.perf_counter()
        await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
        await reader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint folder or Hub id")
    source.add_argument("--random-weights", action="store_true", help="the real model's shapes, random values")
    parser.add_argument("--device")
    parser.add_argument("--dtype")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--stagger", type=float, default=2.0, help="clients start at random within this many s")
    parser.add_argument("--decoder-context", type=int, default=None)
    parser.add_argument("--max-load", type=float, default=0.9, help="the server's --max-load (0: admit every client)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch
    import uvicorn

    import voxtral_realtime
    from voxtral_realtime.server import create_app
    from voxtral_realtime.server.state import ServerLimits

    if args.random_weights:
        from voxtral_realtime.api import default_device, resolve_dtype
        from voxtral_realtime.benchmarking.random_weights import random_model

        device = torch.device(args.device) if args.device else default_device()
        model = random_model(device=device, dtype=resolve_dtype(args.dtype, device))
    else:
        model = voxtral_realtime.load(args.model, device=args.device, dtype=args.dtype)
    app = create_app(model, model_name="bench", max_streams=args.clients, decoder_context=args.decoder_context,
                     limits=ServerLimits(max_load=args.max_load))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)

    records = [{"latencies": [], "closing_latencies": [], "send_lag": [], "errors": []} for _ in range(args.clients)]
    start_delays = np.random.default_rng(0).uniform(0, args.stagger, args.clients)
    audio = [speechlike(args.seconds, seed=i) for i in range(args.clients)]

    busiest = {"live_streams": 0}

    async def watch_load() -> None:
        state = app.state.voxtral
        while True:
            if state.pool.in_use["live"] >= busiest["live_streams"]:
                busiest.update(live_streams=state.pool.in_use["live"], live_stream_capacity=state.live_capacity,
                               engine_utilization=round(state.worker.load.utilization(), 3))
            await asyncio.sleep(0.5)

    async def everyone() -> None:
        url = f"ws://127.0.0.1:{port}/v1/realtime"
        watcher = asyncio.create_task(watch_load())
        await asyncio.gather(*(client(url, a, r, d) for a, r, d in zip(audio, records, start_delays)))
        watcher.cancel()

    started = time.perf_counter()
    asyncio.run(everyone())
    wall = time.perf_counter() - started
    stats = app.state.voxtral.worker.stats
    latencies = [x for r in records for x in r["latencies"]]
    finals = [r["done_after_final"] for r in records if "done_after_final" in r]
    lags = [x for r in records for x in r["send_lag"]]
    report = {
        "clients": args.clients, "seconds": args.seconds, "device": str(model.device), "dtype": str(model.dtype),
        "threads": torch.get_num_threads(), "max_load": args.max_load,
        "refused_busy": sum(1 for r in records if r.get("refused")), "at_most_live": busiest,
        "wall_s": round(wall, 2), "words": len(latencies),
        "word_latency_p50_ms": round(1000 * percentile(latencies, 0.5), 1),
        "word_latency_p99_ms": round(1000 * percentile(latencies, 0.99), 1),
        "done_after_final_p50_ms": round(1000 * percentile(finals, 0.5), 1),
        "done_after_final_max_ms": round(1000 * max(finals), 1) if finals else None,
        "client_send_lag_p99_ms": round(1000 * percentile(lags, 0.99), 1),
        "engine_ms_per_decoder_step": round(1000 * stats.engine_seconds / max(1, stats.decode_steps), 2),
        "engine_busy_fraction": round(stats.engine_seconds / wall, 3),
        "real_time_factor": round(stats.engine_seconds / max(1e-9, stats.audio_seconds), 4),
        "errors": sorted({c for r in records for c in r["errors"]}),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), **report}, indent=2) + "\n")
    server.should_exit = True


if __name__ == "__main__":
    main()
