"""The reference implementation (transformers' ``VoxtralRealtimeForConditionalGeneration``) holding our network's
weights: what ``voxtral bench --compare transformers`` times against.  Needs ``transformers`` (not a dependency of
the package)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import VoxtralError
from ..loading import export_state_dict, hf_layout
from ..protocol import padded_audio, prompt_ids

if TYPE_CHECKING:
    from ..api import Model


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise VoxtralError("--compare transformers needs the transformers package: pip install transformers") from None
    if not hasattr(transformers, "VoxtralRealtimeForConditionalGeneration"):
        raise VoxtralError(f"transformers {transformers.__version__} has no Voxtral Realtime model; upgrade it")
    return transformers


def reference_model(model: Model) -> Any:
    """A transformers model with ``model``'s config and weights, on its device and dtype."""
    transformers = _transformers()
    from transformers.initialization import no_init_weights

    cfg = model.config
    e, d, a = cfg.encoder, cfg.decoder, cfg.audio
    config = transformers.VoxtralRealtimeConfig(
        audio_config={
            "hidden_size": e.dim, "intermediate_size": e.hidden_dim, "num_hidden_layers": e.n_layers,
            "num_attention_heads": e.n_heads, "head_dim": e.head_dim, "num_mel_bins": e.num_mel_bins,
            "sliding_window": e.sliding_window, "rms_norm_eps": e.norm_eps, "max_position_embeddings": 16384,
            "rope_parameters": {"rope_type": "default", "rope_theta": e.rope_theta},
        },
        text_config={
            "vocab_size": d.vocab_size, "hidden_size": d.dim, "intermediate_size": d.hidden_dim,
            "num_hidden_layers": d.n_layers, "num_attention_heads": d.n_heads, "num_key_value_heads": d.n_kv_heads,
            "head_dim": d.head_dim, "rms_norm_eps": d.norm_eps, "sliding_window": d.sliding_window,
            "max_position_embeddings": 131072, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": d.rope_theta},
        },
        projector_hidden_act="gelu", audio_length_per_tok=a.mel_frames_per_token,
        default_num_delay_tokens=a.delay_tokens(), downsample_factor=a.downsample_factor, tie_word_embeddings=True,
    )
    with no_init_weights(), torch.device(model.device):
        hf = transformers.VoxtralRealtimeForConditionalGeneration(config).to(model.dtype)
    weights = export_state_dict(model.network, hf_layout(cfg, {"model.audio_tower."}))
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    hf.tie_weights()
    if unexpected or any(not name.startswith("lm_head.") for name in missing):
        raise VoxtralError(f"reference model layout differs: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return hf.eval()


@torch.no_grad()
def reference_transcribe(hf: Any, model: Model, audio: np.ndarray, *, delay_ms: int | None = None) -> list[int]:
    """The reference's offline streaming transcription of ``audio`` (padding as mistral-common does): tokens."""
    transformers = _transformers()
    cfg = model.config.audio
    delay = cfg.delay_tokens(delay_ms)
    padded = padded_audio(cfg, audio, delay)
    features = transformers.VoxtralRealtimeFeatureExtractor()(padded, sampling_rate=cfg.sample_rate,
                                                              return_tensors="pt").input_features
    tok = model.tokenizer
    ids = torch.tensor([prompt_ids(tok, cfg, delay)], device=model.device)
    out = hf.generate(input_ids=ids, input_features=features.to(model.device, model.dtype), num_delay_tokens=delay,
                      do_sample=False)
    return out[0, ids.shape[1]:].tolist()
