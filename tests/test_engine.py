"""The batched engine: streams sharing one engine, at different positions, joining and leaving at any time, give
exactly the tokens each gets alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from voxtral_realtime.benchmarking.signals import speechlike


def _round_robin(model, engine, plan, piece: int):
    """``plan``: (audio, delay_ms, join_round) per stream.  Every round, each joined stream pushes ``piece``
    samples (or finishes when it has none left) and one engine.run() serves them all."""
    sessions = [None] * len(plan)
    offsets = [0] * len(plan)
    finished = [False] * len(plan)
    round_ = 0
    while not all(finished):
        for i, (audio, delay_ms, join_round) in enumerate(plan):
            if finished[i] or round_ < join_round:
                continue
            if sessions[i] is None:
                sessions[i] = model.stream(delay_ms=delay_ms, engine=engine)
            if offsets[i] < len(audio):
                sessions[i].push(audio[offsets[i]:offsets[i] + piece])
                offsets[i] += piece
            else:
                sessions[i].finish()
                finished[i] = True
        engine.run()
        round_ += 1
    return sessions


@pytest.mark.parametrize("piece", [1280, 2000])
def test_streams_sharing_an_engine_match_their_solo_transcripts(tiny_short, piece):
    plan = [
        (speechlike(2.5, seed=21), 480, 0),
        (speechlike(4.0, seed=22), 240, 3),  # joins later, so it sits at other positions than the first
        (speechlike(1.2, seed=23), 960, 5),  # short: leaves early; its row is then reused
        (speechlike(2.0, seed=24), 80, 30),  # joins after the third left: takes its (reset) row
    ]
    engine = tiny_short.engine(3)
    sessions = _round_robin(tiny_short, engine, plan, piece)
    for session, (audio, delay_ms, _) in zip(sessions, plan):
        solo = tiny_short.transcribe(audio, delay_ms=delay_ms)
        assert session.transcription.tokens == solo.tokens
        assert session.text == solo.text
    assert engine.free_slots == 3
    assert engine.decode_rows > engine.decode_calls  # streams were really batched


def test_a_full_engine_says_so(tiny_short):
    engine = tiny_short.engine(1)
    first = tiny_short.stream(engine=engine)
    with pytest.raises(RuntimeError, match="all 1 streams of this engine are busy"):
        tiny_short.stream(engine=engine)
    first.close()
    tiny_short.stream(engine=engine).finish()


def test_decoder_context_cap_is_exact_below_the_cap(tiny_long):
    """A capped decoder window changes nothing for streams shorter than the cap (here 4 s = 50 + 39 tokens)."""
    audio = speechlike(4.0, seed=25)
    engine = tiny_long.engine(2, decoder_context=128)
    session = tiny_long.stream(engine=engine)
    session.feed(audio)
    session.finish()
    assert session.transcription.tokens == tiny_long.transcribe(audio).tokens


def test_abandoned_session_frees_its_row(tiny_short):
    engine = tiny_short.engine(2)
    a = tiny_short.stream(engine=engine)
    a.feed(speechlike(1.0, seed=26))
    a.close()
    assert engine.free_slots == 2
    b = tiny_short.stream(engine=engine)
    audio = speechlike(1.5, seed=27)
    b.feed(audio)
    b.finish()
    assert b.transcription.tokens == tiny_short.transcribe(audio).tokens
    assert np.isfinite(engine.decoder_cache.keys[0].float()).all()



def test_streams_ending_together_share_their_closing_runs(tiny_short):
    """end_input() + engine.run() + complete(): the closing silence of several streams is computed in batches."""
    plan = [(speechlike(1.5, seed=31), 480), (speechlike(2.2, seed=32), 240), (speechlike(0.9, seed=33), 960)]
    engine = tiny_short.engine(3)
    sessions = [tiny_short.stream(delay_ms=delay_ms, engine=engine) for _, delay_ms in plan]
    for session, (audio, _) in zip(sessions, plan):
        session.push(audio)
    engine.run()
    texts = [session.take_text() for session in sessions]
    for session in sessions:
        session.end_input()
    calls, rows = engine.decode_calls, engine.decode_rows
    pending = set(range(len(sessions)))
    while pending:
        engine.run()
        for i in sorted(pending):
            if sessions[i].complete():
                pending.discard(i)
            texts[i] += sessions[i].take_text()
    assert engine.decode_rows - rows > engine.decode_calls - calls  # closing steps were batched
    assert engine.free_slots == 3
    for session, text, (audio, delay_ms) in zip(sessions, texts, plan):
        solo = tiny_short.transcribe(audio, delay_ms=delay_ms)
        assert session.transcription.tokens == solo.tokens
        assert text == solo.text


def test_complete_needs_end_input_and_the_run(tiny_short):
    audio = speechlike(0.5, seed=34)
    session = tiny_short.stream(engine=tiny_short.engine(1))
    session.push(audio)
    with pytest.raises(RuntimeError, match="before end_input"):
        session.complete()
    session.end_input()
    assert not session.complete()  # the audio and its closing silence are not computed yet
    session.engine.run()
    assert session.complete()
    assert session.transcription.tokens == tiny_short.transcribe(audio).tokens


def test_one_stream_with_graphs_encodes_in_power_of_two_calls_with_the_same_tokens(tiny_long, monkeypatch):
    """With CUDA graphs, one stream's waiting audio (a file) is encoded in calls of 2^k steps, the largest first
    (one graph per size), and the prompt tokens left after the shared opening go through the one-token steps.
    Here, on the CPU, with the graph capture replaced by plain calls: the same tokens as the chunked path (which
    prefills them), from calls of several sizes, and only the opening prefilled."""
    from voxtral_realtime import engine as engine_module

    calls = []

    class PlainCalls:
        def __init__(self, eager_calls: int = 1) -> None:
            pass

        def __call__(self, key, versions, fn):
            calls.append(key)
            return fn()

    audio = speechlike(9.0, seed=24)
    expected = tiny_long.transcribe(audio).tokens
    monkeypatch.setattr(engine_module, "_GraphedCalls", PlainCalls)
    engine = engine_module.Engine(tiny_long.network, max_streams=1, cuda_graphs=True)
    prefills = []
    monkeypatch.setattr(engine, "_prefill", lambda slot, length, run=engine._prefill: (
        prefills.append(length), run(slot, length))[1])
    session = tiny_long.stream(engine=engine)
    session.feed(audio)
    session.finish()
    assert session.transcription.tokens == expected
    sizes = [steps for kind, _, steps in calls if kind == "encode"]
    assert max(sizes) == engine._tick_steps[0] > 1 and len(set(sizes)) > 2
    assert all(n & (n - 1) == 0 for n in sizes)
    assert prefills == [engine._silent_steps]
    assert 0 < len(session.prompt) - engine._silent_steps <= engine_module.STEPPED_PROMPT_TOKENS


def test_argmax_by_pieces_equals_argmax_with_ties_taking_the_first():
    from voxtral_realtime.engine import _argmax

    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 8 * 1024, generator=generator)
    logits[1, 5000] = logits[1, 3000] = logits[1, 7000] = 100.0  # ties across pieces
    logits[2, 2050] = logits[2, 2049] = 100.0  # ties within a piece
    assert _argmax(logits).tolist() == logits.argmax(dim=-1).tolist() == [_argmax(logits)[0].item(), 3000, 2049]
    odd = torch.randn(2, 1000, generator=generator)
    assert _argmax(odd).tolist() == odd.argmax(dim=-1).tolist()


def test_a_prompt_reading_only_the_columns_it_used_gives_the_same_logits():
    """A prefill told that its row's keys lie in its first columns (the engine's prompt) attends to those only,
    with the logits of attending to the whole preallocated ring; a bound past the ring is ignored."""
    from voxtral_realtime.config import DecoderConfig
    from voxtral_realtime.decoder import TextDecoder

    cfg = DecoderConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=48, vocab_size=50,
                        sliding_window=6, rope_theta=1e4, norm_eps=1e-5, ada_dim=8)
    torch.manual_seed(0)
    decoder = TextDecoder(cfg)
    with torch.no_grad():
        for p in decoder.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    scales = decoder.ffn_scales(2)

    def prefill(columns_used, start, length):
        cache = decoder.new_cache(2, max_chunk=8, device=torch.device("cpu"), dtype=torch.float32, preallocate=True)
        cache.keys[0].normal_()  # stale keys everywhere: the mask must hide them either way
        generator = torch.Generator().manual_seed(1)
        outs = []
        for first, n in ((0, start), (start, length)):
            if n == 0:
                continue
            tokens = torch.randint(0, cfg.vocab_size, (1, n), generator=generator)
            audio = torch.randn(1, n, cfg.dim, generator=generator)
            positions = torch.arange(first, first + n)[None]
            with torch.no_grad():
                outs.append(decoder(tokens, audio, positions, cache, scales, rows=slice(1, 2),
                                    columns_used=columns_used(first + n)))
        return torch.cat(outs)

    for start, length in ((0, 5), (3, 4), (8, 5)):  # the last reaches the ring's 13 columns
        whole = prefill(lambda end: None, start, length)
        torch.testing.assert_close(prefill(lambda end: end, start, length), whole)
