"""Self-checks of tests/tiny_checkpoint.py, the builder of tiny random checkpoints in the real file formats.

* The Mistral folder round-trips: the forward conversion (renaming + RoPE permutation, written here
  independently of the helper) gives back model.state_dict() bit for bit, and the exported q/k rows really are
  in interleaved-RoPE order (attention logits match HF's rotate_half RoPE).
* params.json has the real structure; for the full-size config it is byte-identical to the real file.
* The transformers folder reloads with from_pretrained to identical weights.
* The synthetic tekken.json loads in mistral-common with the real streaming numbers.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import VoxtralRealtimeConfig, VoxtralRealtimeForConditionalGeneration

from .tiny_checkpoint import (
    MISTRAL_PREFIX,
    make_hf_model,
    params_json_text,
    write_hf_folder,
    write_mistral_folder,
    write_tekken_json,
)

# Non-default windows, so that a window not plumbed through to a file shows up.
ENCODER_WINDOW, DECODER_WINDOW = 12, 10
AUDIO_LAYERS, TEXT_LAYERS = 2, 2
#: docs/model.md, "Hyperparameters"
REAL_PARAMS_SHA256 = "2ace010ebf7f0b62c60747d91c6d140e3c7238632d3e9c63d60a2bd2065ea301"


@pytest.fixture(scope="module")
def model() -> VoxtralRealtimeForConditionalGeneration:
    return make_hf_model(encoder_window=ENCODER_WINDOW, decoder_window=DECODER_WINDOW)


@pytest.fixture(scope="module")
def mistral_dir(
    model: VoxtralRealtimeForConditionalGeneration, tekken_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The fp32 Mistral folder, written once for all the tests that only read it."""
    return write_mistral_folder(model, tmp_path_factory.mktemp("mistral"), tekken_path)


@pytest.fixture(scope="module")
def mistral_tokenizer(tekken_path: Path) -> MistralTokenizer:
    # Loading the 150k-entry vocab takes seconds: load once.  from_file goes through Tekkenizer.from_file.
    return MistralTokenizer.from_file(tekken_path)


def _sub_configs(model: VoxtralRealtimeForConditionalGeneration) -> tuple[Any, Any]:
    """(audio_config, text_config); transformers types them loosely (``dict | PreTrainedConfig | None``)."""
    return model.config.audio_config, model.config.text_config


# ---------------------------------------------------------------------------------------------------------------
# Forward conversion Mistral -> HF, written independently of the helper's tables.

# (regex, replacement) applied in order to the key without its mm_streams prefix; the first match wins.
_PREFIXED_RENAMES = [
    (r"^tok_embeddings\.", "model.language_model.embed_tokens."),
    (r"^whisper_encoder\.conv_layers\.0\.conv\.", "model.audio_tower.embedder.conv1."),
    (r"^whisper_encoder\.conv_layers\.1\.conv\.", "model.audio_tower.embedder.conv2."),
    (r"^whisper_encoder\.transformer\.norm\.", "model.audio_tower.norm."),
    (r"^whisper_encoder\.transformer\.layers\.", "model.audio_tower.layers."),
    (r"^audio_language_projection\.0\.", "model.multi_modal_projector.linear_1."),
    (r"^audio_language_projection\.2\.", "model.multi_modal_projector.linear_2."),
]
# The same for the bare (decoder) keys.
_BARE_RENAMES = [
    (r"^layers\.", "model.language_model.layers."),
    (r"^norm\.", "model.language_model.norm."),
]
_SUBMODULES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "ada_rms_norm_t_cond.0": "ada_rms_norm.linear1",
    "ada_rms_norm_t_cond.2": "ada_rms_norm.linear2",
}
_ENCODER_NORMS = {"attention_norm": "self_attn_layer_norm", "ffn_norm": "final_layer_norm"}
_DECODER_NORMS = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def _hf_name(mistral_key: str) -> str:
    if mistral_key.startswith(MISTRAL_PREFIX):
        rest, rules = mistral_key.removeprefix(MISTRAL_PREFIX), _PREFIXED_RENAMES
    else:
        rest, rules = mistral_key, _BARE_RENAMES
    for pattern, replacement in rules:
        if re.match(pattern, rest):
            key = re.sub(pattern, replacement, rest)
            break
    else:
        raise AssertionError(f"unexpected Mistral key {mistral_key}")
    match = re.match(r"^(model\.(audio_tower|language_model)\.layers\.\d+\.)(.+)\.(weight|bias)$", key)
    if match:
        head, tower, module, kind = match.groups()
        norms = _ENCODER_NORMS if tower == "audio_tower" else _DECODER_NORMS
        module = _SUBMODULES.get(module) or norms[module]
        key = f"{head}{module}.{kind}"
    return key


