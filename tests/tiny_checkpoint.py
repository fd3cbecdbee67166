"""Tiny random Voxtral Realtime checkpoints in the real on-disk formats, built with transformers as ground truth.

Plain functions, no pytest fixtures, so tests, benchmarks and scripts can all use them:

* :func:`write_tekken_json` writes a synthetic ``tekken.json`` that mistral-common loads as the real streaming
  tokenizer (same ids for every special token that matters, same audio block).  Building it takes seconds:
  callers should reuse one file, e.g. through :func:`cached_tekken_json`.
* :func:`make_hf_model` builds the tiny ``VoxtralRealtimeForConditionalGeneration`` (docs/model.md, "Test
  checkpoints") with every parameter re-randomised (so that biases, norm gains and the q/k permutation all matter).
* :func:`write_mistral_folder` writes what Mistral publishes: ``consolidated.safetensors`` (Mistral key names,
  interleaved-RoPE q/k rows), ``params.json`` and ``tekken.json``.
* :func:`write_hf_folder` writes the transformers layout: ``config.json``, ``model.safetensors``,
  ``generation_config.json``, ``preprocessor_config.json`` and ``tekken.json``.

The pieces are public too: :func:`make_hf_config`, :func:`mistral_state_dict` (Mistral names and layout, in
memory), :func:`mistral_params` / :func:`params_json_text` (for the full-size config the latter reproduces the
real params.json byte for byte, sha256 2ace010e...).

Typical use::

    tekken = cached_tekken_json()
    model = make_hf_model(encoder_window=12, decoder_window=10)
    mistral_dir = write_mistral_folder(model, tmp_path / "mistral", tekken)
    hf_dir = write_hf_folder(model, tmp_path / "hf", tekken)
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import torch
from torch import nn

from voxtral_realtime.benchmarking.random_weights import AUDIO_BLOCK, SPECIAL_TOKENS, write_tekken_json

if TYPE_CHECKING:
    from transformers import VoxtralRealtimeConfig, VoxtralRealtimeForConditionalGeneration

__all__ = [
    "AUDIO_BLOCK",
    "MISTRAL_PREFIX",
    "SPECIAL_TOKENS",
    "cached_tekken_json",
    "make_hf_config",
    "make_hf_model",
    "mistral_params",
    "mistral_state_dict",
    "params_json_text",
    "write_hf_folder",
    "write_mistral_folder",
    "write_tekken_json",
]

# ---------------------------------------------------------------------------------------------------------------
# tekken.json (the writer lives in the package, for benchmarks with random weights)

# Keeps the cached files' folders alive until the interpreter exits (TemporaryDirectory removes them then).
_CACHE_DIRS: list[tempfile.TemporaryDirectory[str]] = []


@functools.cache
def cached_tekken_json(
    *, transcription_delay_ms: float | None = None, streaming_n_left_pad_tokens: int | None = None
) -> Path:
    """:func:`write_tekken_json` into a private temporary folder, once per process and argument set.

    Treat the returned file as read-only: every caller in the process shares it.
    """
    folder = tempfile.TemporaryDirectory(prefix="tiny-tekken-")
    _CACHE_DIRS.append(folder)
    return write_tekken_json(
        Path(folder.name) / "tekken.json",
        transcription_delay_ms=transcription_delay_ms,
        streaming_n_left_pad_tokens=streaming_n_left_pad_tokens,
    )


# ---------------------------------------------------------------------------------------------------------------
# The tiny transformers model

_ROPE: Final[dict[str, Any]] = {"rope_type": "default", "rope_theta": 1e6}


def make_hf_config(
    *, encoder_window: int = 750, decoder_window: int = 8192, audio_layers: int = 2, text_layers: int = 2,
    vocab_size: int = 131072,
) -> VoxtralRealtimeConfig:
    """The tiny ``VoxtralRealtimeConfig`` of docs/model.md ("Test checkpoints") (real windows by default).

    Every size is set explicitly: sub-config dicts are merged over the full-size defaults, so an omitted
    head_dim would silently stay 64/128, and the encoder's RoPE theta would default to 10000 instead of 1e6.
    """
    from transformers import VoxtralRealtimeConfig

    return VoxtralRealtimeConfig(
        audio_config={
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": audio_layers,
            "num_attention_heads": 4,
            "head_dim": 16,
            "num_mel_bins": 128,  # the log-mel front end is fixed at 128 bins
            "sliding_window": encoder_window,
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 16384,
            "rope_parameters": dict(_ROPE),
        },
        text_config={
            # 131072 matches tekken.json; a smaller vocab (>= 1000 specials + some text) is still a valid model
            # whose ids all decode, and keeps the LM head from dominating CPU test time.
            "vocab_size": vocab_size,
            "hidden_size": 64,
            "intermediate_size": 192,
            "num_hidden_layers": text_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "rms_norm_eps": 1e-5,
            "sliding_window": decoder_window,
            "max_position_embeddings": 131072,
            "tie_word_embeddings": True,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "rope_parameters": dict(_ROPE),
        },
        projector_hidden_act="gelu",
        audio_length_per_tok=8,
        default_num_delay_tokens=6,
        downsample_factor=4,
        tie_word_embeddings=True,
    )


def make_hf_model(
    *,
    encoder_window: int = 750,
    decoder_window: int = 8192,
    seed: int = 1234,
    audio_layers: int = 2,
    text_layers: int = 2,
    vocab_size: int = 131072,
    dtype: torch.dtype = torch.float32,
) -> VoxtralRealtimeForConditionalGeneration:
    """The tiny random model (docs/model.md, "Test checkpoints"), in eval mode, every parameter re-randomised from
    ``seed``.

    HF's default init leaves biases at 0 and norm gains at 1, which would hide missing-bias and q/k-permutation
    bugs.  Instead (drawn in float32 from one seeded generator, in module order, then cast to ``dtype``):

    * linear weights ~ N(0, 1/fan_in); the ada-norm linears 3x that std, so the delay conditioning matters;
    * conv weights ~ N(0, 1/(in_channels * kernel_size));
    * every bias ~ N(0, 0.3²);
    * norm gains ~ 1 + N(0, 0.3²);
    * the (tied) token embedding ~ N(0, 1).

    With one torch build, the same arguments always give bit-identical weights.
    """
    from transformers import VoxtralRealtimeForConditionalGeneration
    from transformers.initialization import no_init_weights

    config = make_hf_config(
        encoder_window=encoder_window,
        decoder_window=decoder_window,
        audio_layers=audio_layers,
        text_layers=text_layers,
        vocab_size=vocab_size,
    )
    # HF's own init (about 1 s of CPU, mostly the 131072-row embedding) is overwritten below anyway.  Skipping
    # it also skips the tying, hence tie_weights(); the buffers (RoPE and time-embedding inv_freq) are computed
    # in the constructors either way.
    with no_init_weights():
        model = VoxtralRealtimeForConditionalGeneration(config)
    model.tie_weights()
    _check_layout(model)
    _randomize_(model, seed)
    return model.to(dtype=dtype).eval()  # type: ignore[call-arg]  # transformers wraps .to; mypy misreads it


def _check_layout(model: VoxtralRealtimeForConditionalGeneration) -> None:
    """Fail loudly if transformers' module layout differs from the one the writers here encode."""
    layer = model.model.audio_tower.layers[0]
    attn = layer.self_attn
    expected_bias = {
        "encoder q_proj": (attn.q_proj, True),
        "encoder k_proj": (attn.k_proj, False),
        "encoder v_proj": (attn.v_proj, True),
        "encoder o_proj": (attn.o_proj, True),
        "encoder mlp.gate_proj": (layer.mlp.gate_proj, False),
        "encoder mlp.up_proj": (layer.mlp.up_proj, False),
        "encoder mlp.down_proj": (layer.mlp.down_proj, True),
        "conv1": (model.model.audio_tower.embedder.conv1, True),
        "conv2": (model.model.audio_tower.embedder.conv2, True),
    }
    for what, (module, has_bias) in expected_bias.items():
        if (module.bias is not None) != has_bias:
            raise RuntimeError(f"transformers layout changed: {what} bias={module.bias is not None}")
    if model.lm_head.weight is not model.model.language_model.embed_tokens.weight:
        raise RuntimeError("transformers layout changed: lm_head is not tied to embed_tokens")


