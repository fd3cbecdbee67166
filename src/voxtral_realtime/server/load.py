"""Admission of live streams by the engine's measured load, the same on any device.

The worker reports, after every round, how long the engine computed and how much audio it decided (summed over
streams).  From those, exponentially weighted over the last few seconds:

- **utilization**: engine busy time over wall time (0 when idle, near 1 when it never rests);
- **cost per stream**: engine seconds per second of one stream's audio.  A live stream brings one second of
  audio per second, so ``n`` live streams need ``n * cost`` of the engine's time.  For streams at real-time pace
  this is the utilization divided by the streams; unlike it, it stays right while a client sends faster than
  real time (the engine is then always busy, yet a live stream would still get its share of every round).

A new live stream is admitted while ``(live streams + 1) * cost <= max_load``.  The cost is the average over the
batch measured, which on a device that batches well overstates what one more stream adds: the estimate errs
toward refusing.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

#: seconds over which measurements weigh (a time constant: a run this long ago counts 1/e as much as one now)
LOAD_TIME_CONSTANT = 5.0


class EngineLoad:
    """The engine's measured load (written by the worker thread, read on the event loop)."""

    def __init__(self, time_constant: float = LOAD_TIME_CONSTANT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.time_constant = time_constant
        self._clock = clock
        self._started = clock()
        self._updated = self._started
        self._busy = 0.0  # weighted engine seconds, as of _updated
        self._audio = 0.0  # weighted seconds of audio decided, as of _updated
        self._lock = threading.Lock()

    def record(self, busy_seconds: float, audio_seconds: float) -> None:
        """One worker round: the engine computed ``busy_seconds`` and decided ``audio_seconds`` of audio."""
        with self._lock:
            now = self._clock()
            decay = math.exp(-(now - self._updated) / self.time_constant)
            self._busy = self._busy * decay + busy_seconds
            self._audio = self._audio * decay + audio_seconds
            self._updated = now

    def utilization(self) -> float:
        """Engine busy time over wall time, recently: 0 for an idle engine, decaying while it rests."""
        with self._lock:
            now = self._clock()
            busy = self._busy * math.exp(-(now - self._updated) / self.time_constant)
            # the weight of the wall time observed so far: a server that has just started is not averaged
            # with time before it existed
            wall = self.time_constant * -math.expm1(-(now - self._started) / self.time_constant)
        return min(1.0, busy / wall) if wall > 0 else 0.0

    def cost_per_stream(self) -> float | None:
        """Engine seconds per second of a stream's audio, recently; None until some audio has been decided."""
        with self._lock:
            return self._busy / self._audio if self._audio > 0 else None


def live_capacity(cost: float | None, max_load: float) -> int | None:
    """Live streams that fit in real time at ``cost`` each; None while unmeasured."""
    if cost is None or cost <= 0:
        return None
    streams = math.floor(max_load / cost)
    # the same arithmetic as admits_live, whatever the rounding of the division
    while (streams + 1) * cost <= max_load:
        streams += 1
    while streams > 0 and streams * cost > max_load:
        streams -= 1
    return streams


def admits_live(live_streams: int, cost: float | None, max_load: float) -> bool:
    """Whether one more live stream keeps the predicted load within ``max_load`` (0: load admission off).

    An unmeasured engine admits (the first rounds measure it), and so does one with no live stream: refusing then
    would rest on a stale measurement that nothing could update, and one stream is the least a server serves."""
    if max_load <= 0 or cost is None or live_streams == 0:
        return True
    return (live_streams + 1) * cost <= max_load
