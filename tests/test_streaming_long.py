"""Twenty minutes through one live session: memory stays flat and the tokens are the whole-file tokens."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from voxtral_realtime.benchmarking.signals import speechlike

MINUTES = 20


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.fixture(scope="module")
def endless_model(tmp_path_factory, tekken_path):
    """One layer each, windows of 12 encoder frames / 10 tokens, and an EOS that can never win (its tied
    embedding row is zero, so its logit is always 0): a random model would otherwise stop at some EOS."""
    import voxtral_realtime

    from .tiny_checkpoint import make_hf_model, write_mistral_folder

    model = make_hf_model(encoder_window=12, decoder_window=10, audio_layers=1, text_layers=1, vocab_size=4096,
                          seed=77)
    with torch.no_grad():
        model.get_input_embeddings().weight[2] = 0
    folder = write_mistral_folder(model, tmp_path_factory.mktemp("endless"), tekken_path)
    return voxtral_realtime.load(folder, device="cpu", dtype="f32")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="measures RSS through /proc")
def test_twenty_minutes_flat_memory_and_offline_tokens(endless_model):
    one_minute = speechlike(60.0, seed=5)
    session = endless_model.stream()
    rss = []
    for minute in range(MINUTES):
        audio = np.roll(one_minute, minute * 1237)  # a different minute each time, same level and structure
        for start in range(0, len(audio), 16000):
            session.feed(audio[start:start + 16000])
        rss.append(_rss_mib())
    session.finish()
    tokens = session.transcription.tokens
    steps = MINUTES * 60 * 1000 // 80
    # positions: 32 left pad + the audio + 17 right pad; the 39-token prompt's last position makes the first token
    assert len(tokens) == 32 + steps + 17 - 39  # one token per step to the end: no EOS, nothing dropped
    caches = (session.engine.encoder_state.cache, session.engine.decoder_cache)
    assert all(c.capacity <= c.max_capacity for c in caches)
    # after the first minutes (allocator warm-up), memory does not grow with the stream
    assert max(rss[3:]) - rss[3] < 24, rss

    full = np.concatenate([np.roll(one_minute, m * 1237) for m in range(MINUTES)])
    assert endless_model.transcribe(full).tokens == tokens
