"""Admission of live streams by the engine's measured load (docs/architecture.md, "The server").

Live streams keep up while one batched step over all of them fits in 80 ms.  The worker records every engine
run's time, batched steps and streams; fitting step time against batch size gives what one more stream adds
(on a device that batches well, far less than the average), so admission is the same on any device.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

#: seconds over which measurements weigh (a time constant: a run this long ago counts 1/e as much as one now)
LOAD_TIME_CONSTANT = 5.0
#: batch sizes must vary at least this much (variance, in streams squared) for a slope to be fitted
MIN_BATCH_VARIANCE = 0.05
#: a predicted load this close above the limit is at it (the fit's rounding must not turn 3 x 0.3 into 0.9000001)
ROUNDING = 1e-9


class EngineLoad:
    """The engine's measured load (written by the worker thread, read on the event loop).

    ``step_seconds``: the audio one step covers (80 ms), the time a batched step must fit in."""

    def __init__(self, step_seconds: float = 0.08, time_constant: float = LOAD_TIME_CONSTANT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.step_seconds = step_seconds
        self.time_constant = time_constant
        self._clock = clock
        self._started = clock()
        self._updated = self._started
        self._busy = 0.0  # weighted engine seconds, as of _updated
        # weighted sums over decoder steps of 1, streams, streams^2, seconds, streams * seconds
        self._sums = [0.0] * 5
        self._lock = threading.Lock()

    def record(self, busy_seconds: float, steps: int = 0, streams: int = 0) -> None:
        """One engine run: ``busy_seconds`` long, ``steps`` batched decoder steps over ``streams`` streams in all."""
        with self._lock:
            now = self._clock()
            decay = math.exp(-(now - self._updated) / self.time_constant)
            self._updated = now
            self._busy = self._busy * decay + busy_seconds
            self._sums = [s * decay for s in self._sums]
            if steps:
                batch, seconds = streams / steps, busy_seconds / steps
                for i, value in enumerate((1.0, batch, batch * batch, seconds, batch * seconds)):
                    self._sums[i] += steps * value

    def utilization(self) -> float:
        """Engine busy time over wall time, recently: 0 for an idle engine, decaying while it rests."""
        with self._lock:
            now = self._clock()
            busy = self._busy * math.exp(-(now - self._updated) / self.time_constant)
            # the weight of the wall time observed so far: a server that has just started is not averaged
            # with time before it existed
            wall = self.time_constant * -math.expm1(-(now - self._started) / self.time_constant)
        return min(1.0, busy / wall) if wall > 0 else 0.0

    def step_model(self) -> tuple[float, float] | None:
        """(overhead, per stream) seconds of a batched step, fitted; None until batch sizes have varied."""
        with self._lock:
            weight, batch, batch2, seconds, batch_seconds = self._sums
        if weight <= 0:
            return None
        mean_batch, mean_seconds = batch / weight, seconds / weight
        variance = batch2 / weight - mean_batch ** 2
        if variance < MIN_BATCH_VARIANCE:
            return None
        per_stream = (batch_seconds / weight - mean_batch * mean_seconds) / variance
        overhead = mean_seconds - per_stream * mean_batch
        if overhead < 0:  # dearer than linear, or noise: the cost in proportion to the streams, the cautious line
            return 0.0, mean_seconds / mean_batch
        if per_stream < 0:  # noise around a flat line
            return mean_seconds, 0.0
        return overhead, per_stream

    def stream_cost(self) -> float | None:
        """What one more stream adds to the load (a fraction of real time); None until fitted."""
        model = self.step_model()
        return None if model is None else model[1] / self.step_seconds

    def load_with(self, streams: int) -> float | None:
        """The predicted load of ``streams`` streams in real time: a batched step over all of them every 80 ms,
        as a fraction of the engine's time; None until fitted."""
        model = self.step_model()
        return None if model is None else (model[0] + model[1] * streams) / self.step_seconds

    def capacity(self, max_load: float, limit: int) -> int | None:
        """Streams that fit in real time within ``max_load``, at most ``limit``; None until fitted."""
        if self.step_model() is None:
            return None
        streams = 0
        while streams < limit and self.fits(streams + 1, max_load):
            streams += 1
        return streams

    def fits(self, streams: int, max_load: float) -> bool:
        predicted = self.load_with(streams)
        return predicted is not None and predicted <= max_load + ROUNDING

    def admits(self, streams: int, live_streams: int, max_load: float) -> bool:
        """Whether one more live stream, beside ``streams`` streams in the engine of which ``live_streams`` are
        live, keeps the load within ``max_load`` (0: load admission off)."""
        # with no live stream, a refusal would rest on a measurement that nothing could update
        if max_load <= 0 or live_streams == 0:
            return True
        if self.step_model() is None:  # the engine has room now, and the stream makes the batch sizes that measure it
            return self.utilization() < max_load
        return self.fits(streams + 1, max_load)
