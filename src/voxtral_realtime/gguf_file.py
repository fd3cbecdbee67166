"""GGUF files: writing a quantized model (``voxtral quantize``) and loading one, ours or the Rust project's.

**Tensors** keep the Mistral checkpoint's names and row order (REFERENCE 7.1; q/k rows in interleaved-RoPE order),
as the Rust project's ``voxtral-q4.gguf`` does, so one name table (:func:`loading.mistral_layout`) reads both and
the loader applies the same q/k row permutation as for ``consolidated.safetensors``.  Dims are stored in ggml's
reversed order by the ``gguf`` library.  Types we write:

* every linear weight (encoder, adapter, decoder, delay-conditioning MLPs) in the chosen type: Q4_0, Q4_K or
  Q8_0.  Q4_K needs rows of whole 256-value super-blocks; narrower rows (the 32-wide delay MLP input) get Q4_0;
* the tied token table in the ``embeddings`` type (default: the linears' type, like the Rust project, so the LM
  head runs through the same 4-bit kernel; "q8_0", "f16", "f32" keep it finer);
* norms, biases and the conv stem in F32 (0.6% of the weights).

A ``q4_0`` file therefore has the Rust project's names and types exactly.

**Metadata** (shard 1): ``general.architecture = "voxtral"``, ``voxtral.params_json`` (the checkpoint's
params.json, or the equivalent fields for a transformers checkpoint), ``voxtral.tokenizer.tekken_json`` (the
whole tekken.json; with ``embed_tokenizer=False`` only ``voxtral.tokenizer.file = "tekken.json"``, a file looked
for beside the GGUF), ``voxtral.quantization`` and ``voxtral.embeddings`` (what was asked for).  A file without
params (the Rust project's) takes ``params.json`` from its folder when there is one, else the published model's
shapes, checked tensor by tensor; a file without a tokenizer needs one passed in (``tokenizer=`` /
``--tokenizer tekken.json``).

**Shards** (``split_size``): llama.cpp's split convention, ``NAME-00001-of-0000N.gguf``, every shard a GGUF file of
at most ``split_size`` bytes with ``split.no`` / ``split.count`` keys; a set is opened by any of its shards, by
its folder, or by the unsplit name.  (The Rust project's ``shard-aa``.. are a byte split of one file: join them
with ``cat``.)
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import torch
from torch import nn

from .config import ModelConfig
from .errors import CheckpointError, first_line
from .loading import (
    Part,
    TensorFiles,
    first_wrong_shape,
    half_split_to_interleaved,
    inspect_checkpoint,
    interleaved_to_half_split,
    mistral_layout,
    resolve_model_dir,
    some_names,
    used_keys,
)
from .model import VoxtralRealtime
from .quantization import (
    FORMATS,
    FOUR_BIT,
    Q8Linear,
    QuantizedEmbedding,
    QuantizedLinear,
    cpu_layer,
    dequantize_blocks,
    four_bit_layout,
    linear_qtype,
    q8_layout,
    quantize_blocks,
    use_bf16_caches_with_int4,
)

if TYPE_CHECKING:
    from gguf import GGUFReader

    from .api import Model

ARCHITECTURE: Final = "voxtral"
KEY_PARAMS: Final = "voxtral.params_json"
KEY_TOKENIZER: Final = "voxtral.tokenizer.tekken_json"
KEY_TOKENIZER_FILE: Final = "voxtral.tokenizer.file"  # the pointer written instead of the contents
KEY_QUANTIZATION: Final = "voxtral.quantization"
KEY_EMBEDDINGS: Final = "voxtral.embeddings"
EMBEDDING_TYPES: Final = ("same", "q4_0", "q4_k", "q8_0", "f16", "f32")
EMBEDDING_NETWORK_NAME: Final = "decoder.tok_embeddings.weight"

_SHARD = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_SIZE = re.compile(r"^\s*(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)

Progress = Callable[[int, int], None]


def parse_size(text: str) -> int:
    """"512M" -> 536870912: a byte count with an optional K/M/G/T suffix (powers of 1024, as ``split -b``)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size; write e.g. 512M, 2G or 1000000")
    value = float(match["number"]) * 1024 ** " kmgt".index(match["unit"].lower() or " ")
    if value < 1:
        raise ValueError(f"{text!r}: the size must be at least one byte")
    return int(value)


