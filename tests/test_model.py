"""Our numbers are the model's numbers: the same random weights in transformers (the reference implementation)
and in voxtral_realtime give the same features, audio embeddings, logits at every step, and tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from voxtral_realtime.benchmarking.benchmark import teacher_forced_logits
from voxtral_realtime.benchmarking.signals import speechlike

SAMPLES_PER_TOKEN = 1280


def padded_for_reference(audio: np.ndarray, delay_tokens: int, left_tokens: int = 32) -> np.ndarray:
    """mistral-common's offline padding (docs/model.md, "Prompt and padding"): left silence, alignment, then
    delay + 11 steps."""
    align = (-len(audio)) % SAMPLES_PER_TOKEN
    right = align + (delay_tokens + 11) * SAMPLES_PER_TOKEN
    return np.concatenate([np.zeros(left_tokens * SAMPLES_PER_TOKEN, np.float32), audio,
                           np.zeros(right, np.float32)])


def reference_inputs(audio: np.ndarray, delay_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import VoxtralRealtimeFeatureExtractor

    features = VoxtralRealtimeFeatureExtractor()(padded_for_reference(audio, delay_tokens), sampling_rate=16000,
                                                 return_tensors="pt").input_features
    ids = torch.tensor([[1] + [32] * (32 + delay_tokens)])
    return ids, features


def reference_generate(hf_model, ids, features, delay_tokens):
    out = hf_model.generate(input_ids=ids, input_features=features, num_delay_tokens=delay_tokens,
                            do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, ids.shape[1]:].tolist(), [step[0] for step in out.logits]


def embed_features(net, features: torch.Tensor) -> torch.Tensor:
    """Our encoder + adapter over a whole log-mel [n_mels, T]."""
    state = net.encoder.new_state(1, max_chunk=256, device=net.device, dtype=net.dtype)
    state.cache.reserve(features.shape[-1] // 2)
    with torch.no_grad():
        return torch.cat([net.embed_audio(features[None, :, start:start + 512], state,
                                          torch.arange(start // 2, min(start + 512, features.shape[-1]) // 2)[None])
                          for start in range(0, features.shape[-1], 512)], dim=1)


def teacher_forced(model, features: torch.Tensor, tokens: list[int], delay_tokens: int) -> list[torch.Tensor]:
    """Our network fed the reference's own features and tokens, one decoder step per position."""
    prompt = [1] + [32] * (32 + delay_tokens)
    return list(teacher_forced_logits(model.network, features[0], prompt, tokens, delay_tokens))


@pytest.mark.parametrize("signal", ["speech", "silence", "loud", "tone"])
def test_features_match_feature_extractor(tiny_short, signal):
    from transformers import VoxtralRealtimeFeatureExtractor

    rng = np.random.default_rng(3)
    audio = {
        "speech": speechlike(4.0, seed=1),
        "silence": np.zeros(32000, np.float32),
        "loud": np.clip(rng.standard_normal(32000) * 2, -1, 1).astype(np.float32),
        "tone": (0.5 * np.sin(2 * np.pi * 440 * np.arange(32000) / 16000)).astype(np.float32),
    }[signal]
    padded = padded_for_reference(audio, 6)
    reference = VoxtralRealtimeFeatureExtractor()(padded, sampling_rate=16000, return_tensors="pt").input_features[0]
    ours = tiny_short.network.mel(torch.from_numpy(padded))
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() <= 1e-4


def test_processor_inputs_are_what_we_build(hf_processor):
    """The HF processor (through mistral-common) pads and prompts exactly as our reference_inputs()."""
    audio = speechlike(2.3, seed=5)
    inputs = hf_processor(audio, return_tensors="pt")
    ids, features = reference_inputs(audio, 6)
    assert inputs.input_ids.tolist() == ids.tolist()
    assert inputs.input_features.shape == features.shape
    assert torch.equal(inputs.input_features, features)


