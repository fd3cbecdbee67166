"""Full-size (or any-size) networks with random weights, for benchmarks and load tests without the real files.

Timing does not depend on the values of the weights, so a random network of the real shapes measures what the
real one would.  Values are scaled (N(0, 1/fan_in), gains near 1) so activations stay finite in bf16.
:func:`write_tekken_json` writes a synthetic tokenizer file that mistral-common loads like the real one.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import math
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

import torch
from safetensors.torch import save_file

from ..api import Model
from ..config import FULL_SIZE_PARAMS, ModelConfig
from ..gguf_file import (
    KEY_EMBEDDINGS,
    KEY_PARAMS,
    KEY_QUANTIZATION,
    KEY_TOKENIZER,
    Progress,
    checked_options,
    plan_tensors,
    write_tensors,
)
from ..loading import mistral_layout, mistral_state_dict
from ..model import VoxtralRealtime
from ..tokenizer import Tokenizer

#: Special tokens named in the synthetic tekken.json, by rank (= token id); every other rank below 1000 is a
#: ``<SPECIAL_{i}>`` placeholder.  Ranks 0-19 are mistral-common's legacy layout (``Tekkenizer.
#: DEPRECATED_SPECIAL_TOKENS``, consistent with the real file's known ranks), which the v7 instruct tokenizer
#: looks up by name; 24-34 are the real Voxtral Realtime ranks (docs/model.md).  [NEXT_AUDIO_TEXT] and
#: [TRANSCRIBE] are left out: their real ranks are unknown, and streaming transcription does not use them.
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

#: The real file's ``audio`` block (docs/model.md, "Tokenizer file"), in its key order.
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


def random_init(name: str, shape: tuple[int, ...] | torch.Size) -> tuple[float, float]:
    """(mean, std) of a random weight by its name: norm gains near 1, small biases, an N(0, 1) token table and
    N(0, 1/fan_in) elsewhere, so activations stay finite in bf16."""
    if name.endswith("norm.weight"):
        return 1.0, 0.1
    if name.endswith("bias"):
        return 0.0, 0.1
    if name.endswith("tok_embeddings.weight"):
        return 0.0, 1.0
    return 0.0, math.prod(shape[1:]) ** -0.5


@torch.no_grad()
def random_network(config: ModelConfig, *, device: torch.device | str, dtype: torch.dtype,
                   seed: int = 0) -> VoxtralRealtime:
    """A network of ``config``'s shapes with random weights, allocated directly on ``device``."""
    with torch.device("meta"):
        network = VoxtralRealtime(config)
    network.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in network.named_parameters():
        param.normal_(*random_init(name, param.shape), generator=generator)
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
    with tempfile.TemporaryDirectory(prefix="voxtral-random-") as folder:
        tekken = write_tekken_json(Path(folder) / "tekken.json")
        config = ModelConfig.from_params_json(params or FULL_SIZE_PARAMS, dict(AUDIO_BLOCK))
        tokenizer = Tokenizer(tekken)
    network = random_network(config, device=device, dtype=dtype, seed=seed)
    return Model(network, tokenizer, source="random weights")


def write_random_gguf(config: ModelConfig, params: dict[str, Any], tekken_path: Path, out: str | os.PathLike[str],
                      *, qtype: str = "q4_0", embeddings: str = "same", seed: int = 0,
                      progress: Progress | None = None) -> list[Path]:
    """A GGUF of ``config``'s shapes with random weights (as :func:`random_network` draws them),
    made one tensor at a time: a full-size quantized file for memory and speed measurements without the real
    checkpoint and without ever holding the float model."""
    embeddings, out = checked_options(qtype, embeddings, out)
    tensors = _RandomTensors(config, seed)
    metadata = {KEY_PARAMS: json.dumps(params), KEY_TOKENIZER: tekken_path.read_text("utf-8"),
                KEY_QUANTIZATION: qtype, KEY_EMBEDDINGS: embeddings, "general.name": "random weights"}
    planned = plan_tensors(config, mistral_layout(config, set()), tensors, qtype, embeddings, True)
    return write_tensors(tensors, planned, metadata, out, None, progress)


class _RandomTensors:
    """Random stand-ins for a Mistral checkpoint's tensors, by name (:func:`random_init`); each tensor is drawn when
    asked for, in blocks of rows with seeds of their own, in parallel (one generator draws sequentially: a
    full-size model's 4.4G values would take a minute of one core)."""

    def __init__(self, config: ModelConfig, seed: int) -> None:
        with torch.device("meta"):
            network = VoxtralRealtime(config)
        self._shapes: dict[str, tuple[int, ...]] = {}
        params = {name: tuple(p.shape) for name, p in network.named_parameters()}
        for name, parts in mistral_layout(config, set()).items():
            for part in parts:
                if part.key is not None:
                    self._shapes[part.key] = (part.rows or params[name][0], *params[name][1:])
        self._seed = seed

    def keys(self) -> set[str]:
        return set(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def get(self, key: str) -> torch.Tensor:
        seed = self._seed * 1_000_003 + sum(map(ord, key)) * 7919 + len(key)
        mean, std = random_init(key, self._shapes[key])
        tensor = torch.empty(self._shapes[key])
        rows = tensor.reshape(tensor.shape[0], -1)
        step = max(1, _RANDOM_BLOCK_VALUES // rows.shape[1])

        def draw(start: int) -> None:
            rows[start:start + step].normal_(mean, std, generator=torch.Generator().manual_seed(seed * 65_537 + start))

        with ThreadPoolExecutor(torch.get_num_threads()) as pool:
            list(pool.map(draw, range(0, rows.shape[0], step)))
        return tensor

    def close(self) -> None:
        pass


_RANDOM_BLOCK_VALUES: Final = 1 << 20  # values drawn per seed
