"""The streaming protocol (REFERENCE 6): audio in piece by piece, one token out per 80 ms step.

Offline transcription is this same session fed the whole file, so the two agree by construction:

* the decoder sees ``[BOS] + [STREAMING_PAD] * (left_pad + delay)`` while the audio starts with ``left_pad``
  steps of silence; at every position the input is ``embedding(token) + audio_embedding``;
* after the prompt each new 80 ms of audio allows one greedy step whose output token is fed back, whatever it is;
* :meth:`StreamingSession.finish` appends silence (alignment to a whole step, then delay + 11 steps) so the last
  words come out; like the reference, the final audio embedding is not consumed;
* EOS ends the transcription.

Each generated token ``k`` belongs to the 80 ms of input audio starting at ``k * 80 ms``; the session groups
tokens into timed words and, for live use, records how long after its audio arrived each word was decided.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import TYPE_CHECKING

import numpy as np
import torch

from .transcription import Transcription, WordBuilder

if TYPE_CHECKING:
    from .api import Model

#: Encoder frames per transformer call: bounds attention memory when a long file is fed at once.
ENCODER_CHUNK_FRAMES = 256


class StreamingSession:
    """One live transcription.  Create with :meth:`Model.stream`; call :meth:`feed` with float32 16 kHz mono
    samples as they arrive, then :meth:`finish`.  Both return the text decided by the audio they brought."""

    def __init__(self, model: Model, *, delay_ms: int | None = None, track_latency: bool = True) -> None:
        self.model = model
        network, audio, tok = model.network, model.config.audio, model.tokenizer
        self.delay_tokens = audio.delay_tokens(delay_ms)
        self.delay_ms = round(self.delay_tokens * audio.token_ms)
        self.prompt = [tok.bos_id] + [tok.streaming_pad_id] * (audio.n_left_pad_tokens + self.delay_tokens)
        self.state = network.new_state(1, encoder_chunk=ENCODER_CHUNK_FRAMES, decoder_chunk=len(self.prompt))
        self.ffn_scales = model.ffn_scales(self.delay_tokens)
        self.tokens: list[int] = []
        self.samples_fed = 0
        self.finished = False
        self._text = tok.text_stream()
        self._text_parts: list[str] = []
        self._position = 0
        self._embeddings: list[torch.Tensor] = []  # audio embeddings [1, k, dim] not yet consumed
        self._ended_by_eos = False
        self._words = WordBuilder(audio.token_ms / 1000, tok.streaming_word_id)
        # (real samples received after a feed() call, wall time of that call), for per-word latency
        self._track_latency = track_latency
        self._arrivals: list[tuple[int, float]] = []
        self._push_samples(torch.zeros(audio.n_left_pad_tokens * audio.samples_per_token))

    @property
    def text(self) -> str:
        return "".join(self._text_parts)

    @property
    def transcription(self) -> Transcription:
        """The transcription so far."""
        return Transcription(text=self.text, tokens=list(self.tokens), delay_ms=self.delay_ms,
                             duration=self.duration, words=list(self._words.words))

    @property
    def duration(self) -> float:
        """Seconds of audio fed so far."""
        return self.samples_fed / self.model.config.audio.sample_rate

    def feed(self, pcm: np.ndarray | torch.Tensor) -> str:
        """Add float32 16 kHz mono samples (any number); run every step they allow; return the new text."""
        if self.finished:
            raise RuntimeError("feed() after finish(): start a new session with Model.stream()")
        samples = torch.as_tensor(np.asarray(pcm, dtype=np.float32) if not torch.is_tensor(pcm) else pcm)
        samples = samples.reshape(-1).float()
        self.samples_fed += samples.shape[0]
        if self._track_latency:
            self._arrivals.append((self.samples_fed, time.perf_counter()))
        if self._ended_by_eos:
            return ""
        self._push_samples(samples)
        return self._decode(keep_last=0)

    def finish(self) -> str:
        """End of audio: flush with the protocol's right padding; return the remaining text."""
        if self.finished:
            return ""
        self.finished = True
        audio = self.model.config.audio
        if not self._ended_by_eos:
            step = audio.samples_per_token
            align = (-self.samples_fed) % step
            self._push_samples(torch.zeros(align + audio.n_right_pad_tokens(self.delay_tokens) * step))
            total = audio.n_left_pad_tokens * step + self.samples_fed + align + \
                audio.n_right_pad_tokens(self.delay_tokens) * step
            network = self.model.network
            mel = network.mel.flush(self.state.mel, total // audio.hop_length)
            self._embed(mel)
            text = self._decode(keep_last=1)
        else:
            text = ""
        text += self._emit(self._text.flush())
        self._words.finish(self.duration)
        return text

    # -- internals -------------------------------------------------------------------------------------------

    def _push_samples(self, samples: torch.Tensor) -> None:
        network = self.model.network
        self._embed(network.mel.push(self.state.mel, samples.to(network.device)))

    def _embed(self, mel: torch.Tensor) -> None:
        if mel.shape[-1]:
            emb = self.model.network.embed_audio(self.state, mel)
            if emb.shape[1]:
                self._embeddings.append(emb)

    @torch.no_grad()
    def _decode(self, keep_last: int) -> str:
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
            text.append(self._step(self.prompt, pending[:, :start]))
        while start < usable and not self._ended_by_eos:
            text.append(self._step([self.tokens[-1]], pending[:, start:start + 1]))
            start += 1
        self._embeddings = [pending[:, start:]] if start < pending.shape[1] and not self._ended_by_eos else []
        return "".join(text)

    def _step(self, tokens: list[int], audio: torch.Tensor) -> str:
        network = self.model.network
        device = network.device
        ids = torch.tensor([tokens], device=device)
        positions = torch.arange(self._position, self._position + len(tokens), device=device)[None]
        logits = network.decoder(ids, audio, positions, self.state.decoder_cache, self.ffn_scales)
        self._position += len(tokens)
        token = int(logits.argmax(dim=-1).item())
        tokenizer = self.model.tokenizer
        step = len(self.tokens)
        self.tokens.append(token)
        if token == tokenizer.eos_id:
            self._ended_by_eos = True
        piece = None if tokenizer.is_special(token) else tokenizer.token_bytes(token)
        latency = self._latency(step)
        self._words.push(step, token, piece, latency if piece else None)
        return self._emit(self._text.push(token))

    def _latency(self, step: int) -> float | None:
        """Seconds since the audio that let step ``step`` be decided (its 80 ms plus the delay) arrived."""
        if not self._track_latency:
            return None
        needed = min((step + self.delay_tokens + 1) * self.model.config.audio.samples_per_token, self.samples_fed)
        index = bisect_left(self._arrivals, needed, key=lambda entry: entry[0])
        del self._arrivals[:max(0, index - 1)]  # later steps need later audio: keep the list short
        arrived = self._arrivals[min(1, index)][1] if self._arrivals else time.perf_counter()
        return time.perf_counter() - arrived

    def _emit(self, text: str) -> str:
        if text:
            self._text_parts.append(text)
        return text