@torch.no_grad()
def _randomize_(model: nn.Module, seed: int) -> None:
    """Re-draw every parameter of ``model`` in place (see :func:`make_hf_model` for the distributions)."""
    generator = torch.Generator().manual_seed(seed)
    done: set[int] = set()

    def draw(param: torch.Tensor | None, std: float, mean: float = 0.0) -> None:
        # Tied parameters (lm_head = embed_tokens) are drawn once, by the first module that owns them.
        if param is None or id(param) in done:
            return
        sample = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        param.copy_(sample * std + mean)
        done.add(id(param))

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv1d):
            in_channels, kernel = module.weight.shape[1], module.weight.shape[2]
            draw(module.weight, (in_channels * kernel) ** -0.5)
            draw(module.bias, 0.3)
        elif isinstance(module, nn.Linear):
            scale = 3.0 if ".ada_rms_norm." in f".{name}." else 1.0
            draw(module.weight, scale * module.in_features**-0.5)
            draw(module.bias, 0.3)
        elif isinstance(module, nn.Embedding):
            draw(module.weight, 1.0)
        elif type(module).__name__.endswith("RMSNorm"):
            draw(module.weight, 0.3, mean=1.0)

    missed = [name for name, param in model.named_parameters() if id(param) not in done]
    if missed:
        raise RuntimeError(f"parameters of unknown kind were not re-randomised: {missed}")


