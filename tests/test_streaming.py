"""A stream fed in pieces of any size gives exactly the whole-file transcription (the full property test over
random chunkings lives with the streaming issue; these are the basic guarantees the offline path relies on)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from voxtral_realtime.benchmarking.signals import speechlike


def _feed(model, audio: np.ndarray, sizes, delay_ms=None):
    session = model.stream(delay_ms=delay_ms)
    deltas, start, i = [], 0, 0
    while start < len(audio):
        size = sizes[i % len(sizes)]
        deltas.append(session.feed(audio[start:start + size]))
        start += size
        i += 1
    deltas.append(session.finish())
    return session, "".join(deltas)


@pytest.mark.parametrize("sizes", [[1280], [160, 7, 1999], [12345], [1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 2000]])
def test_chunked_stream_equals_whole_file(tiny_short, sizes):
    audio = speechlike(4.3, seed=13)  # longer than both tiny windows, not a whole number of 80 ms steps
    offline = tiny_short.transcribe(audio)
    session, text = _feed(tiny_short, audio, sizes)
    assert session.transcription.tokens == offline.tokens
    assert text == session.transcription.text == offline.text


@pytest.mark.parametrize("piece", [16000, 10**9])  # several pieces, and the whole file with the closing padding
def test_a_recording_fed_whole_reports_progress_and_equals_the_stream(tiny_short, piece):
    audio = speechlike(4.3, seed=13)
    reports = []
    session = tiny_short.stream()
    text = session.feed_all(audio, piece=piece, progress=reports.append)
    _, streamed = _feed(tiny_short, audio, [1280])
    assert text == streamed and session.transcription.tokens == tiny_short.transcribe(audio).tokens
    assert reports == sorted(reports) and len(reports) >= 4  # about once per second of audio decided
    assert 0 < reports[0] and reports[-1] <= 4.3


def test_transcribe_reports_progress_up_to_the_whole_duration(tiny_short):
    reports = []
    tiny_short.transcribe(speechlike(2.5, seed=3), progress=lambda done, total: reports.append((done, total)))
    assert reports[-1] == (2.5, 2.5) and all(total == 2.5 and 0 < done <= 2.5 for done, total in reports)


def test_other_delay_streams_too(tiny_short):
    audio = speechlike(3.0, seed=14)
    session, _ = _feed(tiny_short, audio, [999], delay_ms=240)
    assert session.transcription.tokens == tiny_short.transcribe(audio, delay_ms=240).tokens


def test_feed_after_finish_is_an_error_and_finish_is_idempotent(tiny_short):
    session = tiny_short.stream()
    session.feed(np.zeros(5000, np.float32))
    session.finish()
    assert session.finish() == ""
    with pytest.raises(RuntimeError, match="after finish"):
        session.feed(np.zeros(10, np.float32))


def test_empty_stream_still_flushes(tiny_short):
    session = tiny_short.stream()
    session.finish()
    # 32 left-pad + 17 right-pad steps, minus the 39-token prompt and the unconsumed last embedding
    assert len(session.transcription.tokens) == 32 + 17 - 39 - 1 + 1


def test_array_at_another_rate_is_resampled(tiny_short):
    import av

    audio = speechlike(2.0, seed=15)
    resampler = av.AudioResampler(format="flt", layout="mono", rate=48000)
    frame = av.AudioFrame.from_ndarray(audio[None], format="flt", layout="mono")
    frame.sample_rate = 16000
    at48k = np.concatenate([f.to_ndarray().reshape(-1) for f in [*resampler.resample(frame),
                                                                 *resampler.resample(None)]])
    result = tiny_short.transcribe(at48k, sample_rate=48000)
    assert result.duration == pytest.approx(2.0, abs=0.01)
    assert len(result.tokens) == len(tiny_short.transcribe(audio).tokens)


#: Chunk-size patterns, cycled over the audio: single samples, sizes that cut 10 ms mel hops and 80 ms steps in the
#: middle, and one larger piece per cycle so an example stays a few hundred calls.
CHUNK_PATTERNS = st.tuples(
    st.lists(st.one_of(st.integers(1, 3), st.integers(100, 1400)), min_size=0, max_size=6),
    st.integers(1281, 9000),
).map(lambda t: [*t[0], t[1]])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=CHUNK_PATTERNS, seconds=st.floats(1.2, 3.5), seed=st.integers(0, 10_000),
       delay_ms=st.sampled_from([80, 480, 960]))
def test_property_any_chunking_gives_the_offline_tokens(tiny_short, sizes, seconds, seed, delay_ms):
    """Random audio, random chunking: the stream's tokens are the whole-file tokens (windows are 12 encoder
    frames and 10 tokens, so every example runs past both)."""
    audio = speechlike(seconds, seed=seed)
    session, text = _feed(tiny_short, audio, sizes, delay_ms=delay_ms)
    offline = tiny_short.transcribe(audio, delay_ms=delay_ms)
    assert session.transcription.tokens == offline.tokens
    assert text == offline.text