# ---------------------------------------------------------------------------------------------------------------
# Writing


@dataclass
class _PlannedTensor:
    out_key: str  # name in the file (the Mistral key)
    source_key: str
    interleave_heads: int  # > 0: the source rows are half-split RoPE order; write them interleaved
    shape: tuple[int, ...]  # torch order
    ggml_type: str  # "q4_0", "q4_k", "q8_0", "f16", "f32"

    @property
    def nbytes(self) -> int:
        if self.ggml_type in FORMATS:
            rows = int(np.prod(self.shape[:-1]))
            return rows * FORMATS[self.ggml_type].row_bytes(self.shape[-1])
        return int(np.prod(self.shape)) * (2 if self.ggml_type == "f16" else 4)


def _linear_weight_names(config: ModelConfig) -> set[str]:
    """Network parameter names that are weights of nn.Linear layers."""
    with torch.device("meta"):
        network = VoxtralRealtime(config)
    return {f"{name}.weight" for name, module in network.named_modules() if isinstance(module, nn.Linear)}


def params_from_config(config: ModelConfig) -> dict[str, Any]:
    """A params.json that :meth:`ModelConfig.from_params_json` reads back as ``config`` (for checkpoints that came
    without one, i.e. the transformers layout)."""
    e, d, a = config.encoder, config.decoder, config.audio
    return {
        "dim": d.dim, "n_layers": d.n_layers, "head_dim": d.head_dim, "hidden_dim": d.hidden_dim,
        "n_heads": d.n_heads, "n_kv_heads": d.n_kv_heads, "use_biases": False, "rope_theta": d.rope_theta,
        "norm_eps": d.norm_eps, "vocab_size": d.vocab_size, "tied_embeddings": True,
        "sliding_window": d.sliding_window, "ada_rms_norm_t_cond": True, "ada_rms_norm_t_cond_dim": d.ada_dim,
        "multimodal": {"whisper_model_args": {
            "encoder_args": {
                "dim": e.dim, "n_layers": e.n_layers, "head_dim": e.head_dim, "hidden_dim": e.hidden_dim,
                "n_heads": e.n_heads, "n_kv_heads": e.n_heads, "use_biases": True, "rope_theta": e.rope_theta,
                "norm_eps": e.norm_eps, "sliding_window": e.sliding_window,
                "audio_encoding_args": {"sampling_rate": a.sample_rate, "frame_rate": a.frame_rate,
                                        "num_mel_bins": e.num_mel_bins, "hop_length": a.hop_length,
                                        "window_size": a.window_size, "global_log_mel_max": a.global_log_mel_max},
            },
            "downsample_args": {"downsample_factor": a.downsample_factor},
        }},
    }


def _plan(config: ModelConfig, source_layout: dict[str, list[Part]], files: Any, qtype: str,
          embeddings: str, source_is_mistral: bool) -> list[_PlannedTensor]:
    target = mistral_layout(config, set())
    linear_weights = _linear_weight_names(config)
    planned = []
    for name, target_parts in target.items():
        for target_part, source_part in zip(target_parts, source_layout[name]):
            if target_part.key is None or source_part.key is None:
                continue  # the encoder's k bias: zeros made at load time, not stored
            shape = files.shape(source_part.key)
            if name == EMBEDDING_NETWORK_NAME:
                kind = linear_qtype(embeddings, shape[-1]) if embeddings in FORMATS else embeddings
            elif name in linear_weights:
                kind = linear_qtype(qtype, shape[-1])
            else:
                kind = "f32"
            planned.append(_PlannedTensor(target_part.key, source_part.key,
                                          0 if source_is_mistral else target_part.rope_heads, shape, kind))
    return planned


def _shard_overhead(tensors: list[_PlannedTensor], metadata_bytes: int, alignment: int) -> int:
    """An upper bound on a shard's bytes besides its tensor data: header, key/values, tensor infos, padding."""
    header = 4 + 4 + 8 + 8
    split_keys = 3 * (8 + 24 + 4 + 8)
    infos = sum(8 + len(t.out_key.encode()) + 4 + 8 * len(t.shape) + 4 + 8 for t in tensors)
    return header + metadata_bytes + split_keys + infos + alignment * (len(tensors) + 1)


