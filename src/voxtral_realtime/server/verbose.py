"""OpenAI's ``verbose_json`` transcription, with every segment field computed from what the model produced.

Tokens come one per 80 ms step (``[STREAMING_PAD]`` when the model says nothing), and the engine scores each
step (:attr:`~voxtral_realtime.engine.Slot.scores`).  For each segment (a group of words, as the subtitles group
them):

* ``tokens``: the ids the model produced at the segment's steps, from its first word's first step to its last
  word's last (pads and word markers between the words included: they are decisions of the model too);
* ``avg_logprob``: the mean log-probability the model gave those tokens;
* ``no_speech_prob``: the probability the model gave ``[STREAMING_PAD]`` ("nothing is said in this step", this
  model's no-speech outcome) at the segment's first step, where it chose the segment's first word instead;
* ``compression_ratio``: UTF-8 bytes of the segment's text over those bytes compressed with zlib (gzip's deflate),
  as Whisper computes it: high for repetitive text;
* ``text``: the text decoded from the steps between this segment's first word and the next segment's, so the
  segments' texts joined are the transcript exactly, spaces included;
* ``temperature`` 0 (decoding is greedy), ``seek`` 0 (one pass over the whole audio).

``language`` is the request's ``language`` field as given: the model transcribes without naming the language it
heard, and the field is not used for decoding; without it, ``"unknown"``.
"""

from __future__ import annotations

import math
import zlib
from typing import TYPE_CHECKING, Any

from ..transcription import WordBuilder
from ..writers import milliseconds
from .worker import word_dict

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer
    from ..transcription import Transcription

UNKNOWN_LANGUAGE = "unknown"


def verbose_json(result: Transcription, token_scores: list[tuple[float, float] | None], tokenizer: Tokenizer, *,
                 language: str | None, segments: bool, words: bool, usage: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"task": "transcribe", "language": language or UNKNOWN_LANGUAGE,
                            "duration": round(result.duration, 3), "text": result.text, "delay_ms": result.delay_ms}
    if segments:
        body["segments"] = _segments(result, token_scores, tokenizer)
    if words:
        body["words"] = [{k: v for k, v in word_dict(w).items() if k != "latency"} for w in result.words]
    body["usage"] = usage
    return body


def _segments(result: Transcription, token_scores: list[tuple[float, float] | None],
              tokenizer: Tokenizer) -> list[dict[str, Any]]:
    tokens = result.tokens
    steps = _word_steps(tokens, tokenizer)
    text_at = _text_per_step(tokens, tokenizer)
    groups = result.segments
    if len(steps) != len(result.words) or (not groups and result.text):
        # only whitespace was said (no word), or words the replay does not find: one segment over everything
        return [_segment(0, 0.0, result.duration, "".join(text_at), (0, len(tokens)), tokens, token_scores)] \
            if tokens else []
    spans, first = [], 0
    for group in groups:
        spans.append((steps[first][0], steps[first + len(group.words) - 1][1]))
        first += len(group.words)
    text_starts = [0] + [start for start, _ in spans[1:]] + [len(tokens)]
    return [_segment(i, group.start, group.end, "".join(text_at[text_starts[i]:text_starts[i + 1]]), spans[i],
                     tokens, token_scores) for i, group in enumerate(groups)]


def _segment(index: int, start: float, end: float, text: str, span: tuple[int, int], tokens: list[int],
             token_scores: list[tuple[float, float] | None]) -> dict[str, Any]:
    first, stop = span
    scores = [s for s in token_scores[first:stop] if s is not None]
    avg_logprob = sum(s[0] for s in scores) / len(scores) if scores else 0.0
    opening = token_scores[first] if first < len(token_scores) else None
    no_speech = math.exp(opening[1]) if opening is not None and not math.isnan(opening[1]) else 0.0
    return {"id": index, "seek": 0, "start": milliseconds(start) / 1000, "end": milliseconds(end) / 1000,
            "text": text, "tokens": tokens[first:stop], "temperature": 0.0, "avg_logprob": avg_logprob,
            "compression_ratio": compression_ratio(text), "no_speech_prob": no_speech}


def compression_ratio(text: str) -> float:
    data = text.encode()
    return len(data) / len(zlib.compress(data)) if data else 0.0


def _word_steps(tokens: list[int], tokenizer: Tokenizer) -> list[tuple[int, int]]:
    """Each word's [first step, last step + 1), found by grouping the tokens again as the session did (token k is
    decided at step k), on a clock of one unit per step and without clamping to the audio."""
    builder = WordBuilder(1.0, tokenizer.streaming_word_id)
    for step, token in enumerate(tokens):
        piece = None if tokenizer.is_special(token) else tokenizer.token_bytes(token)
        builder.push(step, token, piece, None)
    return [(round(w.start), round(w.end)) for w in builder.finish(float("inf"))]


def _text_per_step(tokens: list[int], tokenizer: Tokenizer) -> list[str]:
    """The text each step's token completed, decoded as the session decoded it (the last step gets the flush)."""
    stream = tokenizer.text_stream()
    pieces = [stream.push(token) for token in tokens]
    if pieces:
        pieces[-1] += stream.flush()
    return pieces
