"""One thread that owns the batched :class:`~.engine.Engine` and serves every stream of the server with it.

The engine is not thread-safe, and its whole point is that one ``run()`` computes all streams together.  So a
single worker thread owns it: the asyncio side only sends commands (open a stream, append audio, finish,
abandon) through a queue, and the worker hands each stream's new text and words back to the event loop with one
``loop.call_soon_threadsafe`` per round, whatever the number of streams.

Each round the worker hands every stream with waiting audio a share of :data:`ROUND_STEP_BUDGET` 80 ms steps
(one each when many streams are busy) and runs the engine once, so the streams advance together in batched
encoder calls and decoder steps.  A client sending faster than real time (or a file upload) therefore advances
as fast as the compute allows, while the live streams get a round every few decoder steps instead of waiting
behind one long ``run()`` over a whole file.  Nothing here waits on a client: a slow reader only makes its own outbox grow (and
the server coalesces that).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..writers import milliseconds
from .load import EngineLoad

if TYPE_CHECKING:
    from ..api import Model
    from ..engine import Engine
    from ..streaming import StreamingSession
    from ..transcription import Transcription, Word

log = logging.getLogger(__name__)

#: Audio steps (80 ms each) handed out per round, shared among the streams that have audio waiting, at least one
#: each.  With many streams every one gets one step, so a round is one batched encoder call and one batched
#: decoder step over all of them; a stream given several steps is encoded by itself and decoded in steps the
#: others do not share, which would only make the next round later for everyone.  With few streams (a lone
#: upload) larger pieces save the per-round overhead; a round then still holds at most this many decoder steps.
ROUND_STEP_BUDGET = 16
#: Decoder calls per round at most: streams that end push their closing silence (the delay + 11 steps) at once,
#: and live streams must not wait for all of it; what is left is computed in the next rounds.
ROUND_DECODER_CALLS = 2

_NO_SAMPLES = np.zeros(0, np.float32)


@dataclass(frozen=True)
class StreamOptions:
    delay_ms: int | None = None
    #: go on with a fresh segment after an EOS (a live microphone) instead of ending there (a file)
    continue_after_eos: bool = False
    #: report words (with times and latency) as they are completed
    word_timestamps: bool = False


@dataclass(frozen=True)
class StreamUsage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class StreamUpdate:
    """What happened to one stream during one round (delivered on the event loop)."""

    text: str = ""
    #: words completed this round, as JSON-ready dicts (word, start, end, latency)
    words: list[dict[str, Any]] = field(default_factory=list)
    #: samples of appended audio whose tokens the model decided this round: audio counts as queued (the sender's
    #: back-pressure, the queue metric) until then, not merely until it is handed to the engine, which takes
    #: many steps a round but decodes few
    decided_samples: int = 0
    #: set once, when the stream has finished: its whole transcription
    result: Transcription | None = None
    #: with the result: per token, (its log-probability, that of [STREAMING_PAD]) at its step
    token_scores: list[tuple[float, float] | None] = field(default_factory=list)
    usage: StreamUsage | None = None
    #: the stream failed and was dropped (a bug, reported to its client as ``processing_error``)
    error: str | None = None
    #: the stream's engine slot is free again (after a result, an error or an abandon)
    released: bool = False


class StreamListener(Protocol):
    def on_update(self, update: StreamUpdate) -> None:
        """Called on the event loop's thread."""


def word_dict(word: Word) -> dict[str, Any]:
    """A word as the server sends it (OpenAI's verbose_json word keys, plus our latency)."""
    latency = None if word.latency is None else round(word.latency, 4)
    # times in whole milliseconds rounded as our subtitle writers round them (round(x, 3) can differ by one
    # on a half millisecond, e.g. an end clamped to 70744 samples = 4.4215 s)
    return {"word": word.text, "start": milliseconds(word.start) / 1000, "end": milliseconds(word.end) / 1000,
            "latency": latency}


@dataclass
class WorkerStats:
    """Running totals (written by the worker thread, read by anyone: bench/server_load.py)."""

    engine_seconds: float = 0.0
    audio_seconds: float = 0.0
    decode_steps: int = 0
    #: called by the worker after each engine run with (run seconds, decoder steps, seconds of audio pushed)
    on_run: Callable[[float, int, float], None] | None = None


