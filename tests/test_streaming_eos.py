"""EOS: the whole-file transcription stops there (as the reference does); an always-on stream goes on with a
fresh segment from the next step, so nothing said after a spurious EOS is lost."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from voxtral_realtime.benchmarking.signals import speechlike

AUDIO = speechlike(9.0, seed=60)


@pytest.fixture(scope="module")
def eos_prone_model(tmp_path_factory, tekken_path, tiny_short):
    """The short tiny model with EOS's (tied) embedding made 1.3x the most frequent text token's: wherever that
    token would win, EOS wins, so EOS comes up several times in a few seconds."""
    import voxtral_realtime

    from .conftest import TEST_VOCAB, WINDOWS
    from .tiny_checkpoint import make_hf_model, write_mistral_folder

    counts = Counter(t for t in tiny_short.transcribe(AUDIO).tokens if t >= 1000)
    favourite = counts.most_common(1)[0][0]
    model = make_hf_model(encoder_window=WINDOWS["short"][0], decoder_window=WINDOWS["short"][1], seed=1234,
                          vocab_size=TEST_VOCAB)
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        weight[2] = 1.3 * weight[favourite]
    folder = write_mistral_folder(model, tmp_path_factory.mktemp("eos"), tekken_path)
    return voxtral_realtime.load(folder, device="cpu", dtype="f32")


def _stream(model, audio, size, **kwargs):
    session = model.stream(**kwargs)
    text = "".join(session.feed(audio[i:i + size]) for i in range(0, len(audio), size)) + session.finish()
    return session, text


def test_offline_stops_at_eos_and_a_default_stream_too(eos_prone_model):
    offline = eos_prone_model.transcribe(AUDIO)
    assert offline.tokens[-1] == 2 and offline.tokens.count(2) == 1
    session, _ = _stream(eos_prone_model, AUDIO, 3000)
    assert session.transcription.tokens == offline.tokens


@pytest.mark.parametrize("size", [1280, 7777, 50_000])
def test_always_on_stream_continues_after_eos(eos_prone_model, size):
    session, text = _stream(eos_prone_model, AUDIO, size, continue_after_eos=True)
    tokens = session.transcription.tokens
    assert tokens.count(2) >= 2, "the fixture should make EOS frequent"
    # one token per 80 ms step to the end of the audio, plus the final segment's 10 closing-silence steps unless
    # an EOS came during that silence (then the stream is over: no new segment starts after the audio)
    steps = -(-len(AUDIO) // 1280)
    if tokens[-1] == 2:
        assert steps <= len(tokens) < steps + 10
    else:
        assert len(tokens) == steps + 10
    # up to the first EOS: the whole-file result; after it: the whole-file result of the rest of the audio
    first = tokens.index(2)
    assert tokens[:first + 1] == eos_prone_model.transcribe(AUDIO).tokens
    rest = eos_prone_model.transcribe(AUDIO[(first + 1) * 1280:]).tokens
    assert tokens[first + 1:first + 1 + len(rest)] == rest
    assert text == session.transcription.text
    starts = [w.start for w in session.transcription.words]
    assert starts == sorted(starts) and all(0 <= s <= len(AUDIO) / 16000 for s in starts)


def test_always_on_stream_is_chunking_invariant(eos_prone_model):
    a, _ = _stream(eos_prone_model, AUDIO, 1280, continue_after_eos=True)
    b, _ = _stream(eos_prone_model, AUDIO, 33_333, continue_after_eos=True)
    assert a.transcription.tokens == b.transcription.tokens
    assert np.isclose(a.duration, b.duration)


def test_always_on_stream_on_a_shared_engine_resumes_at_its_next_push(eos_prone_model):
    """With a shared engine (push + engine.run(), no feed()), the segment after an EOS starts at the next push
    or at end_input(): same tokens as the stream fed on its own."""
    engine = eos_prone_model.engine(2)
    session = eos_prone_model.stream(engine=engine, continue_after_eos=True)
    for i in range(0, len(AUDIO), 1280):
        session.push(AUDIO[i:i + 1280])
        engine.run()
    live = session.transcription.tokens
    assert live.count(2) >= 2 and len(live) > live.index(2) + 20  # it went on after its first EOS, live
    session.end_input()
    engine.run()
    while not session.complete():
        engine.run()
    alone, _ = _stream(eos_prone_model, AUDIO, 1280, continue_after_eos=True)
    assert session.transcription.tokens.count(2) >= 2
    assert session.transcription.tokens == alone.transcription.tokens


def test_always_on_stream_replays_after_eos_even_when_the_engine_lags(eos_prone_model):
    """Runs bounded to a few decoder calls leave the decoder far behind the pushes: an EOS found late must still
    replay all the audio after it."""
    engine = eos_prone_model.engine(1)
    session = eos_prone_model.stream(engine=engine, continue_after_eos=True)
    for i in range(0, len(AUDIO), 12_800):
        session.push(AUDIO[i:i + 12_800])
        engine.run(max_decoder_calls=3)
    session.end_input()
    engine.run()
    while not session.complete():
        engine.run()
    alone, _ = _stream(eos_prone_model, AUDIO, 1280, continue_after_eos=True)
    assert session.transcription.tokens == alone.transcription.tokens