def _split_plan(planned: list[_PlannedTensor], max_bytes: int, metadata_bytes: int, alignment: int
                ) -> list[list[_PlannedTensor]]:
    """Tensors in order, cut into shards whose files stay within ``max_bytes`` (metadata in the first)."""
    if _shard_overhead([], metadata_bytes, alignment) > max_bytes:
        raise CheckpointError(f"the metadata alone (with the tokenizer) takes {metadata_bytes} bytes, more than the "
                              f"split size {max_bytes}; give a larger --split-size")
    shards: list[list[_PlannedTensor]] = [[]]
    for tensor in planned:
        current = shards[-1]
        meta = metadata_bytes if len(shards) == 1 else 0
        if _shard_overhead([tensor], meta, alignment) + tensor.nbytes > max_bytes:
            raise CheckpointError(f"tensor {tensor.out_key} takes {tensor.nbytes} bytes in {tensor.ggml_type}, more "
                                  f"than the split size {max_bytes}; give a larger --split-size")
        grown = current + [tensor]
        if current and _shard_overhead(grown, meta, alignment) + sum(t.nbytes for t in grown) > max_bytes:
            shards.append([tensor])
        else:
            current.append(tensor)
    return shards


def _metadata_bytes(metadata: dict[str, str]) -> int:
    return sum(8 + len(k.encode()) + 4 + 8 + len(v.encode()) for k, v in metadata.items()) + 64  # + architecture


def _checked_options(qtype: str, embeddings: str, out: str | os.PathLike[str]) -> tuple[str, Path]:
    if qtype not in FORMATS:
        raise ValueError(f"unknown quantization type {qtype!r}; use one of {', '.join(FORMATS)}")
    if embeddings not in EMBEDDING_TYPES:
        raise ValueError(f"unknown embeddings type {embeddings!r}; use one of {', '.join(EMBEDDING_TYPES)}")
    out = Path(out)
    if out.suffix != ".gguf":
        raise ValueError(f"{out}: the output file name must end in .gguf")
    if out.is_dir():
        raise ValueError(f"{out}: is a folder; give the file to write")
    return (qtype if embeddings == "same" else embeddings), out


def write_gguf(source: str | os.PathLike[str], out: str | os.PathLike[str], *, qtype: str = "q4_0",
               embeddings: str = "same", split_size: int | None = None, embed_tokenizer: bool = True,
               cache_dir: str | None = None, progress: Progress | None = None) -> list[Path]:
    """Quantize a checkpoint (Mistral or transformers folder, or Hub id) into GGUF at ``out``; returns the files
    written (one, or the shards ``OUT-0000i-of-0000N.gguf`` when the data exceeds ``split_size`` bytes).
    ``progress(done, total)`` counts tensors."""
    embeddings, out = _checked_options(qtype, embeddings, out)
    folder = resolve_model_dir(source, cache_dir=cache_dir)
    checkpoint = inspect_checkpoint(folder)
    config = checkpoint.config
    files = TensorFiles(checkpoint.weight_files, torch.device("cpu"))
    try:
        params = json.loads((folder / "params.json").read_text(encoding="utf-8")) \
            if checkpoint.format == "mistral" else params_from_config(config)
        tokenizer = {KEY_TOKENIZER: checkpoint.tokenizer_path.read_text("utf-8")} if embed_tokenizer else \
            {KEY_TOKENIZER_FILE: "tekken.json"}
        metadata = {KEY_PARAMS: json.dumps(params), **tokenizer, KEY_QUANTIZATION: qtype,
                    KEY_EMBEDDINGS: embeddings, "general.name": folder.name}
        planned = _plan(config, checkpoint.layout(config, files.keys()), files, qtype, embeddings,
                        checkpoint.format == "mistral")
        return _write(files, planned, metadata, out, split_size, progress)
    finally:
        files.close()


