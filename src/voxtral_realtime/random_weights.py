"""Full-size (or any-size) networks with random weights, for benchmarks and load tests without the real files.

Timing does not depend on the values of the weights, so a random network of the real shapes measures what the
real one would.  Values are scaled (N(0, 1/fan_in), gains near 1) so activations stay finite in bf16.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .config import ModelConfig
from .loading import mistral_state_dict
from .model import VoxtralRealtime

#: params.json of mistralai/Voxtral-Mini-4B-Realtime-2602 (REFERENCE 1.1).
FULL_SIZE_PARAMS: dict[str, Any] = {
    "dim": 3072, "n_layers": 26, "head_dim": 128, "hidden_dim": 9216, "n_heads": 32, "n_kv_heads": 8,
    "use_biases": False, "causal": True, "rope_theta": 1e6, "norm_eps": 1e-5, "vocab_size": 131072,
    "model_parallel": 1, "tied_embeddings": True, "sliding_window": 8192, "model_max_length": 131072,
    "ada_rms_norm_t_cond": True, "ada_rms_norm_t_cond_dim": 32,
    "multimodal": {"whisper_model_args": {
        "encoder_args": {
            "dim": 1280, "n_layers": 32, "head_dim": 64, "hidden_dim": 5120, "n_heads": 32, "n_kv_heads": 32,
            "vocab_size": 131072, "use_biases": True, "use_cache": False, "rope_theta": 1e6, "causal": True,
            "norm_eps": 1e-5, "pos_embed": "rope", "max_source_positions": None, "ffn_type": "swiglu",
            "norm_type": "rms_norm", "sliding_window": 750,
            "audio_encoding_args": {"sampling_rate": 16000, "frame_rate": 12.5, "num_mel_bins": 128,
                                    "hop_length": 160, "window_size": 400, "chunk_length_s": None,
                                    "global_log_mel_max": 1.5, "transcription_format": "streaming"},
        },
        "downsample_args": {"downsample_factor": 4},
    }},
}


def full_size_config() -> ModelConfig:
    return ModelConfig.from_params_json(FULL_SIZE_PARAMS, None)


@torch.no_grad()
def random_network(config: ModelConfig, *, device: torch.device | str, dtype: torch.dtype,
                   seed: int = 0) -> VoxtralRealtime:
    """A network of ``config``'s shapes with random weights, allocated directly on ``device``."""
    with torch.device("meta"):
        network = VoxtralRealtime(config)
    network.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in network.named_parameters():
        if name.endswith("norm.weight"):
            param.normal_(1.0, 0.1, generator=generator)
        elif name.endswith("bias"):
            param.normal_(0.0, 0.1, generator=generator)
        elif "tok_embeddings" in name:
            param.normal_(0.0, 1.0, generator=generator)
        else:
            fan_in = param[0].numel()
            param.normal_(0.0, fan_in ** -0.5, generator=generator)
    network.to(dtype)
    network.rebuild_buffers()
    return network.eval()


def write_random_checkpoint(folder: Path, tekken_path: Path, *, params: dict[str, Any] | None = None,
                            dtype: torch.dtype = torch.bfloat16, device: str = "cpu", seed: int = 0) -> Path:
    """A Mistral-format folder (consolidated.safetensors, params.json, tekken.json) with random weights."""
    params = params or FULL_SIZE_PARAMS
    config = ModelConfig.from_params_json(params, None)
    network = random_network(config, device=device, dtype=dtype, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to("cpu") for k, v in mistral_state_dict(network).items()}
    del network
    save_file(tensors, str(folder / "consolidated.safetensors"))
    (folder / "params.json").write_text(json.dumps(params, indent=2))
    shutil.copyfile(tekken_path, folder / "tekken.json")
    return folder
