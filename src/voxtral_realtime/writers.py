"""Writing a :class:`~voxtral_realtime.transcription.Transcription` as text, JSON, SRT or WebVTT subtitles."""

from __future__ import annotations

import json
from collections.abc import Callable

from .transcription import Segment, Transcription

FORMATS = ("txt", "json", "srt", "vtt")


def milliseconds(seconds: float) -> int:
    """The whole millisecond every written time is rounded to (subtitles, and the server's word events, so that
    subtitles built from those events equal ours)."""
    return max(0, round(seconds * 1000))


def timestamp(seconds: float, decimal_marker: str) -> str:
    return _clock(milliseconds(seconds), decimal_marker)


def _clock(millis: int, decimal_marker: str) -> str:
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_marker}{millis:03d}"


def to_txt(result: Transcription) -> str:
    return result.text.strip() + "\n"


def to_json(result: Transcription, **extra: object) -> str:
    return json.dumps({**extra, **result.to_dict()}, ensure_ascii=False, indent=2) + "\n"


def _cue_span(segment: Segment, decimal_marker: str) -> str:
    """``start --> end`` of a subtitle cue, at least a millisecond long (players skip empty cues).  The
    millisecond is added after rounding: words decided in the closing silence all sit at the audio's end, and a
    half-millisecond end (4.7485 s) would otherwise round differently than the rounded times the server sends."""
    start = milliseconds(segment.start)
    end = max(milliseconds(segment.end), start + 1)
    return f"{_clock(start, decimal_marker)} --> {_clock(end, decimal_marker)}"


def to_srt(result: Transcription) -> str:
    blocks = [f"{i}\n{_cue_span(s, ',')}\n{s.text}\n" for i, s in enumerate(result.segments, start=1)]
    return "\n".join(blocks)


def to_vtt(result: Transcription) -> str:
    blocks = [f"{_cue_span(s, '.')}\n{s.text}\n" for s in result.segments]
    return "\n".join(["WEBVTT\n", *blocks])


WRITERS: dict[str, Callable[[Transcription], str]] = {"txt": to_txt, "json": to_json, "srt": to_srt, "vtt": to_vtt}