@pytest.mark.parametrize("name", ["short", "long"])
def test_audio_embeddings_match(checkpoints, name, tiny_short, tiny_long):
    model = {"short": tiny_short, "long": tiny_long}[name]
    hf = checkpoints[name].hf_model
    _, features = reference_inputs(speechlike(6.0, seed=2), 6)
    with torch.no_grad():
        reference = hf.model.get_audio_features(input_features=features).pooler_output
    ours = embed_features(model.network, features[0])
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() <= 1e-4 * reference.abs().max().item()


@pytest.mark.parametrize("name", ["short", "long"])
def test_logits_and_tokens_match_over_20_seconds(checkpoints, name, tiny_short, tiny_long):
    model = {"short": tiny_short, "long": tiny_long}[name]
    audio = speechlike(21.0, seed=11)
    ids, features = reference_inputs(audio, 6)
    ref_tokens, ref_logits = reference_generate(checkpoints[name].hf_model, ids, features, 6)
    n_steps = features.shape[-1] // 8 - ids.shape[1]
    assert len(ref_tokens) == n_steps, "the reference stopped early (EOS): choose another seed"

    logits = teacher_forced(model, features, ref_tokens, 6)
    worst = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(logits, ref_logits))
    assert worst <= 1e-4

    result = model.transcribe(audio)
    assert result.tokens == ref_tokens
    assert result.delay_ms == 480
    assert result.duration == pytest.approx(21.0)


@pytest.mark.parametrize("delay_ms", [80, 240, 1200, 2400])
def test_delay_changes_prompt_and_conditioning_like_reference(checkpoints, tiny_short, delay_ms):
    delay_tokens = delay_ms // 80
    audio = speechlike(5.0, seed=delay_ms)
    ids, features = reference_inputs(audio, delay_tokens)
    ref_tokens, _ = reference_generate(checkpoints["short"].hf_model, ids, features, delay_tokens)
    result = tiny_short.transcribe(audio, delay_ms=delay_ms)
    assert result.tokens == ref_tokens
    assert result.delay_ms == delay_ms


def test_delays_give_different_tokens(tiny_short):
    """The delay is not ignored: it changes both the prompt length and the time conditioning."""
    audio = speechlike(3.0, seed=4)
    assert tiny_short.transcribe(audio, delay_ms=240).tokens != tiny_short.transcribe(audio, delay_ms=960).tokens


def test_mistral_and_transformers_layouts_load_the_same_model(checkpoints, tiny_short):
    import voxtral_realtime

    from_hf = voxtral_realtime.load(checkpoints["short"].hf_dir, device="cpu", dtype="f32")
    ours = dict(tiny_short.network.named_parameters())
    for name, param in from_hf.network.named_parameters():
        assert torch.equal(param, ours[name]), name
    audio = speechlike(3.0, seed=9)
    assert from_hf.transcribe(audio).tokens == tiny_short.transcribe(audio).tokens


def test_text_is_mistral_common_decoding(tiny_short, tekken_path):
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    result = tiny_short.transcribe(speechlike(6.0, seed=21))
    reference = MistralTokenizer.from_file(str(tekken_path))
    assert result.text == reference.decode(result.tokens)
    assert any(t >= 1000 for t in result.tokens)  # some text was produced, so the comparison means something


def test_bf16_logits_close_to_f32(checkpoints, tiny_short):
    """bf16 weights follow the reference's cast points; on a random model logits stay within bf16 tolerance."""
    import voxtral_realtime

    bf16 = voxtral_realtime.load(checkpoints["short"].mistral_dir, device="cpu", dtype="bf16")
    _, features = reference_inputs(speechlike(3.0, seed=8), 6)
    tokens = tiny_short.transcribe(speechlike(3.0, seed=8)).tokens
    f32_logits = teacher_forced(tiny_short, features, tokens, 6)
    bf16_logits = teacher_forced(bf16, features.to(torch.bfloat16), tokens, 6)
    worst = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(bf16_logits, f32_logits))
    assert worst < 0.1