# ---------------------------------------------------------------------------------------------------------------
# Mistral format

MISTRAL_PREFIX: Final = "mm_streams_embeddings.embedding_module."

# (HF suffix under model.audio_tower.layers.{i}., Mistral suffix under PFX whisper_encoder.transformer.layers.{i}.)
_ENCODER_LAYER_KEYS: Final = (
    ("self_attn.q_proj.weight", "attention.wq.weight"),
    ("self_attn.q_proj.bias", "attention.wq.bias"),
    ("self_attn.k_proj.weight", "attention.wk.weight"),
    ("self_attn.v_proj.weight", "attention.wv.weight"),
    ("self_attn.v_proj.bias", "attention.wv.bias"),
    ("self_attn.o_proj.weight", "attention.wo.weight"),
    ("self_attn.o_proj.bias", "attention.wo.bias"),
    ("self_attn_layer_norm.weight", "attention_norm.weight"),
    ("final_layer_norm.weight", "ffn_norm.weight"),
    ("mlp.gate_proj.weight", "feed_forward.w1.weight"),
    ("mlp.down_proj.weight", "feed_forward.w2.weight"),
    ("mlp.down_proj.bias", "feed_forward.w2.bias"),
    ("mlp.up_proj.weight", "feed_forward.w3.weight"),
)