def _to_half_split(tensor: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's permute_for_rope: Mistral row 2i+c of each head goes to row c*(hd/2)+i."""
    head_dim = tensor.shape[0] // n_heads
    return tensor.reshape(n_heads, head_dim // 2, 2, *tensor.shape[1:]).transpose(1, 2).reshape(tensor.shape)


def _mistral_to_hf(tensors: dict[str, torch.Tensor], params: dict) -> dict[str, torch.Tensor]:
    enc = params["multimodal"]["whisper_model_args"]["encoder_args"]
    out = {}
    for key, tensor in tensors.items():
        is_encoder = key.startswith(MISTRAL_PREFIX)
        if ".attention.wq." in key:
            tensor = _to_half_split(tensor, enc["n_heads"] if is_encoder else params["n_heads"])
        elif ".attention.wk." in key:
            tensor = _to_half_split(tensor, enc["n_kv_heads"] if is_encoder else params["n_kv_heads"])
        out[_hf_name(key)] = tensor
    return out


# ---------------------------------------------------------------------------------------------------------------
# The model


def test_model_layout_and_randomization(model: VoxtralRealtimeForConditionalGeneration) -> None:
    audio_cfg, text_cfg = _sub_configs(model)
    assert not model.training
    assert audio_cfg.head_dim == text_cfg.head_dim == 16
    assert audio_cfg.rope_parameters["rope_theta"] == text_cfg.rope_parameters["rope_theta"] == 1e6
    assert (audio_cfg.sliding_window, text_cfg.sliding_window) == (ENCODER_WINDOW, DECODER_WINDOW)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight

    layer = model.model.audio_tower.layers[0]
    biases = {
        "q": layer.self_attn.q_proj.bias,
        "v": layer.self_attn.v_proj.bias,
        "o": layer.self_attn.o_proj.bias,
        "down": layer.mlp.down_proj.bias,
        "conv1": model.model.audio_tower.embedder.conv1.bias,
        "conv2": model.model.audio_tower.embedder.conv2.bias,
    }
    assert layer.self_attn.k_proj.bias is None
    assert layer.mlp.gate_proj.bias is None and layer.mlp.up_proj.bias is None
    for name, bias in biases.items():
        assert bias is not None, name
        assert 0.15 < bias.std().item() < 0.5, name  # N(0, 0.3²), not HF's zeros

    # No decoder biases anywhere.
    decoder_biases = [n for n, _ in model.model.language_model.named_parameters() if n.endswith(".bias")]
    assert decoder_biases == []

    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            assert 0.1 < (param - 1).std().item() < 0.6, name  # 1 + N(0, 0.3²), not HF's ones
    assert abs(model.model.language_model.embed_tokens.weight.std().item() - 1.0) < 0.01
    ada = model.model.language_model.layers[0].ada_rms_norm
    assert abs(ada.linear1.weight.std().item() * 64**0.5 - 3.0) < 0.3
    q = model.model.language_model.layers[0].self_attn.q_proj.weight
    assert abs(q.std().item() * 64**0.5 - 1.0) < 0.15


def test_model_is_deterministic(model: VoxtralRealtimeForConditionalGeneration) -> None:
    again = make_hf_model(encoder_window=ENCODER_WINDOW, decoder_window=DECODER_WINDOW)
    expected = model.state_dict()
    got = again.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


# ---------------------------------------------------------------------------------------------------------------
# Mistral folder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mistral_folder_round_trips(
    model: VoxtralRealtimeForConditionalGeneration,
    mistral_dir: Path,
    tekken_path: Path,
    tmp_path: Path,
    dtype: torch.dtype,
) -> None:
    if dtype == torch.float32:
        folder = mistral_dir
    else:
        folder = write_mistral_folder(model, tmp_path / "mistral", tekken_path, dtype=dtype)
    assert sorted(p.name for p in folder.iterdir()) == ["consolidated.safetensors", "params.json", "tekken.json"]
    assert (folder / "tekken.json").read_bytes() == tekken_path.read_bytes()

    tensors = load_file(folder / "consolidated.safetensors")
    params = json.loads((folder / "params.json").read_text())

    audio_side = [k for k in tensors if k.startswith(MISTRAL_PREFIX)]
    text_side = [k for k in tensors if not k.startswith(MISTRAL_PREFIX)]
    assert len(audio_side) == AUDIO_LAYERS * 13 + 4 + 1 + 2 + 1
    assert len(text_side) == TEXT_LAYERS * 11 + 1
    assert all(re.match(r"^(layers\.\d+\.|norm\.weight$)", k) for k in text_side), text_side
    assert "output.weight" not in tensors and "tok_embeddings.weight" not in tensors  # embedding stored once
    assert {t.dtype for t in tensors.values()} == {dtype}

    converted = _mistral_to_hf(tensors, params)
    expected = model.state_dict()
    assert set(converted) == set(expected) - {"lm_head.weight"}
    for key, tensor in converted.items():
        assert torch.equal(tensor, expected[key].to(dtype)), key


def test_mistral_params(mistral_dir: Path) -> None:
    params = json.loads((mistral_dir / "params.json").read_text())
    enc = params["multimodal"]["whisper_model_args"]["encoder_args"]
    assert {k: params[k] for k in ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads")} == {
        "dim": 64, "n_layers": TEXT_LAYERS, "head_dim": 16, "hidden_dim": 192, "n_heads": 4, "n_kv_heads": 2,
    }  # fmt: skip
    assert {k: enc[k] for k in ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads")} == {
        "dim": 64, "n_layers": AUDIO_LAYERS, "head_dim": 16, "hidden_dim": 256, "n_heads": 4, "n_kv_heads": 4,
    }  # fmt: skip
    assert (params["sliding_window"], enc["sliding_window"]) == (DECODER_WINDOW, ENCODER_WINDOW)
    assert params["rope_theta"] == enc["rope_theta"] == 1e6
    assert params["vocab_size"] == 131072 and params["tied_embeddings"] is True
    assert params["ada_rms_norm_t_cond"] is True and params["ada_rms_norm_t_cond_dim"] == 32
    assert params["multimodal"]["whisper_model_args"]["downsample_args"] == {"downsample_factor": 4}
    assert enc["audio_encoding_args"]["num_mel_bins"] == 128


def test_params_json_of_full_size_config_is_the_real_file() -> None:
    # Same field order and formatting as Mistral's file: its sha256 is known (docs/model.md).
    real = VoxtralRealtimeConfig(audio_config={"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    text = params_json_text(real)
    assert len(text.encode()) == 1343
    assert hashlib.sha256(text.encode()).hexdigest() == REAL_PARAMS_SHA256


def _interleaved_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Original Mistral RoPE on [T, H, hd]: pairs (2i, 2i+1) rotated as complex numbers."""
    head_dim = x.shape[-1]
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    rotation = torch.polar(torch.ones(len(positions), head_dim // 2, dtype=torch.float64), positions[:, None] * freqs)
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], head_dim // 2, 2).contiguous())
    return torch.view_as_real(pairs * rotation[:, None, :]).reshape(x.shape)


@pytest.mark.parametrize("tower", ["audio_tower", "language_model"])
def test_mistral_qk_rows_are_interleaved_rope(
    model: VoxtralRealtimeForConditionalGeneration, mistral_dir: Path, tower: str
) -> None:
    """Attention logits from the Mistral q/k rows with interleaved RoPE equal HF's (rotate_half RoPE)."""
    from transformers.models.voxtral_realtime.modeling_voxtral_realtime import apply_rotary_pos_emb

    tensors = load_file(mistral_dir / "consolidated.safetensors")
    if tower == "audio_tower":
        hf_attn = model.model.audio_tower.layers[0].self_attn
        rotary = model.model.audio_tower.rotary_emb
        prefix = MISTRAL_PREFIX + "whisper_encoder.transformer.layers.0.attention."
        config = _sub_configs(model)[0]
    else:
        hf_attn = model.model.language_model.layers[0].self_attn
        rotary = model.model.language_model.rotary_emb
        prefix = "layers.0.attention."
        config = _sub_configs(model)[1]
    n_heads, n_kv, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    theta = config.rope_parameters["rope_theta"]

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(9, config.hidden_size, generator=generator, dtype=torch.float64)
    positions = torch.arange(9, dtype=torch.float64) * 7

    def project(weight: torch.Tensor, bias: torch.Tensor | None, heads: int) -> torch.Tensor:
        y = x @ weight.double().T + (0 if bias is None else bias.double())
        return y.reshape(len(x), heads, head_dim)

    def logits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:  # [T, H, hd] x [T, KV, hd] -> [H, T, T]
        k = k.repeat_interleave(n_heads // n_kv, dim=1)
        return torch.einsum("thd,shd->hts", q, k)

    with torch.no_grad():
        q_hf = project(hf_attn.q_proj.weight, hf_attn.q_proj.bias, n_heads)
        k_hf = project(hf_attn.k_proj.weight, hf_attn.k_proj.bias, n_kv)
        cos, sin = rotary(q_hf, positions.long()[None])
        q_rot, k_rot = apply_rotary_pos_emb(q_hf.transpose(0, 1)[None], k_hf.transpose(0, 1)[None], cos, sin)
        expected = logits(q_rot[0].transpose(0, 1), k_rot[0].transpose(0, 1))

    q_m = project(tensors[prefix + "wq.weight"], tensors.get(prefix + "wq.bias"), n_heads)
    k_m = project(tensors[prefix + "wk.weight"], tensors.get(prefix + "wk.bias"), n_kv)
    got = logits(_interleaved_rope(q_m, positions, theta), _interleaved_rope(k_m, positions, theta))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    # Control: HF's half-split rows under interleaved RoPE do not match, so the check above has teeth.
    wrong = logits(_interleaved_rope(q_hf, positions, theta), _interleaved_rope(k_hf, positions, theta))
    assert (wrong - expected).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------------------------
# transformers folder


def test_hf_folder_reloads(model: VoxtralRealtimeForConditionalGeneration, tekken_path: Path, tmp_path: Path) -> None:
    folder = write_hf_folder(model, tmp_path / "hf", tekken_path)
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tekken.json", "preprocessor_config.json"} <= names
    with safe_open(folder / "model.safetensors", "pt") as f:
        on_disk = set(f.keys())
    # transformers 5.23's on-disk names (docs/model.md, "Checkpoint layout"), tied lm_head not saved.
    assert all(k.startswith(("audio_tower.", "multi_modal_projector.", "language_model.model.")) for k in on_disk)

    reloaded = VoxtralRealtimeForConditionalGeneration.from_pretrained(folder)
    assert reloaded.lm_head.weight is reloaded.model.language_model.embed_tokens.weight
    audio_cfg, text_cfg = _sub_configs(reloaded)
    assert (audio_cfg.sliding_window, text_cfg.sliding_window) == (ENCODER_WINDOW, DECODER_WINDOW)
    assert audio_cfg.rope_parameters["rope_theta"] == 1e6
    expected, got = model.state_dict(), reloaded.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


# ---------------------------------------------------------------------------------------------------------------
# tekken.json


def test_tekken_loads_in_mistral_common(mistral_tokenizer: MistralTokenizer) -> None:
    import numpy as np
    from mistral_common.protocol.transcription.request import StreamingMode, TranscriptionRequest
    from mistral_common.tokens.tokenizers.audio import Audio

    tokenizer = mistral_tokenizer
    encoder = tokenizer.instruct_tokenizer.audio_encoder
    assert encoder is not None
    config = encoder.audio_config
    assert config.is_streaming
    assert config.get_num_delay_tokens() == 6
    assert config.n_right_pad_tokens() == 17
    assert config.n_left_pad_tokens == 32
    assert config.raw_audio_length_per_tok == 1280
    assert encoder.encode_streaming_tokens() == [32] * 38
    ids = encoder.special_ids
    assert (ids.audio, ids.begin_audio, ids.streaming_pad, ids.audio_to_text) == (24, 25, 32, 34)

    one_second = Audio(np.zeros(16000, dtype=np.float32), 16000, "wav").to_base64("wav")
    request = TranscriptionRequest(
        audio=one_second, streaming=StreamingMode.OFFLINE, language=None, target_streaming_delay_ms=None
    )
    encoded = tokenizer.encode_transcription(request)
    assert encoded.tokens == [1] + [32] * 38
    # 32 left-pad tokens, the audio aligned up to 1280 samples, 17 right-pad tokens.
    assert encoded.audios[0].audio_array.shape == (32 * 1280 + 16000 + 640 + 17 * 1280,)


def test_tekken_loads_as_tekkenizer(mistral_tokenizer: MistralTokenizer) -> None:
    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    # The Tekkenizer that MistralTokenizer.from_file built with Tekkenizer.from_file (a second load costs seconds).
    tekken = mistral_tokenizer.instruct_tokenizer.tokenizer
    assert isinstance(tekken, Tekkenizer)
    assert tekken.version.value == "v7"
    assert (tekken.num_special_tokens, tekken.n_words) == (1000, 131072)
    assert (tekken.unk_id, tekken.bos_id, tekken.eos_id, tekken.pad_id) == (0, 1, 2, 11)
    specials = {"[AUDIO]": 24, "[BEGIN_AUDIO]": 25, "[STREAMING_PAD]": 32, "[STREAMING_WORD]": 33,
                "[REPEAT_AUDIO_TEXT]": 34}  # fmt: skip
    assert {name: tekken.get_special_token(name) for name in specials} == specials
    ids = tekken.encode(" Hello world", bos=True, eos=False)
    assert ids[0] == 1 and all(i >= 1000 for i in ids[1:])
    assert tekken.decode([*ids, 33, 32], special_token_policy=SpecialTokenPolicy.IGNORE) == " Hello world"


def test_tekken_overrides(tmp_path: Path) -> None:
    from mistral_common.tokens.tokenizers.audio import AudioConfig, AudioSpectrogramConfig

    path = write_tekken_json(tmp_path, transcription_delay_ms=960, streaming_n_left_pad_tokens=16)
    assert path == tmp_path / "tekken.json"
    audio = json.loads(path.read_text())["audio"]
    # Parsed the way Tekkenizer.from_file parses it (without paying for the vocab).
    encoding = AudioSpectrogramConfig(**audio.pop("audio_encoding_config"))
    config = AudioConfig(encoding_config=encoding, **audio)
    assert config.get_num_delay_tokens() == 12
    assert config.n_right_pad_tokens() == 23
    assert config.n_left_pad_tokens == 16
    assert config.streaming_look_ahead_ms == 2.5 and config.streaming_look_back_ms == 52.5