# -- commands (asyncio side -> worker) -------------------------------------------------------------------------


@dataclass
class _Open:
    stream_id: int
    listener: StreamListener
    options: StreamOptions


@dataclass
class _Append:
    stream_id: int
    samples: np.ndarray


@dataclass
class _Finish:
    stream_id: int


@dataclass
class _Abandon:
    stream_id: int


class _Stop:
    pass


@dataclass
class _Stream:
    """The worker's record of one stream."""

    listener: StreamListener
    options: StreamOptions
    session: StreamingSession
    pending: deque[np.ndarray] = field(default_factory=deque)
    pending_samples: int = 0
    final_requested: bool = False
    #: its input has ended (``end_input()``): its closing silence is computed with the others' rounds
    ending: bool = False
    tokens_seen: int = 0
    words_sent: int = 0
    #: samples appended, and of those the ones whose tokens were reported decided
    received: int = 0
    decided: int = 0
    # produced since the last publish
    text: list[str] = field(default_factory=list)


class EngineWorker:
    """Runs ``model.engine(max_streams)`` on its own thread for streams opened from an asyncio event loop.

    Methods other than :meth:`start` / :meth:`stop` are called from the event loop and never block.  Opening
    more streams than ``max_streams`` is the caller's job to prevent (the server counts its slots); the worker
    reports a failed open as an error update.
    """

    def __init__(self, model: Model, *, max_streams: int, decoder_context: int | None = None,
                 stats: WorkerStats | None = None, load: EngineLoad | None = None) -> None:
        self.model = model
        self.max_streams = max_streams
        self.decoder_context = decoder_context
        self.stats = stats or WorkerStats()
        #: every engine run's time, steps and streams (the server admits live streams by it)
        self.load = load or EngineLoad(model.config.audio.samples_per_token / model.config.audio.sample_rate)
        self.engine: Engine | None = None
        #: set if the thread died of an unexpected error (the server then reports itself unhealthy)
        self.failure: BaseException | None = None
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._streams: dict[int, _Stream] = {}
        self._next_id = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._outgoing: list[tuple[StreamListener, StreamUpdate]] = []
        self._resumed = False  # a stream restarted after EOS last round: its replayed audio needs a run
        self._step_samples = model.config.audio.samples_per_token
        self._sample_rate = model.config.audio.sample_rate

    # -- lifecycle (event loop side) --------------------------------------------------------------------------

    def prepare(self) -> None:
        """Build the engine (slow on a GPU: its caches are allocated and its CUDA graphs captured now, so that no
        stream pays for that later).  Call before :meth:`start`, from any thread."""
        self.engine = self.model.engine(self.max_streams, decoder_context=self.decoder_context)
        self.engine.capture_graphs()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the thread; its updates are delivered on ``loop``."""
        if self.engine is None:
            self.prepare()
        self._loop = loop
        self._thread = threading.Thread(target=self._main, name="voxtral-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is None:
            return
        self._commands.put(_Stop())
        self._thread.join(timeout)
        self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.failure is None

    @property
    def free_slots(self) -> int:
        """The engine's free rows (read without locking: a snapshot for metrics and tests)."""
        return self.engine.free_slots if self.engine is not None else 0

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    @property
    def pending_commands(self) -> int:
        return self._commands.qsize()

    # -- commands (event loop side) ---------------------------------------------------------------------------

    def open(self, listener: StreamListener, options: StreamOptions) -> int:
        self._next_id += 1
        self._commands.put(_Open(self._next_id, listener, options))
        return self._next_id

    def append(self, stream_id: int, samples: np.ndarray) -> None:
        self._commands.put(_Append(stream_id, samples))

    def finish(self, stream_id: int) -> None:
        self._commands.put(_Finish(stream_id))

    def abandon(self, stream_id: int) -> None:
        self._commands.put(_Abandon(stream_id))

    # -- the thread -------------------------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            while self._apply_commands(block=not self._has_work()):
                self._round()
        except BaseException as exc:
            log.exception("engine worker failed")
            self.failure = exc
            for stream_id in list(self._streams):
                self._drop(stream_id, error=f"engine worker failed: {exc}")
            self._publish()
        finally:
            for stream in self._streams.values():
                stream.session.close()
            self._streams.clear()

    def _has_work(self) -> bool:
        return self._resumed or any(s.pending_samples or s.final_requested for s in self._streams.values()) or \
            (self.engine is not None and self.engine.has_work())

    def _apply_commands(self, block: bool) -> bool:
        """Apply every queued command (waiting for one when there is nothing else to do); False on stop."""
        while True:
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if isinstance(command, _Stop):
                return False
            self._apply(command)

    def _apply(self, command: Any) -> None:
        if isinstance(command, _Open):
            self._open(command)
            return
        stream = self._streams.get(command.stream_id)
        if stream is None:  # already finished or dropped: a late append or abandon is harmless
            return
        if isinstance(command, _Append):
            if not stream.final_requested:
                stream.pending.append(command.samples)
                stream.pending_samples += len(command.samples)
                stream.received += len(command.samples)
        elif isinstance(command, _Finish):
            stream.final_requested = True
        elif isinstance(command, _Abandon):
            self._drop(command.stream_id, error=None)

    def _open(self, command: _Open) -> None:
        options = command.options
        try:
            session = self.model.stream(delay_ms=options.delay_ms, continue_after_eos=options.continue_after_eos,
                                        engine=self.engine)
        except Exception as exc:  # noqa: BLE001 - a full engine or a bad option: that stream fails, not the server
            self._post(command.listener, StreamUpdate(error=str(exc), released=True))
            return
        self._streams[command.stream_id] = _Stream(command.listener, options, session)

    def _round(self) -> None:
        pushed = self._push_audio()
        ending = self._end_inputs()
        if pushed or ending or self._resumed or (self.engine is not None and self.engine.has_work()):
            self._run_engine(pushed)
        self._resume_after_eos()
        self._complete_ended()
        self._publish()

    def _push_audio(self) -> int:
        """Hand each stream with waiting audio its share of ROUND_STEP_BUDGET; returns the samples pushed."""
        waiting = [(i, s) for i, s in self._streams.items() if s.pending_samples]
        if not waiting:
            return 0
        quantum = max(1, ROUND_STEP_BUDGET // len(waiting)) * self._step_samples
        pushed = 0
        for stream_id, stream in waiting:
            chunk = _take(stream, quantum)
            try:
                stream.session.push(chunk)
            except Exception as exc:  # noqa: BLE001
                self._drop(stream_id, error=f"cannot take audio: {exc}")
                continue
            pushed += len(chunk)
        return pushed

    def _run_engine(self, pushed_samples: int) -> None:
        assert self.engine is not None
        steps_before, rows_before = self.engine.decode_calls, self.engine.decode_rows
        started = time.perf_counter()
        try:
            self.engine.run(max_decoder_calls=ROUND_DECODER_CALLS)
        except Exception as exc:
            log.exception("engine run failed")  # the batch is suspect: every stream in it is dropped
            for stream_id in list(self._streams):
                self._drop(stream_id, error=f"processing failed: {exc}")
            return
        seconds, steps = time.perf_counter() - started, self.engine.decode_calls - steps_before
        self.load.record(seconds, steps, self.engine.decode_rows - rows_before)
        self._account(seconds, steps, pushed_samples / self._sample_rate)

    def _account(self, seconds: float, steps: int, audio_seconds: float) -> None:
        stats = self.stats
        stats.engine_seconds += seconds
        stats.audio_seconds += audio_seconds
        stats.decode_steps += steps
        if stats.on_run is not None:
            stats.on_run(seconds, steps, audio_seconds)

    def _end_inputs(self) -> bool:
        """Streams whose final commit has arrived and whose audio is all in the engine end their input now;
        their closing silence then runs in the same rounds as everybody's audio.  Returns whether any is ending."""
        for stream_id, stream in list(self._streams.items()):
            if stream.final_requested and not stream.pending_samples and not stream.ending:
                try:
                    stream.session.end_input()
                except Exception as exc:  # noqa: BLE001
                    self._drop(stream_id, error=f"processing failed: {exc}")
                    continue
                stream.ending = True
        return any(s.ending for s in self._streams.values())

    def _resume_after_eos(self) -> None:
        """An always-on stream whose model just said EOS starts its next segment now rather than at its next
        append: ``push()`` of no samples does the restart and replays the audio held since the EOS, which the
        next round computes."""
        eos = self.model.tokenizer.eos_id
        self._resumed = False
        for stream_id, stream in list(self._streams.items()):
            tokens = stream.session.tokens
            new_eos = stream.options.continue_after_eos and eos in tokens[stream.tokens_seen:]
            stream.tokens_seen = len(tokens)
            if not new_eos or stream.ending:  # an ending stream's complete() restarts it itself
                continue
            try:
                stream.session.push(_NO_SAMPLES)
            except Exception as exc:  # noqa: BLE001
                self._drop(stream_id, error=f"processing failed: {exc}")
                continue
            self._resumed = True

    def _complete_ended(self) -> None:
        for stream_id, stream in list(self._streams.items()):
            if not stream.ending:
                continue
            session = stream.session
            try:
                if not session.complete():
                    continue
            except Exception as exc:  # noqa: BLE001
                self._drop(stream_id, error=f"processing failed: {exc}")
                continue
            del self._streams[stream_id]
            result = session.transcription
            update = self._collect(stream, words=result.words)
            update.result = result
            update.token_scores = list(session.token_scores)
            update.usage = StreamUsage(prompt_tokens=len(session.prompt), completion_tokens=len(result.tokens))
            update.released = True
            self._post(stream.listener, update)

    def _drop(self, stream_id: int, error: str | None) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return
        stream.session.close()
        self._post(stream.listener, StreamUpdate(error=error, released=True))

    def _publish(self) -> None:
        for stream in self._streams.values():
            update = self._collect(stream, words=None)
            if update.text or update.decided_samples:
                self._post(stream.listener, update)
        self._flush_posts()

    def _collect(self, stream: _Stream, words: list[Word] | None) -> StreamUpdate:
        """The stream's text, words and decided audio since the last publish (token k decides step k's audio).

        ``words``: the stream's whole word list when the caller has it (at the end); otherwise it is read only
        when there is new text, since a word is completed only when a text token arrives (which, but for a UTF-8
        character split over tokens, also produces text): a round stays O(new tokens) per stream.
        """
        session = stream.session
        text = "".join(stream.text) + session.take_text()
        stream.text.clear()
        decided = min(len(session.tokens) * self._step_samples, stream.received)
        update = StreamUpdate(text=text, decided_samples=decided - stream.decided)
        stream.decided = decided
        if stream.options.word_timestamps and (words is not None or text):
            if words is None:
                words = session.transcription.words
            update.words = [word_dict(w) for w in words[stream.words_sent:]]
            stream.words_sent = len(words)
        return update

    # -- hand-off to the event loop: one callback per round --------------------------------------------------

    def _post(self, listener: StreamListener, update: StreamUpdate) -> None:
        self._outgoing.append((listener, update))

    def _flush_posts(self) -> None:
        if not self._outgoing or self._loop is None:
            return
        outgoing, self._outgoing = self._outgoing, []
        try:
            self._loop.call_soon_threadsafe(_deliver, outgoing)
        except RuntimeError:  # the loop is closed (shutdown): nobody is listening any more
            pass


def _deliver(updates: list[tuple[StreamListener, StreamUpdate]]) -> None:
    for listener, update in updates:
        try:
            listener.on_update(update)
        except Exception:
            log.exception("stream listener failed")


def _take(stream: _Stream, limit: int) -> np.ndarray:
    """Up to ``limit`` samples from the front of the stream's waiting audio."""
    pieces: list[np.ndarray] = []
    taken = 0
    while stream.pending and taken < limit:
        piece = stream.pending[0]
        room = limit - taken
        if len(piece) <= room:
            pieces.append(stream.pending.popleft())
            taken += len(piece)
        else:
            pieces.append(piece[:room])
            stream.pending[0] = piece[room:]
            taken += room
    stream.pending_samples -= taken
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