# (HF suffix under model.language_model.layers.{i}., Mistral suffix under layers.{i}.)
_DECODER_LAYER_KEYS: Final = (
    ("input_layernorm.weight", "attention_norm.weight"),
    ("self_attn.q_proj.weight", "attention.wq.weight"),
    ("self_attn.k_proj.weight", "attention.wk.weight"),
    ("self_attn.v_proj.weight", "attention.wv.weight"),
    ("self_attn.o_proj.weight", "attention.wo.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("mlp.gate_proj.weight", "feed_forward.w1.weight"),
    ("mlp.down_proj.weight", "feed_forward.w2.weight"),
    ("mlp.up_proj.weight", "feed_forward.w3.weight"),
    ("ada_rms_norm.linear1.weight", "ada_rms_norm_t_cond.0.weight"),
    ("ada_rms_norm.linear2.weight", "ada_rms_norm_t_cond.2.weight"),
)

# Global tensors: (HF key, Mistral key).  The tied lm_head is not stored (the real file has no output.weight).
_GLOBAL_KEYS: Final = (
    ("model.language_model.embed_tokens.weight", MISTRAL_PREFIX + "tok_embeddings.weight"),
    ("model.audio_tower.embedder.conv1.weight", MISTRAL_PREFIX + "whisper_encoder.conv_layers.0.conv.weight"),
    ("model.audio_tower.embedder.conv1.bias", MISTRAL_PREFIX + "whisper_encoder.conv_layers.0.conv.bias"),
    ("model.audio_tower.embedder.conv2.weight", MISTRAL_PREFIX + "whisper_encoder.conv_layers.1.conv.weight"),
    ("model.audio_tower.embedder.conv2.bias", MISTRAL_PREFIX + "whisper_encoder.conv_layers.1.conv.bias"),
    ("model.audio_tower.norm.weight", MISTRAL_PREFIX + "whisper_encoder.transformer.norm.weight"),
    ("model.multi_modal_projector.linear_1.weight", MISTRAL_PREFIX + "audio_language_projection.0.weight"),
    ("model.multi_modal_projector.linear_2.weight", MISTRAL_PREFIX + "audio_language_projection.2.weight"),
    ("model.language_model.norm.weight", "norm.weight"),
)

# The ada-norm bottleneck is a constant of the architecture (transformers hard-codes it too).
_ADA_DIM: Final = 32


def _sub_configs(config: VoxtralRealtimeConfig) -> tuple[Any, Any]:
    """(audio_config, text_config).  transformers types them as ``dict | PreTrainedConfig | None``; once the
    config is built they are always config objects."""
    return config.audio_config, config.text_config


def _to_interleaved(tensor: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo HF's RoPE row permutation: HF row c*(hd/2)+i of each head goes back to Mistral row 2i+c.

    HF stores each head's q/k rows as [all even rows, then all odd rows] for its half-split rotate_half RoPE;
    Mistral stores them in the original interleaved (complex-pair) order.  Works on weights and on biases.
    """
    head_dim = tensor.shape[0] // n_heads
    split = tensor.reshape(n_heads, 2, head_dim // 2, *tensor.shape[1:])
    return split.transpose(1, 2).reshape(tensor.shape)


def _key_map(config: VoxtralRealtimeConfig) -> Iterator[tuple[str, str, int | None]]:
    """(HF key, Mistral key, heads to un-permute or None) for every tensor the Mistral file holds."""
    audio, text = _sub_configs(config)
    for hf_key, mistral_key in _GLOBAL_KEYS:
        yield hf_key, mistral_key, None
    for i in range(audio.num_hidden_layers):
        for hf_suffix, mistral_suffix in _ENCODER_LAYER_KEYS:
            # The encoder is MHA: q, its bias and k all have num_attention_heads heads.
            heads = audio.num_attention_heads if hf_suffix.startswith(("self_attn.q_", "self_attn.k_")) else None
            yield (
                f"model.audio_tower.layers.{i}.{hf_suffix}",
                f"{MISTRAL_PREFIX}whisper_encoder.transformer.layers.{i}.{mistral_suffix}",
                heads,
            )
    for i in range(text.num_hidden_layers):
        for hf_suffix, mistral_suffix in _DECODER_LAYER_KEYS:
            heads = {
                "self_attn.q_proj.weight": text.num_attention_heads,
                "self_attn.k_proj.weight": text.num_key_value_heads,
            }.get(hf_suffix)
            yield f"model.language_model.layers.{i}.{hf_suffix}", f"layers.{i}.{mistral_suffix}", heads


def mistral_state_dict(
    model: VoxtralRealtimeForConditionalGeneration, *, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """The model's weights under Mistral key names (docs/model.md, "Checkpoint layout"), q/k rows in interleaved-RoPE
    order.

    The token embedding is stored once, under the ``mm_streams_embeddings`` prefix; there is no
    ``output.weight``.  Raises if any HF tensor would be left out, so a transformers layout change cannot
    silently produce an incomplete checkpoint.  Tensors that need no permutation or cast share memory with the
    model (copying them costs noticeable time on slow machines): do not modify them in place.
    """
    source = model.state_dict()
    if source["lm_head.weight"].data_ptr() != source["model.language_model.embed_tokens.weight"].data_ptr():
        raise ValueError("lm_head is not tied to embed_tokens: the Mistral format cannot represent that")
    out: dict[str, torch.Tensor] = {}
    used = {"lm_head.weight"}
    for hf_key, mistral_key, heads in _key_map(model.config):
        tensor = source[hf_key].detach()
        if heads is not None:
            tensor = _to_interleaved(tensor, heads)
        out[mistral_key] = tensor.to(device="cpu", dtype=dtype).contiguous()
        used.add(hf_key)
    if unused := sorted(set(source) - used):
        raise RuntimeError(f"HF tensors with no Mistral name: {unused}")
    for key in (k for k in out if "ada_rms_norm_t_cond.0." in k):
        if out[key].shape[0] != _ADA_DIM:
            raise RuntimeError(f"{key}: ada bottleneck {out[key].shape[0]} != {_ADA_DIM}")
    return out


def mistral_params(config: VoxtralRealtimeConfig) -> dict[str, Any]:
    """``params.json`` for ``config``: the real file's structure, field names and field order (docs/model.md).

    For the full-size config, ``params_json_text`` of this reproduces the real file byte for byte.
    """
    audio, text = _sub_configs(config)
    return {
        "dim": text.hidden_size,
        "n_layers": text.num_hidden_layers,
        "head_dim": text.head_dim,
        "hidden_dim": text.intermediate_size,
        "n_heads": text.num_attention_heads,
        "n_kv_heads": text.num_key_value_heads,
        "use_biases": False,
        "causal": True,
        "rope_theta": float(text.rope_parameters["rope_theta"]),
        "norm_eps": float(text.rms_norm_eps),
        "vocab_size": text.vocab_size,
        "model_parallel": 1,
        "tied_embeddings": True,
        "sliding_window": int(text.sliding_window),
        "model_max_length": text.max_position_embeddings,
        "multimodal": {
            "whisper_model_args": {
                "encoder_args": {
                    "audio_encoding_args": {
                        "sampling_rate": AUDIO_BLOCK["sampling_rate"],
                        "frame_rate": AUDIO_BLOCK["frame_rate"],
                        "num_mel_bins": audio.num_mel_bins,
                        "hop_length": AUDIO_BLOCK["audio_encoding_config"]["hop_length"],
                        "window_size": AUDIO_BLOCK["audio_encoding_config"]["window_size"],
                        "chunk_length_s": None,
                        "global_log_mel_max": 1.5,
                        "transcription_format": "streaming",
                    },
                    "dim": audio.hidden_size,
                    "n_layers": audio.num_hidden_layers,
                    "head_dim": audio.head_dim,
                    "hidden_dim": audio.intermediate_size,
                    "n_heads": audio.num_attention_heads,
                    "vocab_size": audio.vocab_size,
                    "n_kv_heads": audio.num_key_value_heads,
                    "use_biases": True,
                    "use_cache": False,
                    "rope_theta": float(audio.rope_parameters["rope_theta"]),
                    "causal": True,
                    "norm_eps": float(audio.rms_norm_eps),
                    "pos_embed": "rope",
                    "max_source_positions": None,
                    "ffn_type": "swiglu",
                    "norm_type": "rms_norm",
                    "sliding_window": int(audio.sliding_window),
                },
                "downsample_args": {"downsample_factor": config.downsample_factor},
            }
        },
        "ada_rms_norm_t_cond": True,
        "ada_rms_norm_t_cond_dim": _ADA_DIM,
    }


def params_json_text(config: VoxtralRealtimeConfig) -> str:
    """The text of ``params.json``, formatted like the real file (2-space indent, trailing newline)."""
    return json.dumps(mistral_params(config), indent=2) + "\n"


def write_mistral_folder(
    model: VoxtralRealtimeForConditionalGeneration,
    out_dir: Path,
    tekken_path: Path,
    *,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``model`` as Mistral publishes the real one: ``consolidated.safetensors``, ``params.json``,
    ``tekken.json`` (a copy of ``tekken_path``).

    Args:
        dtype: the stored dtype of every tensor (the real file is all bfloat16; float32 keeps the weights
            bit-identical to an fp32 model).

    Returns:
        ``out_dir``.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(mistral_state_dict(model, dtype=dtype), str(out_dir / "consolidated.safetensors"))
    (out_dir / "params.json").write_text(params_json_text(model.config), encoding="utf-8")
    shutil.copyfile(tekken_path, out_dir / "tekken.json")
    return out_dir


# ---------------------------------------------------------------------------------------------------------------
# transformers format


def write_hf_folder(
    model: VoxtralRealtimeForConditionalGeneration,
    out_dir: Path,
    tekken_path: Path,
    *,
    feature_extractor: bool = True,
) -> Path:
    """Write ``model`` in the transformers layout: ``save_pretrained`` (``config.json``,
    ``generation_config.json``, ``model.safetensors`` in the model's dtype), a copy of ``tekken_path`` as
    ``tekken.json`` and, unless ``feature_extractor`` is False, the default (= real) feature extractor's
    ``preprocessor_config.json``.

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    if feature_extractor:
        from transformers import VoxtralRealtimeFeatureExtractor

        VoxtralRealtimeFeatureExtractor().save_pretrained(out_dir)
    shutil.copyfile(tekken_path, out_dir / "tekken.json")
    return out_dir
