"""Results: the transcript, its tokens, and its words with times.

Time comes from the protocol itself: generated token ``k`` is decided at decoder position ``left_pad + delay + k``
and transcribes the 80 ms of input audio starting at ``k * 80 ms`` (docs/model.md).  A word's start is the step
of its first token; its end is the step after its last token, or the start of the next word if that comes
sooner.  All times are clamped to the input audio.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

#: A segment ends after a word ending a sentence, before a pause this long, or once it is this long.
SEGMENT_PAUSE_S = 1.0
SEGMENT_MAX_CHARS = 84
_SENTENCE_END = re.compile(r"[.!?…。！？]['\")\]]*$")


@dataclass
class Word:
    text: str
    start: float  # seconds into the input audio
    end: float
    #: seconds from the arrival of the word's audio (its first 80 ms step plus the delay's look-ahead) to the
    #: moment its first token was decided; None when the audio was not fed live.
    latency: float | None = None


@dataclass
class Segment:
    text: str
    start: float
    end: float
    words: list[Word] = field(default_factory=list)


@dataclass
class Transcription:
    """The text of some audio and the tokens the model produced for it.

    ``tokens`` are the generated ids after the prompt, special ones included (``[STREAMING_PAD]`` for "nothing
    this step", ``[STREAMING_WORD]``, EOS), one per 80 ms step, exactly as the model produced them.
    """

    text: str
    tokens: list[int] = field(default_factory=list)
    delay_ms: int = 480
    duration: float = 0.0  # seconds of input audio, padding excluded
    words: list[Word] = field(default_factory=list)

    @property
    def segments(self) -> list[Segment]:
        """Sentence-like groups of words, for subtitles."""
        segments: list[Segment] = []
        current: list[Word] = []
        for word in self.words:
            if current and (word.start - current[-1].end > SEGMENT_PAUSE_S
                            or len(_join(current)) + 1 + len(word.text) > SEGMENT_MAX_CHARS):
                segments.append(_segment(current))
                current = []
            current.append(word)
            if _SENTENCE_END.search(word.text):
                segments.append(_segment(current))
                current = []
        if current:
            segments.append(_segment(current))
        return segments

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["segments"] = [{k: v for k, v in asdict(s).items() if k != "words"} for s in self.segments]
        return data


def _join(words: list[Word]) -> str:
    return " ".join(w.text for w in words)


def _segment(words: list[Word]) -> Segment:
    return Segment(text=_join(words), start=words[0].start, end=words[-1].end, words=list(words))


class WordBuilder:
    """Groups a stream of (step, token bytes or None for a special token) into timed words.

    A word starts at a text token whose text begins with whitespace, after ``[STREAMING_WORD]``, or at the first
    text token; other text tokens continue the current word.  Times never pass the audio's end: ``push`` is told
    how much audio there is so far, so a word closed during the closing silence is final when it is closed.
    """

    def __init__(self, step_s: float, word_marker_id: int) -> None:
        self.step_s = step_s
        self.word_marker_id = word_marker_id
        self.words: list[Word] = []
        self._bytes = b""
        self._first = self._last = 0
        self._latency: float | None = None
        self._boundary = True
        self._duration: float | None = None

    def push(self, step: int, token_id: int, piece: bytes | None, latency: float | None,
             duration: float | None = None) -> None:
        """``duration``: seconds of audio received so far (the closing silence not counted)."""
        self._duration = duration
        if piece is None:  # a special token
            if token_id == self.word_marker_id:
                self._boundary = True
            return
        if self._bytes and (self._boundary or piece[:1].isspace()):
            self._close(next_start=step)
        if not self._bytes:
            self._first, self._latency = step, latency
        self._bytes += piece
        self._last = step
        self._boundary = False

    def finish(self, duration: float) -> list[Word]:
        """Close the open word and clamp every time to ``[0, duration]``."""
        if self._bytes:
            self._close(next_start=None)
        for word in self.words:
            word.start, word.end = min(word.start, duration), min(word.end, duration)
        return self.words

    def _close(self, next_start: int | None) -> None:
        text = self._bytes.decode("utf-8", errors="replace").strip()
        end_step = self._last + 1 if next_start is None else min(self._last + 1, next_start)
        if text:
            start, end = self._first * self.step_s, end_step * self.step_s
            if self._duration is not None:
                start, end = min(start, self._duration), min(end, self._duration)
            self.words.append(Word(text, start, end, self._latency))
        self._bytes = b""
