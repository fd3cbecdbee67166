"""A streaming session: audio in piece by piece, one token out per 80 ms step (docs/architecture.md, "The streaming
protocol"); offline transcription is this same session fed the whole file, so the two agree by construction.

The session keeps the protocol's bookkeeping (:mod:`.protocol`) and groups tokens into timed words (token k
belongs to the input audio from ``k * 80 ms``, counted across segments); the computation runs in a slot of an
engine (:class:`SessionEngine`), private or shared (:meth:`Model.engine`).  An always-on stream
(``continue_after_eos``) goes on after an EOS with a fresh segment, so that speech after a long silence is kept.
"""

from __future__ import annotations

import contextlib
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

from .config import ModelConfig
from .engine import Slot, SlotClient
from .protocol import closing_silence, prompt_ids
from .tokenizer import Tokenizer
from .transcription import Transcription, WordBuilder


class SessionEngine(Protocol):
    """What a session needs of an engine: :class:`.engine.Engine` (batched, torch) and the browser export's
    :class:`.browser.runner.OnnxEngine` (one stream, onnxruntime) both provide it."""

    def attach(self, client: SlotClient) -> Slot:
        """A slot for a new stream; :meth:`reset` it before use."""

    def release(self, slot: Slot) -> None:
        """Give the slot back."""

    def reset(self, slot: Slot, prompt: list[int], delay_tokens: int) -> None:
        """Start the slot over with ``prompt``; the protocol's left padding is pushed already."""

    def push(self, slot: Slot, samples: np.ndarray) -> None:
        """Queue float32 samples for the slot, without computing anything."""

    def end(self, slot: Slot) -> None:
        """No more audio for the slot (its closing silence is pushed): decode what the audio allows."""

    def has_work(self, slot: Slot) -> bool:
        """Whether :meth:`run` would still compute something for the slot."""

    def run(self) -> None:
        """Do all the work the pushed audio allows; tokens go to the slots' clients."""


class SessionModel(Protocol):
    """What a session needs of a model: :class:`.api.Model` and the browser export's runner provide it."""

    @property
    def config(self) -> ModelConfig: ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    def engine_for_session(self) -> SessionEngine: ...


