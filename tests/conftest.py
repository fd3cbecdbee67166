"""Shared fixtures: tiny random checkpoints in the real formats, and our models loaded from them.

Checkpoints are built once per session (tokenizer files take seconds).  Two shapes of sliding windows:
``long`` (the real 750 / 8192) and ``short`` (12 encoder frames / 10 tokens, so a few seconds of audio run
far past both windows).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors (tests/test_kernels_q4.py); it
# must be chosen before the kernels are defined, i.e. before voxtral_realtime is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

WINDOWS = {"long": (750, 8192), "short": (12, 10)}
#: Test models keep 1000 special ids and 3096 text ids: every id decodes, and the LM head stays small.
TEST_VOCAB = 4096

# The tiny models are all per-op overhead: on the 2-core CI machines a second thread made them 6x slower.
torch.set_num_threads(1)


@dataclass
class TinyCheckpoint:
    name: str
    hf_model: object  # transformers VoxtralRealtimeForConditionalGeneration (the oracle)
    mistral_dir: Path
    hf_dir: Path


@pytest.fixture(scope="session")
def tekken_path() -> Path:
    from .tiny_checkpoint import cached_tekken_json

    return cached_tekken_json()


def _build(name: str, root: Path, tekken: Path) -> TinyCheckpoint:
    from .tiny_checkpoint import make_hf_model, write_hf_folder, write_mistral_folder

    encoder_window, decoder_window = WINDOWS[name]
    model = make_hf_model(encoder_window=encoder_window, decoder_window=decoder_window, seed=1234,
                          vocab_size=TEST_VOCAB)
    return TinyCheckpoint(
        name=name,
        hf_model=model,
        mistral_dir=write_mistral_folder(model, root / name / "mistral", tekken),
        hf_dir=write_hf_folder(model, root / name / "hf", tekken),
    )


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tekken_path: Path) -> dict[str, TinyCheckpoint]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: _build(name, root, tekken_path) for name in WINDOWS}


@pytest.fixture(scope="session")
def tiny_short(checkpoints):
    """Our model loaded from the short-window Mistral-format checkpoint, f32 on CPU."""
    import voxtral_realtime

    return voxtral_realtime.load(checkpoints["short"].mistral_dir, device="cpu", dtype="f32")


@pytest.fixture(scope="session")
def tiny_long(checkpoints):
    import voxtral_realtime

    return voxtral_realtime.load(checkpoints["long"].mistral_dir, device="cpu", dtype="f32")


@pytest.fixture(scope="session")
def hf_processor(tekken_path: Path):
    from transformers import VoxtralRealtimeFeatureExtractor, VoxtralRealtimeProcessor
    from transformers.tokenization_mistral_common import MistralCommonBackend

    return VoxtralRealtimeProcessor(feature_extractor=VoxtralRealtimeFeatureExtractor(),
                                    tokenizer=MistralCommonBackend(tokenizer_path=str(tekken_path)))
