"""The streaming protocol (REFERENCE 6): audio in piece by piece, one token out per 80 ms step.

Offline transcription is this same session fed the whole file, so the two agree by construction:

* the decoder sees ``[BOS] + [STREAMING_PAD] * (left_pad + delay)`` while the audio starts with ``left_pad``
  steps of silence; at every position the input is ``embedding(token) + audio_embedding``;
* after the prompt each new 80 ms of audio allows one greedy step whose output token is fed back, whatever it is;
* :meth:`StreamingSession.finish` appends silence (alignment to a whole step, then delay + 11 steps) so the last
  words come out; like the reference, the final audio embedding is not consumed;
* EOS ends the transcription, as in the reference.  A live, always-on stream can instead go on after EOS
  (``continue_after_eos``): the model may say EOS in a long silence, and the words after it must not be lost.
  The session then starts a fresh segment (new prompt, empty caches) at the step after the EOS, replaying the
  audio it already holds from there.

Each generated token belongs to the 80 ms of input audio starting at ``step * 80 ms`` (steps count from the
start of the input, across segments); the session groups tokens into timed words and, for live use, records how
long after its audio arrived each word was decided.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import TYPE_CHECKING

import numpy as np
import torch

from .model import StreamState
from .transcription import Transcription, WordBuilder

if TYPE_CHECKING:
    from .api import Model

#: Encoder frames per transformer call: bounds attention memory when a long file is fed at once.
ENCODER_CHUNK_FRAMES = 256


class StreamingSession:
    """One live transcription.  Create with :meth:`Model.stream`; call :meth:`feed` with float32 16 kHz mono
    samples as they arrive, then :meth:`finish`.  Both return the text decided by the audio they brought."""

    def __init__(self, model: Model, *, delay_ms: int | None = None, track_latency: bool = True,
                 continue_after_eos: bool = False) -> None:
        self.model = model
        audio, tok = model.config.audio, model.tokenizer
        self.delay_tokens = audio.delay_tokens(delay_ms)
        self.delay_ms = round(self.delay_tokens * audio.token_ms)
        self.prompt = [tok.bos_id] + [tok.streaming_pad_id] * (audio.n_left_pad_tokens + self.delay_tokens)
        self.ffn_scales = model.ffn_scales(self.delay_tokens)
        self.continue_after_eos = continue_after_eos
        self.tokens: list[int] = []
        self.samples_fed = 0
        self.finished = False
        #: wall-clock seconds spent inside feed()/finish(): compute / audio duration is the real-time factor
        self.compute_seconds = 0.0
        self._step = audio.samples_per_token
        self._text = tok.text_stream()
        self._text_parts: list[str] = []
        self._ended_by_eos = False
        self._words = WordBuilder(audio.token_ms / 1000, tok.streaming_word_id)
        # (real samples received after a feed() call, wall time of that call), for per-word latency
        self._track_latency = track_latency
        self._arrivals: list[tuple[int, float]] = []
        # the most recent input, so a segment restarted after EOS can replay what it already received
        self._recent = torch.zeros(0)
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
        if self.finished:
            raise RuntimeError("feed() after finish(): start a new session with Model.stream()")
        started = time.perf_counter()
        samples = torch.as_tensor(np.asarray(pcm, dtype=np.float32) if not torch.is_tensor(pcm) else pcm)
        samples = samples.reshape(-1).float()
        self.samples_fed += samples.shape[0]
        if self._track_latency:
            self._arrivals.append((self.samples_fed, started))
        if self.continue_after_eos:
            keep = (self.delay_tokens + 2) * self._step + samples.shape[0]
            self._recent = torch.cat([self._recent, samples])[-keep:]
        text = ""
        if not self._ended_by_eos:
            self._push_samples(samples)
            text = self._decode(keep_last=0)
        self.compute_seconds += time.perf_counter() - started
        return text

    def finish(self) -> str:
        """End of audio: flush with the protocol's right padding; return the remaining text."""
        if self.finished:
            return ""
        started = time.perf_counter()
        self.finished = True
        audio = self.model.config.audio
        text = ""
        while not self._ended_by_eos:
            segment_samples = self.samples_fed - self._segment_start
            right = (-segment_samples) % self._step + audio.n_right_pad_tokens(self.delay_tokens) * self._step
            self._push_samples(torch.zeros(right))
            total = audio.n_left_pad_tokens * self._step + segment_samples + right
            self._embed(self.model.network.mel.flush(self.state.mel, total // audio.hop_length))
            text += self._decode_segment(keep_last=1)
            if self._restart_at is None or self._restart_at >= self.samples_fed:
                break  # no EOS, or an EOS in the closing silence: the audio is all transcribed
            self._restart()
        text += self._emit(self._text.flush())
        self._words.finish(self.duration)
        self.compute_seconds += time.perf_counter() - started
        return text

    # -- internals -------------------------------------------------------------------------------------------

    def _start_segment(self, first_sample: int) -> None:
        """Fresh prompt and caches, with input sample ``first_sample`` (a step boundary) as the segment's start."""
        network, audio = self.model.network, self.model.config.audio
        self.state: StreamState = network.new_state(1, encoder_chunk=ENCODER_CHUNK_FRAMES,
                                                    decoder_chunk=len(self.prompt))
        self._segment_start = first_sample
        self._segment_tokens = 0
        self._position = 0
        self._embeddings: list[torch.Tensor] = []  # audio embeddings [1, k, dim] not yet consumed
        self._restart_at: int | None = None
        self._push_samples(torch.zeros(audio.n_left_pad_tokens * self._step))

    def _push_samples(self, samples: torch.Tensor) -> None:
        network = self.model.network
        self._embed(network.mel.push(self.state.mel, samples.to(network.device)))

    def _embed(self, mel: torch.Tensor) -> None:
        if mel.shape[-1]:
            emb = self.model.network.embed_audio(self.state, mel)
            if emb.shape[1]:
                self._embeddings.append(emb)

    def _decode(self, keep_last: int) -> str:
        text = self._decode_segment(keep_last)
        while self._restart_at is not None:  # EOS in an always-on stream: go on from the next step
            self._restart()
            text += self._decode_segment(keep_last)
        return text

    def _restart(self) -> None:
        """New segment from the step after the EOS, fed the input it already received from there on."""
        start = self._restart_at
        assert start is not None
        self._start_segment(first_sample=start)
        held = max(0, self.samples_fed - start)
        self._push_samples(self._recent[len(self._recent) - held:] if held else self._recent[:0])

    @torch.no_grad()
    def _decode_segment(self, keep_last: int) -> str:
        """Run the decoder over the pending audio embeddings, leaving ``keep_last`` of them unconsumed."""
        if not self._embeddings:
            return ""
        pending = torch.cat(self._embeddings, dim=1)
        usable = pending.shape[1] - keep_last
        start = 0
        text: list[str] = []
        if self._position == 0:
            if usable < len(self.prompt):
                self._embeddings = [pending]
                return ""
            start = len(self.prompt)
            text.append(self._run(self.prompt, pending[:, :start]))
        while start < usable and not self._segment_over:
            text.append(self._run([self.tokens[-1]], pending[:, start:start + 1]))
            start += 1
        self._embeddings = [pending[:, start:]] if start < pending.shape[1] and not self._segment_over else []
        return "".join(text)

    @property
    def _segment_over(self) -> bool:
        return self._ended_by_eos or self._restart_at is not None

    def _run(self, tokens: list[int], audio: torch.Tensor) -> str:
        """One decoder call (the prompt, or one step) and the greedy token it decides."""
        network, tokenizer = self.model.network, self.model.tokenizer
        device = network.device
        ids = torch.tensor([tokens], device=device)
        positions = torch.arange(self._position, self._position + len(tokens), device=device)[None]
        logits = network.decoder(ids, audio, positions, self.state.decoder_cache, self.ffn_scales)
        self._position += len(tokens)
        token = int(logits.argmax(dim=-1).item())
        step = self._segment_start // self._step + self._segment_tokens
        self._segment_tokens += 1
        self.tokens.append(token)
        if token == tokenizer.eos_id:
            if self.continue_after_eos:
                self._restart_at = (step + 1) * self._step
            else:
                self._ended_by_eos = True
        piece = None if tokenizer.is_special(token) else tokenizer.token_bytes(token)
        latency = self._latency(step)
        self._words.push(step, token, piece, latency if piece else None)
        return self._emit(self._text.push(token))

    def _latency(self, step: int) -> float | None:
        """Seconds since the audio that let step ``step`` be decided (its 80 ms plus the delay) arrived."""
        if not self._track_latency:
            return None
        needed = min((step + self.delay_tokens + 1) * self._step, self.samples_fed)
        index = bisect_left(self._arrivals, needed, key=lambda entry: entry[0])
        del self._arrivals[:max(0, index - 1)]  # later steps need later audio: keep the list short
        arrived = self._arrivals[min(1, index)][1] if self._arrivals else time.perf_counter()
        return time.perf_counter() - arrived

    def _emit(self, text: str) -> str:
        if text:
            self._text_parts.append(text)
        return text