class StreamingSession:
    """One live transcription.  Create with :meth:`Model.stream`; call :meth:`feed` with float32 16 kHz mono
    samples as they arrive, then :meth:`finish`.  Both return the text decided by the audio they brought.

    Sessions sharing an engine may instead :meth:`push` audio, let one :meth:`Engine.run` serve them all, and
    collect their new text with :meth:`take_text`.
    """

    def __init__(self, model: SessionModel, *, delay_ms: int | None = None, track_latency: bool = True,
                 continue_after_eos: bool = False, engine: SessionEngine | None = None) -> None:
        self.model = model
        audio, tok = model.config.audio, model.tokenizer
        self.delay_tokens = audio.delay_tokens(delay_ms)
        self.delay_ms = round(self.delay_tokens * audio.token_ms)
        self.prompt = prompt_ids(tok, audio, self.delay_tokens)
        self.continue_after_eos = continue_after_eos
        self.tokens: list[int] = []
        #: per token of :attr:`tokens`: (its log-probability, that of ``[STREAMING_PAD]``) at its step, as the
        #: engine scored them (None from an engine that gives no scores)
        self.token_scores: list[tuple[float, float] | None] = []
        self.samples_fed = 0
        self.finished = False
        #: wall-clock seconds spent inside feed()/finish(): compute / audio duration is the real-time factor
        self.compute_seconds = 0.0
        self._step = audio.samples_per_token
        self._text = tok.text_stream()
        self._text_parts: list[str] = []
        self._unread: list[str] = []
        self._ended_by_eos = False
        self._words = WordBuilder(audio.token_ms / 1000, tok.streaming_word_id)
        # (real samples received after a feed() call, wall time of that call), for per-word latency
        self._track_latency = track_latency
        self._arrivals: list[tuple[int, float]] = []
        # the most recent input, so a segment restarted after EOS can replay what it already received
        self._recent = np.zeros(0, np.float32)
        self._progress: Callable[[float], None] | None = None  # feed_all's
        self._progress_steps = max(1, round(1000 / audio.token_ms))
        self.engine = engine if engine is not None else model.engine_for_session()
        self._slot: Slot | None = self.engine.attach(self)
        self._start_segment(first_sample=0)

    # -- public ------------------------------------------------------------------------------------------

    @property
    def text(self) -> str:
        return "".join(self._text_parts)

    @property
    def duration(self) -> float:
        """Seconds of audio fed so far."""
        return self.samples_fed / self.model.config.audio.sample_rate

    @property
    def transcription(self) -> Transcription:
        """The transcription so far."""
        return Transcription(text=self.text, tokens=list(self.tokens), delay_ms=self.delay_ms,
                             duration=self.duration, words=list(self._words.words))

    @property
    def real_time_factor(self) -> float:
        """Compute time over audio time so far (below 1: faster than real time)."""
        return self.compute_seconds / self.duration if self.samples_fed else 0.0

    def feed(self, pcm: np.ndarray | torch.Tensor) -> str:
        """Add float32 16 kHz mono samples (any number); run every step they allow; return the new text."""
        started = time.perf_counter()
        self.push(pcm)
        self._run()
        self.compute_seconds += time.perf_counter() - started
        return self.take_text()

    def push(self, pcm: np.ndarray | torch.Tensor) -> None:
        """Add samples without running the network (an engine shared by many sessions runs them all at once).

        An always-on stream whose model said EOS in the last run starts its next segment here (:meth:`feed`
        does so right after the run)."""
        if self.finished:
            raise RuntimeError("feed() after finish(): start a new session with Model.stream()")
        samples = (pcm.detach().cpu().numpy() if torch.is_tensor(pcm) else np.asarray(pcm))
        samples = samples.reshape(-1).astype(np.float32, copy=False)
        self._restart_if_needed()
        self.samples_fed += samples.shape[0]
        if self._track_latency:
            self._arrivals.append((self.samples_fed, time.perf_counter()))
        if self.continue_after_eos:
            # an EOS can only come at a step not decided yet, however far the engine lags behind the pushes: keep
            # the audio from there on, to replay after it
            undecided = self._segment_start + self._segment_tokens * self._step
            joined = np.concatenate([self._recent, samples])
            self._recent = joined[max(0, len(joined) - (self.samples_fed - undecided)):]
        if not self._ended_by_eos and self._restart_at is None:
            self.engine.push(self._live_slot, samples)

    def feed_all(self, pcm: np.ndarray, *, piece: int, progress: Callable[[float], None] | None = None) -> str:
        """A whole recording, then :meth:`finish`: pushed ``piece`` samples at a time, each piece run before the
        next, the last one together with the closing padding, so that the encoder takes the audio in the fewest
        and largest calls (on CUDA a call costs about the same whatever its size: docs/performance.md).
        ``progress(seconds)`` is told the audio decided so far, about once per second of it.  Returns the text."""
        self._progress = progress
        texts = []
        try:
            for start in range(0, len(pcm), piece):
                if start + piece < len(pcm):
                    texts.append(self.feed(pcm[start:start + piece]))
                else:
                    self.push(pcm[start:])
            return "".join(texts) + self.finish()
        finally:
            self._progress = None

    def take_text(self) -> str:
        """The text decided since the last call (or feed/finish)."""
        text = "".join(self._unread)
        self._unread.clear()
        return text

    def finish(self) -> str:
        """End of audio: flush with the protocol's right padding; return the remaining text."""
        if self.finished:
            return ""
        started = time.perf_counter()
        self.end_input()
        self.engine.run()
        while not self.complete():
            self.engine.run()
        self.compute_seconds += time.perf_counter() - started
        return self.take_text()

    def end_input(self) -> None:
        """No more audio: queue the right padding that brings out the last words, without running the network.

        With a shared engine, sessions ending together end their input, share the engine runs, and each calls
        :meth:`complete` after every run until it returns True (:meth:`finish` does all of it for one session)."""
        if self.finished:
            return
        self.finished = True
        self._queue_closing()

    def complete(self) -> bool:
        """After :meth:`end_input` and an engine run: finish the transcription (the last text then waits in
        :meth:`take_text`) and give the engine slot back, or return False if the stream needs another run (its
        closing audio is not all computed yet, or an always-on stream said EOS before the end and goes on with a
        new segment)."""
        if self._slot is None:
            return True
        if not self.finished:
            raise RuntimeError("complete() before end_input()")
        if self.engine.has_work(self._slot):
            return False
        if self._restart_at is not None and self._restart_at < self.samples_fed:
            self._queue_closing()  # an EOS before the end of the audio: the rest is transcribed as a new segment
            return False
        self._emit(self._text.flush())
        self._words.finish(self.duration)
        self.close()
        return True
    def close(self) -> None:
        """Give the engine slot back (done by :meth:`finish`; call it to abandon a stream early)."""
        if self._slot is not None:
            self.engine.release(self._slot)
            self._slot = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown anything may be gone already
            self.close()

    # -- engine callback -----------------------------------------------------------------------------------

    def on_token(self, slot: Slot, token: int) -> bool:
        tokenizer = self.model.tokenizer
        step = self._segment_start // self._step + self._segment_tokens
        self._segment_tokens += 1
        self.tokens.append(token)
        self.token_scores.append(slot.scores)
        keep_going = True
        if token == tokenizer.eos_id:
            keep_going = False
            if self.continue_after_eos:
                self._restart_at = (step + 1) * self._step
            else:
                self._ended_by_eos = True
        if self._progress is not None and (step + 1) % self._progress_steps == 0:
            self._progress(min((step + 1) * self._step / self.model.config.audio.sample_rate, self.duration))
        piece = None if tokenizer.is_special(token) else tokenizer.token_bytes(token)
        latency = self._latency(step)
        self._words.push(step, token, piece, latency if piece else None, self.duration)
        self._emit(self._text.push(token))
        return keep_going

    # -- internals -------------------------------------------------------------------------------------------

    @property
    def _live_slot(self) -> Slot:
        if self._slot is None:
            raise RuntimeError("this session is closed")
        return self._slot

    def _start_segment(self, first_sample: int) -> None:
        """Fresh prompt and caches, with input sample ``first_sample`` (a step boundary) as the segment's start."""
        self.engine.reset(self._live_slot, self.prompt, self.delay_tokens)
        self._segment_start = first_sample
        self._segment_tokens = 0
        self._restart_at: int | None = None

    def _queue_closing(self) -> None:
        """Push the right padding of the current segment (a new one first if an EOS called for it)."""
        if self._ended_by_eos:
            return
        self._restart_if_needed()
        closing = closing_silence(self.model.config.audio, self.delay_tokens, self.samples_fed - self._segment_start)
        self.engine.push(self._live_slot, closing)
        self.engine.end(self._live_slot)

    def _run(self) -> None:
        self.engine.run()
        while self._restart_if_needed():  # EOS in an always-on stream: go on from the next step
            self.engine.run()

    def _restart_if_needed(self) -> bool:
        """After an EOS in an always-on stream: a new segment from the step after it, fed the input it already
        received from there on."""
        start = self._restart_at
        if start is None:
            return False
        self._start_segment(first_sample=start)
        held = max(0, self.samples_fed - start)
        if held:
            self.engine.push(self._live_slot, self._recent[len(self._recent) - held:])
        return True

    def _latency(self, step: int) -> float | None:
        """Seconds since the audio that let step ``step`` be decided (its 80 ms plus the delay) arrived."""
        if not self._track_latency:
            return None
        needed = min((step + self.delay_tokens + 1) * self._step, self.samples_fed)
        index = bisect_left(self._arrivals, needed, key=lambda entry: entry[0])
        del self._arrivals[:max(0, index - 1)]  # later steps need later audio: keep the list short
        arrived = self._arrivals[min(1, index)][1] if self._arrivals else time.perf_counter()
        return time.perf_counter() - arrived

    def _emit(self, text: str) -> None:
        if text:
            self._text_parts.append(text)
            self._unread.append(text)