def write_random_gguf(config: ModelConfig, params: dict[str, Any], tekken_path: Path, out: str | os.PathLike[str],
                      *, qtype: str = "q4_0", embeddings: str = "same", seed: int = 0,
                      progress: Progress | None = None) -> list[Path]:
    """A GGUF of ``config``'s shapes with random weights (as :func:`random_weights.random_network` draws them),
    made one tensor at a time: a full-size quantized file for memory and speed measurements without the real
    checkpoint and without ever holding the float model."""
    embeddings, out = _checked_options(qtype, embeddings, out)
    tensors = _RandomTensors(config, seed)
    metadata = {KEY_PARAMS: json.dumps(params), KEY_TOKENIZER: tekken_path.read_text("utf-8"),
                KEY_QUANTIZATION: qtype, KEY_EMBEDDINGS: embeddings, "general.name": "random weights"}
    planned = _plan(config, mistral_layout(config, set()), tensors, qtype, embeddings, True)
    return _write(tensors, planned, metadata, out, None, progress)


class _RandomTensors:
    """Random stand-ins for a Mistral checkpoint's tensors, by name (norm gains ~1, biases small, embeddings
    N(0, 1), other weights N(0, 1/fan_in)); each tensor is drawn when asked for, in blocks of rows with seeds of
    their own, drawn in parallel (one generator's draws are sequential: a full-size model's 4.3G values would take
    a minute on one core)."""

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
        shape = self._shapes[key]
        seed = self._seed * 1_000_003 + sum(map(ord, key)) * 7919 + len(key)
        tensor = torch.empty(shape)
        rows = tensor.reshape(shape[0], -1)
        step = max(1, _RANDOM_BLOCK_VALUES // rows.shape[1])

        def draw(start: int) -> None:
            rows[start:start + step].normal_(generator=torch.Generator().manual_seed(seed * 65_537 + start))

        starts = range(0, rows.shape[0], step)
        if len(starts) == 1:
            draw(0)
        else:
            with ThreadPoolExecutor(torch.get_num_threads()) as pool:
                list(pool.map(draw, starts))
        if key.endswith("norm.weight"):
            return tensor.mul_(0.1).add_(1.0)
        if key.endswith("bias"):
            return tensor.mul_(0.1)
        if key.endswith("tok_embeddings.weight"):
            return tensor
        fan_in = int(np.prod(shape[1:]))
        return tensor.mul_(fan_in ** -0.5)

    def close(self) -> None:
        pass


_RANDOM_BLOCK_VALUES: Final = 1 << 20  # values drawn per seed


def _write(tensors: Any, planned: list[_PlannedTensor], metadata: dict[str, str], out: Path,
           split_size: int | None, progress: Progress | None) -> list[Path]:
    import gguf

    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    shards = _split_plan(planned, split_size, _metadata_bytes(metadata), alignment) if split_size else [planned]
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(out, ARCHITECTURE)
    for key, value in metadata.items():
        writer.add_string(key, value)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    types = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             **{name: gguf.GGMLQuantizationType(fmt.ggml_type) for name, fmt in FORMATS.items()}}
    for shard_no, shard in enumerate(shards):
        if shard_no:
            # The writer starts a new shard when its list of per-shard tensor tables grows; we decide the cuts
            # ourselves (above) because its own rule counts tensor data only, not headers or padding.
            writer.tensors.append({})
        for t in shard:
            byte_shape = (*t.shape[:-1], t.nbytes // max(1, int(np.prod(t.shape[:-1]))))
            if t.ggml_type in FORMATS:
                writer.add_tensor_info(t.out_key, byte_shape, np.dtype(np.uint8), t.nbytes, types[t.ggml_type])
            else:
                writer.add_tensor_info(t.out_key, t.shape, np.dtype(np.float16 if t.ggml_type == "f16"
                                                                    else np.float32), t.nbytes)
    written = writer.format_shard_names(out)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for done, t in enumerate(planned):
            writer.write_tensor_data(_tensor_bytes(tensors, t))
            if progress:
                progress(done + 1, len(planned))
    finally:
        writer.close()
    return written


def _tensor_bytes(files: Any, t: _PlannedTensor) -> np.ndarray:
    tensor = files.get(t.source_key)
    if t.interleave_heads:
        tensor = half_split_to_interleaved(tensor, t.interleave_heads)
    if t.ggml_type in FORMATS:
        return quantize_blocks(tensor, t.ggml_type).numpy()
    return tensor.to(torch.float16 if t.ggml_type == "f16" else torch.float32).contiguous().numpy()


# ---------------------------------------------------------------------------------------------------------------
# Finding the files


def _is_gguf_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def gguf_files(model: str | os.PathLike[str]) -> list[Path] | None:
    """The GGUF file(s) ``model`` names, in shard order, or None when ``model`` is not a GGUF path (a checkpoint
    folder or a Hub id).  Raises CheckpointError for a GGUF path that cannot be used."""
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "params.json").is_file() or (path / "config.json").is_file():
            return None
        found = sorted(path.glob("*.gguf"))
        if not found:
            if sorted(path.glob("shard-a?")):
                raise CheckpointError(f"{path}: holds byte-split shards (shard-aa, shard-ab...), not GGUF files; join "
                                      "them first: cat shard-a? > model.gguf")
            return None
        sets = {m["stem"] for f in found if (m := _SHARD.match(f.name))}
        if len(found) == 1:
            return _shard_set(found[0]) if sets else found
        if len(sets) == 1 and all(_SHARD.match(f.name) for f in found):
            return _shard_set(found[0])
        raise CheckpointError(f"{path}: holds several GGUF files ({', '.join(f.name for f in found[:3])}...); "
                              "pass the one to load")
    if path.is_file():
        if not _is_gguf_file(path):
            if path.suffix == ".gguf":
                raise CheckpointError(f"{path}: not a GGUF file (no GGUF magic at its start)")
            return None
        return _shard_set(path) if _SHARD.match(path.name) else [path]
    if path.suffix == ".gguf":
        shards = sorted(path.parent.glob(f"{glob_escape(path.stem)}-00001-of-*.gguf"))
        if shards:
            return _shard_set(shards[0])
        raise CheckpointError(f"{path}: no such file")
    return None


