"""Full-size (or any-size) networks with random weights, for benchmarks and load tests without the real files.

Timing does not depend on the values of the weights, so a random network of the real shapes measures what the
real one would.  Values are scaled (N(0, 1/fan_in), gains near 1) so activations stay finite in bf16.
:func:`write_tekken_json` writes a synthetic tokenizer file that mistral-common loads like the real one.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import torch
from safetensors.torch import save_file

from ..config import ModelConfig
from ..loading import mistral_state_dict
from ..model import VoxtralRealtime

if TYPE_CHECKING:
    from ..api import Model

#: Special tokens named in the synthetic tekken.json, by rank (= token id); every other rank below 1000 is a
#: ``<SPECIAL_{i}>`` placeholder.  Ranks 0-19 are mistral-common's legacy layout (``Tekkenizer.
#: DEPRECATED_SPECIAL_TOKENS``), which agrees with every rank known from the real file (0, 1, 2, 11); they are
#: needed because the v7 instruct tokenizer that ``MistralTokenizer.from_file`` builds looks up [INST], [/INST],
#: [AVAILABLE_TOOLS], [/AVAILABLE_TOOLS], [TOOL_RESULTS], [/TOOL_RESULTS], [TOOL_CALLS], [PREFIX], [SUFFIX],
#: [SYSTEM_PROMPT], [/SYSTEM_PROMPT] and [TOOL_CONTENT] by name and fails without them.  24, 25, 32, 33, 34 are
#: the real Voxtral Realtime ranks (REFERENCE §6.1).  [NEXT_AUDIO_TEXT] and [TRANSCRIBE] are left out: their real
#: ranks are unknown, and mistral-common needs them only for speech synthesis and non-streaming transcription.
SPECIAL_TOKENS: Final[dict[int, str]] = {
    0: "<unk>",
    1: "<s>",
    2: "</s>",
    3: "[INST]",
    4: "[/INST]",
    5: "[AVAILABLE_TOOLS]",
    6: "[/AVAILABLE_TOOLS]",
    7: "[TOOL_RESULTS]",
    8: "[/TOOL_RESULTS]",
    9: "[TOOL_CALLS]",
    10: "[IMG]",
    11: "<pad>",
    12: "[IMG_BREAK]",
    13: "[IMG_END]",
    14: "[PREFIX]",
    15: "[MIDDLE]",
    16: "[SUFFIX]",
    17: "[SYSTEM_PROMPT]",
    18: "[/SYSTEM_PROMPT]",
    19: "[TOOL_CONTENT]",
    24: "[AUDIO]",
    25: "[BEGIN_AUDIO]",
    32: "[STREAMING_PAD]",
    33: "[STREAMING_WORD]",
    34: "[REPEAT_AUDIO_TEXT]",
}

NUM_SPECIAL_TOKENS: Final = 1000

#: The real file's ``audio`` block (REFERENCE §8), in its key order.
AUDIO_BLOCK: Final[dict[str, Any]] = {
    "sampling_rate": 16000,
    "frame_rate": 12.5,
    "audio_encoding_config": {"num_mel_bins": 128, "hop_length": 160, "window_size": 400},
    "transcription_delay_ms": 480,
    "streaming_look_ahead_ms": 2.5,
    "streaming_look_back_ms": 52.5,
    "streaming_n_left_pad_tokens": 32,
    "transcription_format": "streaming",
}

# The version must be v7: it is the newest that mistral-common accepts without [ARGS]/[CALL_ID] specials, and
# the oldest that supports audio.  (The real file's version string is unknown.)
_TEKKEN_VERSION: Final = "v7"


@functools.cache
def _base_tekken() -> tuple[dict[str, Any], str]:
    """``config`` and ``vocab`` of mistral-common's bundled ``tekken_240718.json`` (150k-entry vocab,
    131072/1000 layout), read once per process.

    The vocab dominates the file, so it is kept as its ``json.dumps`` text, to be spliced into each file written
    (the result is exactly what ``json.dumps`` of the whole content would give).  Callers must not mutate the
    config: it is shared.
    """
    source = importlib.resources.files("mistral_common") / "data" / "tekken_240718.json"
    base = json.loads(source.read_text(encoding="utf-8"))
    return base["config"], json.dumps(base["vocab"])


_VOCAB_PLACEHOLDER: Final = "@@VOCAB@@"


def write_tekken_json(
    path: Path,
    *,
    transcription_delay_ms: float | None = None,
    streaming_n_left_pad_tokens: int | None = None,
) -> Path:
    """Write a synthetic streaming ``tekken.json`` that mistral-common loads like the real one.

    Pattern, vocab and sizes come from mistral-common's bundled ``tekken_240718.json``; ``version`` is "v7"; the
    1000 specials are listed explicitly (:data:`SPECIAL_TOKENS`, placeholders elsewhere, all control tokens);
    the ``audio`` block is the real one (:data:`AUDIO_BLOCK`), with the two given fields overridden.  Values are
    written as given: mistral-common itself rejects a delay that is not a positive multiple of 80 ms.

    Args:
        path: the file to write.  mistral-common only treats a file as tekken when its name contains "tekken"
            and ends in ".json"; a folder is given the name ``tekken.json``.
        transcription_delay_ms: overrides the real 480 ms.
        streaming_n_left_pad_tokens: overrides the real 32.

    Returns:
        The path written.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "tekken.json"
    base_config, vocab_json = _base_tekken()
    audio = json.loads(json.dumps(AUDIO_BLOCK))  # deep copy: the constant must stay intact
    if transcription_delay_ms is not None:
        audio["transcription_delay_ms"] = transcription_delay_ms
    if streaming_n_left_pad_tokens is not None:
        audio["streaming_n_left_pad_tokens"] = streaming_n_left_pad_tokens
    content = {
        "config": {**base_config, "version": _TEKKEN_VERSION},
        "vocab": _VOCAB_PLACEHOLDER,
        "special_tokens": [
            {"rank": rank, "token_str": SPECIAL_TOKENS.get(rank, f"<SPECIAL_{rank}>"), "is_control": True}
            for rank in range(NUM_SPECIAL_TOKENS)
        ],
        "audio": audio,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(content).replace(json.dumps(_VOCAB_PLACEHOLDER), vocab_json, 1)
    path.write_text(text, encoding="utf-8")
    return path


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


def random_model(*, device: torch.device | str, dtype: torch.dtype, params: dict[str, Any] | None = None,
                 seed: int = 0) -> Model:
    """A ready :class:`Model` of ``params``' shapes (default: the real model's) with random weights and the
    synthetic tokenizer: for benchmarks on machines without the real files."""
    import tempfile

    from ..api import Model
    from ..tokenizer import Tokenizer

    with tempfile.TemporaryDirectory(prefix="voxtral-random-") as folder:
        tekken = write_tekken_json(Path(folder) / "tekken.json")
        config = ModelConfig.from_params_json(params or FULL_SIZE_PARAMS, dict(AUDIO_BLOCK))
        tokenizer = Tokenizer(tekken)
    network = random_network(config, device=device, dtype=dtype, seed=seed)
    return Model(network, tokenizer, source="random weights")
