"""Timed words, segments and subtitle files."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import srt
import webvtt

from voxtral_realtime.benchmarking.signals import speechlike
from voxtral_realtime.cli import main
from voxtral_realtime.transcription import Transcription, Word, WordBuilder
from voxtral_realtime.writers import timestamp, to_srt, to_vtt


def test_word_builder_groups_tokens_and_times_them_by_step():
    builder = WordBuilder(step_s=0.08, word_marker_id=33)
    stream = [(0, 32, None), (1, 33, None), (2, 1001, b" Hel"), (3, 1002, b"lo"), (4, 32, None),
              (5, 1003, b" world"), (6, 33, None), (7, 1004, b"again"), (8, 1005, b"!"), (9, 32, None)]
    for step, token, piece in stream:
        builder.push(step, token, piece, latency=None)
    words = builder.finish(duration=0.70)
    assert [w.text for w in words] == ["Hello", "world", "again!"]
    assert [(round(w.start, 2), round(w.end, 2)) for w in words] == [(0.16, 0.32), (0.4, 0.48), (0.56, 0.7)]


def test_words_of_a_transcription_are_ordered_and_inside_the_audio(tiny_short):
    # speech-like bursts separated by pauses; 7.3 s so the last step is a partial one
    result = tiny_short.transcribe(speechlike(7.3, seed=40))
    assert result.words, "the tiny model produced no text: the test means nothing"
    # random tokens can split a UTF-8 character across two words: compare what both decode cleanly
    def visible(text):
        return "".join(text.split()).replace("\ufffd", "")

    assert visible("".join(w.text for w in result.words)) == visible(result.text)
    starts = [w.start for w in result.words]
    assert starts == sorted(starts)
    for word in result.words:
        assert 0.0 <= word.start <= word.end <= result.duration
        assert word.latency is None  # offline: nothing arrived live
    for a, b in zip(result.words, result.words[1:]):
        assert a.end <= b.start + 1e-9
    assert sum(len(s.words) for s in result.segments) == len(result.words)


def test_live_words_have_latencies(tiny_short):
    audio = speechlike(4.0, seed=41)
    session = tiny_short.stream()
    for start in range(0, len(audio), 640):
        session.feed(audio[start:start + 640])
    session.finish()
    words = session.transcription.words
    assert words and all(w.latency is not None and 0.0 <= w.latency < 60 for w in words)


def test_srt_and_vtt_parse_with_real_parsers():
    words = [Word("Hello", 0.0, 0.4), Word("world.", 0.4, 0.9), Word("Second", 2.5, 3.1), Word("line", 3.1, 3.6)]
    result = Transcription(text=" Hello world. Second line", words=words, duration=4.0)
    subtitles = list(srt.parse(to_srt(result)))
    assert [s.content for s in subtitles] == ["Hello world.", "Second line"]
    assert subtitles[1].start.total_seconds() == pytest.approx(2.5)
    captions = webvtt.from_buffer(io.StringIO(to_vtt(result)))
    assert [c.text for c in captions] == ["Hello world.", "Second line"]
    assert captions[0].end == "00:00:00.900"
    assert timestamp(3725.5, ",") == "01:02:05,500"


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_cli_writes_subtitles_that_parse(tiny_short, checkpoints, tmp_path, fmt, capsys):
    import soundfile

    wav = tmp_path / "talk.wav"
    soundfile.write(wav, speechlike(6.0, seed=42), 16000)
    assert main(["transcribe", str(wav), "--model", str(checkpoints["short"].mistral_dir), "--device", "cpu",
                 "--output-format", fmt]) == 0
    out = capsys.readouterr().out
    if fmt == "srt":
        parsed = [s.content for s in srt.parse(out)]
    else:
        parsed = [c.text for c in webvtt.from_buffer(io.StringIO(out))]
    assert parsed == [s.text for s in tiny_short.transcribe(wav).segments]


def test_cli_realtime_replay_prints_text_and_latencies(tiny_short, checkpoints, tmp_path, capsys):
    import soundfile

    wav = tmp_path / "live.wav"
    audio = speechlike(1.5, seed=43)
    soundfile.write(wav, audio, 16000)
    assert main(["transcribe", str(wav), "--realtime", "--model", str(checkpoints["short"].mistral_dir),
                 "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == tiny_short.transcribe(np.asarray(audio)).text.strip()
    assert "p50" in err and "p99" in err


def test_cli_realtime_replay_says_when_it_falls_behind(tiny_short, checkpoints, tmp_path, monkeypatch, capsys):
    """A clock on which every step's computation takes 160 ms, twice real time: warned at 1 s behind, again at
    twice that, and the transcript is complete."""
    import soundfile

    from voxtral_realtime.cli import transcribe

    class SlowClock:
        now = 0.0

        def perf_counter(self) -> float:
            self.now += 0.16  # read once a step
            return self.now

        def sleep(self, seconds: float) -> None:
            self.now += seconds

    wav = tmp_path / "live.wav"
    audio = speechlike(3.0, seed=44)
    soundfile.write(wav, audio, 16000)
    monkeypatch.setattr(transcribe, "time", SlowClock())
    assert main(["transcribe", str(wav), "--realtime", "--model", str(checkpoints["short"].mistral_dir),
                 "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == tiny_short.transcribe(np.asarray(audio)).text.strip()
    warnings = [line for line in err.splitlines() if "not keeping up" in line]
    assert len(warnings) == 2 and re.search(r": 1\.\d s of audio is waiting", warnings[0])