def glob_escape(text: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", text)


def _shard_set(path: Path) -> list[Path]:
    match = _SHARD.match(path.name)
    assert match is not None
    count = int(match["count"])
    files = [path.with_name(f"{match['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{path}: GGUF shard set of {count} is missing {', '.join(missing[:3])}")
    return files


# ---------------------------------------------------------------------------------------------------------------
# Reading


class GGUFTensors:
    """The tensors of a GGUF file or shard set, memory-mapped, by name; metadata of the first shard."""

    def __init__(self, files: list[Path]) -> None:
        from gguf import GGUFReader

        self.files = files
        self.readers: list[GGUFReader] = []
        for file in files:
            if not _is_gguf_file(file):
                raise CheckpointError(f"{file}: not a GGUF file (no GGUF magic at its start)")
            try:
                self.readers.append(GGUFReader(file))
            except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError) as exc:  # damaged file
                raise CheckpointError(f"{file}: not a readable GGUF file ({first_line(exc)}); it may be truncated"
                                      ) from None
        self.tensors = {t.name: t for reader in self.readers for t in reader.tensors}
        self._file_of = {t.name: file for file, reader in zip(files, self.readers) for t in reader.tensors}
        expected = self.metadata("split.count")
        if expected is not None and int(expected) != len(files):
            raise CheckpointError(f"{files[0]}: says it is one of {expected} shards, but {len(files)} were found")

    def metadata(self, key: str) -> Any:
        field = self.readers[0].get_field(key)
        return field.contents() if field is not None else None

    def shape(self, name: str) -> tuple[int, ...]:
        """Torch order (GGUF stores ggml's reversed dims)."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))

    def type_name(self, name: str) -> str:
        return self.tensors[name].tensor_type.name.lower()

    def raw(self, name: str) -> torch.Tensor:
        """The stored data as a torch tensor: float for F32/F16, uint8 block bytes [rows, row_bytes] otherwise.

        Read with plain file reads rather than through the reader's memory map: mapped pages that have been
        touched count as this process's resident memory until the map goes, i.e. the whole file during a load.
        """
        info = self.tensors[name]
        data = np.empty(info.data.shape, dtype=info.data.dtype)
        with open(self._file_of[name], "rb") as f:
            f.seek(info.data_offset)
            if f.readinto(memoryview(data).cast("B")) != data.nbytes:
                raise CheckpointError(f"{self._file_of[name]}: truncated inside tensor {name}")
        tensor = torch.from_numpy(data)
        if self.type_name(name) == "bf16":
            return tensor.view(torch.int16).view(torch.bfloat16).reshape(self.shape(name))
        return tensor


_DENSE: Final = ("f32", "f16", "bf16")


def _dense(tensors: GGUFTensors, name: str) -> torch.Tensor:
    kind = tensors.type_name(name)
    if kind in _DENSE:
        return tensors.raw(name)
    if kind in FORMATS:
        return dequantize_blocks(tensors.raw(name), kind).reshape(tensors.shape(name))
    try:
        import gguf

        values = gguf.quants.dequantize(tensors.tensors[name].data, tensors.tensors[name].tensor_type)
    except NotImplementedError:
        raise CheckpointError(f"{tensors.files[0]}: tensor {name} has type {kind.upper()}, which cannot be read"
                              ) from None
    return torch.from_numpy(np.array(values, dtype=np.float32)).reshape(tensors.shape(name))


def _permuted(tensor: torch.Tensor, part: Part) -> torch.Tensor:
    return interleaved_to_half_split(tensor, part.rope_heads) if part.rope_heads else tensor


def _quantized_module(tensors: GGUFTensors, parts: list[Part], kinds: list[str], device: torch.device,
                      bias: torch.Tensor | None) -> QuantizedLinear | Q8Linear:
    """One linear layer from its (fused) parts, all Q4_0/Q4_K or all Q8_0, rows permuted as the layout says."""
    pieces = []
    for part, kind in zip(parts, kinds):
        data = tensors.raw(part.key).to(device)  # type: ignore[arg-type]
        try:
            fields = four_bit_layout(data, kind) if kind in FOUR_BIT else q8_layout(data)
        except ValueError as exc:
            raise CheckpointError(f"{tensors.files[0]}: tensor {part.key}: {exc}") from None
        pieces.append([_permuted(f, part) for f in fields])
    fused = [torch.cat(column).contiguous() if len(pieces) > 1 else column[0] for column in zip(*pieces)]
    if kinds[0] in FOUR_BIT:
        qtype = kinds[0] if len(set(kinds)) == 1 else "q4_mixed"
        return QuantizedLinear(*fused, bias, qtype=qtype)
    return Q8Linear(*fused, bias)


def _replace_module(network: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(network.get_submodule(parent_path) if parent_path else network, child, module)


def _config_and_tokenizer_path(tensors: GGUFTensors, tokenizer: str | os.PathLike[str] | None,
                               scratch: Path) -> tuple[ModelConfig, Path, str]:
    from .random_weights import FULL_SIZE_PARAMS

    source = tensors.files[0]
    if tokenizer is not None:
        tekken_path = Path(tokenizer).expanduser()
        if not tekken_path.is_file():
            raise CheckpointError(f"{tekken_path}: tokenizer file not found")
    elif (text := tensors.metadata(KEY_TOKENIZER)) is not None:
        tekken_path = scratch / "tekken.json"
        tekken_path.write_text(text, encoding="utf-8")
    elif (pointer := tensors.metadata(KEY_TOKENIZER_FILE)) is not None and (source.parent / pointer).is_file():
        tekken_path = source.parent / pointer
    else:
        raise CheckpointError(f"{source}: this GGUF file has no tokenizer; pass one: --tokenizer tekken.json "
                              "(Python: tokenizer='tekken.json')")
    try:
        tekken = json.loads(tekken_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{tekken_path}: not valid JSON ({first_line(exc)})") from None
    audio = tekken.get("audio") if isinstance(tekken, dict) else None
    if not isinstance(audio, dict):
        raise CheckpointError(f"{tekken_path}: tokenizer has no 'audio' section; not a Voxtral Realtime tokenizer")
    params_text, params_origin = tensors.metadata(KEY_PARAMS), f"{source}: {KEY_PARAMS}"
    beside = source.parent / "params.json"
    if params_text is None and beside.is_file():
        params_text, params_origin = beside.read_text(encoding="utf-8"), str(beside)
    try:
        # No params anywhere (the Rust project's files): the published model's, checked against every tensor below.
        params = json.loads(params_text) if params_text is not None else FULL_SIZE_PARAMS
        config = ModelConfig.from_params_json(params, audio)
    except (json.JSONDecodeError, UnicodeDecodeError, CheckpointError) as exc:
        raise CheckpointError(f"{params_origin}: {first_line(exc)}") from None
    assumed = "" if params_text is not None else \
        " (the file has no hyperparameters and no params.json is beside it: the published model's were assumed)"
    return config, tekken_path, assumed


def _check_tensors(tensors: GGUFTensors, layout: dict[str, list[Part]], expected: dict[str, tuple[int, ...]],
                   assumed: str) -> None:
    source = tensors.files[0]
    missing = sorted(used_keys(layout) - set(tensors.tensors))
    if missing:
        raise CheckpointError(f"{source}: lacks tensor(s) {some_names(missing)}; not a Voxtral Realtime "
                              f"GGUF of these dimensions{assumed}")
    if wrong := first_wrong_shape(layout.items(), expected, tensors.shape):
        key, got, want = wrong
        raise CheckpointError(f"{source}: tensor {key} has shape {got}, expected {want}{assumed}")


@torch.no_grad()
def load_gguf(files: list[Path], *, tokenizer: str | os.PathLike[str] | None = None, device: torch.device,
              dtype: torch.dtype, progress: Progress | None = None) -> Model:
    """A :class:`~voxtral_realtime.api.Model` from a GGUF file or shard set (see :func:`gguf_files`).

    Quantized linear weights stay quantized in memory (on the CPU in torch's packed int4 layout); everything else
    is read in ``dtype``.  No full-precision copy of a quantized weight is ever made.
    """
    from .api import Model
    from .tokenizer import Tokenizer

    tensors = GGUFTensors(files)
    with tempfile.TemporaryDirectory(prefix="voxtral-gguf-") as scratch:
        config, tekken_path, assumed = _config_and_tokenizer_path(tensors, tokenizer, Path(scratch))
        tok = Tokenizer(tekken_path)  # reads the whole file now; the scratch copy can go
    with torch.device("meta"):
        network = VoxtralRealtime(config)
    expected = {name: tuple(p.shape) for name, p in network.named_parameters()}
    layout = mistral_layout(config, set(tensors.tensors))
    _check_tensors(tensors, layout, expected, assumed)
    linear_weights = _linear_weight_names(config)
    quantized: dict[str, tuple[list[Part], list[str]]] = {}
    dense: dict[str, torch.Tensor] = {}
    total = len(layout)
    done = 0
    for name, parts in layout.items():
        kinds = [tensors.type_name(p.key) if p.key else "f32" for p in parts]
        four_bit = all(k in FOUR_BIT for k in kinds)
        if (name in linear_weights or name == EMBEDDING_NETWORK_NAME) and (four_bit or set(kinds) == {"q8_0"}):
            quantized[name] = (parts, kinds)
            continue
        pieces = []
        for part in parts:
            want = (part.rows or expected[name][0], *expected[name][1:])
            if part.key is None:
                pieces.append(torch.zeros(want, dtype=dtype, device=device))
            else:
                pieces.append(_permuted(_dense(tensors, part.key).to(device=device, dtype=dtype), part))
        dense[name] = (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).contiguous()
        done += 1
        if progress:
            progress(done, total)
    for name, (parts, kinds) in quantized.items():
        module_path = name.removesuffix(".weight")
        bias = dense.pop(f"{module_path}.bias", None)
        module = _quantized_module(tensors, parts, kinds, device, bias)
        if device.type == "cpu":  # frees the other layout as it goes
            module = cpu_layer(module, token_table=name == EMBEDDING_NETWORK_NAME)
        if name == EMBEDDING_NETWORK_NAME:
            _replace_module(network, "decoder.tok_embeddings", QuantizedEmbedding(module, dtype))
        else:
            _replace_module(network, module_path, module)
        _return_freed_memory()  # each conversion's temporaries, before the next one's raise the peak
        done += 1
        if progress:
            progress(done, total)
    unexpected = network.load_state_dict(dense, strict=False, assign=True).unexpected_keys
    network.rebuild_buffers()
    use_bf16_caches_with_int4(network)
    _return_freed_memory()
    left = [n for n, t in [*network.named_parameters(), *network.named_buffers()] if t.is_meta]
    if left or unexpected:  # a gap in the tables above, not a user error
        raise AssertionError(f"GGUF load left tensors unset: {left[:5]}, unused: {unexpected[:5]}")
    network.eval()
    return Model(network, tok, source=str(files[0]))


def _return_freed_memory() -> None:
    """Hand the load's freed temporaries back to the OS (glibc keeps freed heap pages mapped, so they would go
    on counting as resident memory)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:  # not glibc: nothing to do
        pass
