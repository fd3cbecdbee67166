"""The streaming protocol's inputs, computed here and nowhere else (docs/architecture.md, "The streaming protocol").

A stream opens with a prompt of ``[BOS] + [STREAMING_PAD] * (left padding + delay)`` tokens while its audio opens
with ``left padding`` steps of silence, and it closes with silence that brings the last words out.  The session,
both engines, the reference runner, the benchmarks and the tests all take these from the functions below.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .config import AudioConfig


class PromptTokens(Protocol):
    bos_id: int
    streaming_pad_id: int


def prompt_ids(tokenizer: PromptTokens, audio: AudioConfig, delay_tokens: int) -> list[int]:
    """The decoder's opening tokens for a stream with ``delay_tokens`` steps of delay."""
    return [tokenizer.bos_id] + [tokenizer.streaming_pad_id] * (audio.n_left_pad_tokens + delay_tokens)


def left_padding(audio: AudioConfig) -> np.ndarray:
    """The silence every stream's audio starts with."""
    return np.zeros(audio.n_left_pad_tokens * audio.samples_per_token, np.float32)


def closing_silence(audio: AudioConfig, delay_tokens: int, samples: int) -> np.ndarray:
    """The silence after ``samples`` samples of audio: up to a whole step, then the delay, the BOS slot and the
    steps the last word needs (:meth:`.config.AudioConfig.n_right_pad_tokens`)."""
    step = audio.samples_per_token
    return np.zeros((-samples) % step + audio.n_right_pad_tokens(delay_tokens) * step, np.float32)


def padded_audio(audio: AudioConfig, samples: np.ndarray, delay_tokens: int) -> np.ndarray:
    """A whole recording as the network sees it offline: left padding, the audio, the closing silence."""
    samples = np.asarray(samples, np.float32)
    return np.concatenate([left_padding(audio), samples, closing_silence(audio, delay_tokens, len(samples))])
