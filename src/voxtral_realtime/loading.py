"""Finding and loading checkpoints: a local folder, a Hugging Face Hub repo, Mistral or transformers layout.

* Mistral format: ``consolidated.safetensors`` + ``params.json`` + ``tekken.json`` (what Mistral publishes).
* transformers format: ``config.json`` + ``model*.safetensors`` (+ ``tekken.json`` for the tokenizer).

The network is built on the meta device and every weight is read from the memory-mapped file straight to its
target device and dtype, one tensor at a time, so loading never holds a second copy of the model.  Mistral q/k
rows use interleaved RoPE pairs and are permuted once here to the half-split order the network uses; q/k/v and
gate/up are concatenated into the fused matrices.  Every problem is reported as a one-line CheckpointError.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .errors import CheckpointError, DownloadError, first_line
from .model import VoxtralRealtime

DEFAULT_MODEL = "mistralai/Voxtral-Mini-4B-Realtime-2602"
MISTRAL_FILES = ("consolidated.safetensors", "params.json", "tekken.json")
HF_FILES = ("config.json", "model*.safetensors", "model.safetensors.index.json", "preprocessor_config.json",
            "tekken.json")
MISTRAL_PREFIX = "mm_streams_embeddings.embedding_module."
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

ProgressCallback = Callable[[int, int], None]


# ---------------------------------------------------------------------------------------------------------------
# Where the files are


def resolve_model_dir(model: str | os.PathLike[str], *, cache_dir: str | None = None, revision: str | None = None,
                      progress: ProgressCallback | None = None) -> Path:
    """A local checkpoint folder, or the local snapshot of a Hub repo id (downloaded if needed, at ``revision``)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if revision is not None:
            raise CheckpointError(f"{path}: a local folder has no revisions; a revision is for Hub repo ids only")
        return path
    if path.exists():
        raise CheckpointError(f"{path}: is a file; pass the folder holding params.json or config.json")
    text = str(model)
    if not _REPO_ID.match(text) or text.startswith((".", "/", "~")):
        raise CheckpointError(f"{text}: no such folder, and not a Hugging Face repo id (owner/name)")
    return download(text, revision=revision, cache_dir=cache_dir, progress=progress)


def download(repo_id: str = DEFAULT_MODEL, *, revision: str | None = None, cache_dir: str | None = None,
             progress: ProgressCallback | None = None, verify: bool = False,
             status: Callable[[str], None] | None = None) -> Path:
    """Fetch a checkpoint from the Hub into the Hugging Face cache; returns its snapshot folder.

    Only the files we load are fetched: the Mistral-format ones when the repo has them (its transformers copy of
    the same weights would double the download), else the transformers ones.  ``revision``: a branch, tag or
    commit (default: the main branch).  ``progress(bytes_done, bytes_total)`` follows the large (LFS) files,
    which are fetched with HTTP range requests into ``<sha256>.incomplete`` files that a killed download resumes
    from.  Every cached file's size is checked against the Hub's listing (``verify``: its sha256 or git hash too)
    and a damaged one is fetched again (``status`` is told while that takes time).  Without a network (or with
    ``HF_HUB_OFFLINE=1``) the cache alone is used.
    """
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hub_errors

    try:
        try:
            info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
        except (hub_errors.OfflineModeIsEnabled, *_connection_errors()):
            return _cached_snapshot(repo_id, revision, cache_dir)
        return _download_snapshot(repo_id, revision, info, cache_dir, progress, verify, status)
    except hub_errors.HfHubHTTPError as exc:  # an OSError too: before the disk errors
        raise _hub_error(repo_id, revision, exc) from None
    except _connection_errors() as exc:
        raise DownloadError(f"{repo_id}: the download was interrupted ({first_line(exc)}); run the same command "
                            "again to resume it") from None
    except OSError as exc:
        raise _disk_error(repo_id, exc, cache_dir) from None


@dataclass(frozen=True)
class _HubFile:
    """One file of a Hub snapshot, as the Hub lists it."""

    name: str
    size: int
    sha256: str | None  # LFS files: their content hash (and their blob's name in the cache)
    git_hash: str | None  # the other files: their git blob id

    @property
    def blob_name(self) -> str | None:
        return self.sha256 or self.git_hash


def _download_snapshot(repo_id: str, revision: str | None, info: Any, cache_dir: str | None,
                       progress: ProgressCallback | None, verify: bool,
                       status: Callable[[str], None] | None) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.utils import filter_repo_objects

    listed = {s.rfilename: _HubFile(s.rfilename, s.lfs.size if s.lfs else s.size, s.lfs.sha256 if s.lfs else None,
                                    s.blob_id) for s in info.siblings or []}
    patterns, marker = (MISTRAL_FILES, "params.json") if "params.json" in listed else (HF_FILES, "config.json")
    if marker not in listed:
        raise DownloadError(f"{repo_id}: the repo has neither params.json nor config.json; not a Voxtral checkpoint")
    files = [listed[name] for name in sorted(filter_repo_objects(listed, allow_patterns=list(patterns)))]
    storage = Path(cache_dir or constants.HF_HUB_CACHE).expanduser().resolve() / repo_folder_name(
        repo_id=repo_id, repo_type="model")
    snapshot = storage / "snapshots" / info.sha
    if verify and status and snapshot.is_dir():
        status("checking the cached files")
    missing = [f for f in files if not _cached_file_ok(snapshot / f.name, f, verify)]
    if missing:
        _fetch_large_files(repo_id, info.sha, storage / "blobs", [f for f in missing if f.sha256], progress)
        # the small files, and the snapshot's links to every blob, the way huggingface_hub lays out its cache
        snapshot = Path(snapshot_download(repo_id, revision=info.sha, allow_patterns=[f.name for f in files],
                                          cache_dir=cache_dir, tqdm_class=_quiet_tqdm()))
        for f in files:
            if not _cached_file_ok(snapshot / f.name, f, verify=False):
                raise DownloadError(f"{repo_id}: {f.name} arrived with the wrong size; run the same command again")
    ref = storage / "refs" / (revision or constants.DEFAULT_REVISION)
    # what a later offline run looks the revision up in; a complete read-only cache still serves without it
    if revision != info.sha and not (ref.is_file() and ref.read_text() == info.sha):
        with contextlib.suppress(OSError):
            ref.parent.mkdir(parents=True, exist_ok=True)
            ref.write_text(info.sha)
    return snapshot


def _cached_file_ok(path: Path, file: _HubFile, verify: bool) -> bool:
    """Whether the snapshot holds ``file`` whole (and, with ``verify``, with the Hub's hash); a damaged copy is
    removed, with its blob, so that it is fetched again."""
    if not path.is_file():
        path.unlink(missing_ok=True)  # a link to a blob that is gone
        return False
    if path.stat().st_size == file.size and (not verify or _content_hash(path, git=file.sha256 is None) ==
                                             file.blob_name):
        return True
    path.resolve().unlink(missing_ok=True)
    path.unlink(missing_ok=True)
    return False


def _content_hash(path: Path, *, git: bool) -> str:
    """sha256 of the content (LFS files), or the git blob id (sha1 of a "blob <size>" header and the content)."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode()) if git else hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_large_files(repo_id: str, commit: str, blobs: Path, files: list[_HubFile],
                       progress: ProgressCallback | None) -> None:
    """Fetch LFS files into their content-named blobs, resuming the ``.incomplete`` copies a killed run left."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    if not files:
        return
    blobs.mkdir(parents=True, exist_ok=True)
    partial = {f.name: blobs / f"{f.sha256}.incomplete" for f in files}
    for f in files:  # longer than the file: not a prefix of it
        if partial[f.name].is_file() and partial[f.name].stat().st_size > f.size:
            partial[f.name].unlink()
    have = {f.name: partial[f.name].stat().st_size if partial[f.name].is_file() else 0 for f in files}
    total = sum(f.size for f in files)
    needed = total - sum(have.values())
    free = shutil.disk_usage(blobs).free
    if free < needed:
        raise DownloadError(f"{repo_id}: not enough disk space in {blobs.parent.parent}: the download needs "
                            f"{_gb(needed)} more, {_gb(free)} is free; free some space or choose another cache "
                            "folder (--cache-dir, or the HF_HOME environment variable)")
    done = total - needed

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    for f in files:
        with open(partial[f.name], "ab") as out:
            http_get(hf_hub_url(repo_id, f.name, revision=commit), out, resume_size=have[f.name],
                     headers=build_hf_headers(), expected_size=f.size, tqdm_class=_quiet_tqdm(advance))
        if _content_hash(partial[f.name], git=False) != f.sha256:
            partial[f.name].unlink()
            raise DownloadError(f"{repo_id}: {f.name} does not match the Hub's sha256 after downloading (a "
                                "corrupted transfer); run the same command again")
        partial[f.name].replace(blobs / f.sha256)


def _quiet_tqdm(on_bytes: Callable[[int], None] | None = None) -> type:
    """A tqdm class that draws nothing (huggingface_hub reports its transfers through one) and passes the byte
    counts on: the command line draws a single bar of its own."""
    from tqdm.auto import tqdm

    class Quiet(tqdm):  # type: ignore[misc, type-arg]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, "disable": True})

        def update(self, n: float | None = 1) -> bool | None:
            if on_bytes and n:
                on_bytes(int(n))
            return None

    return Quiet


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def _connection_errors() -> tuple[type[Exception], ...]:
    import httpx2

    return httpx2.ConnectError, httpx2.TimeoutException, httpx2.RemoteProtocolError


def _hub_error(repo_id: str, revision: str | None, exc: Exception) -> DownloadError:
    """One line for each way the Hub says no: what went wrong for this repo and what to do."""
    from huggingface_hub import errors as hub_errors

    status = exc.response.status_code if getattr(exc, "response", None) is not None else None
    if isinstance(exc, hub_errors.GatedRepoError):  # a subclass of RepositoryNotFoundError: first
        return DownloadError(f"{repo_id}: the model is gated; accept its terms on its Hugging Face page and log in "
                             "with `hf auth login`")
    if isinstance(exc, hub_errors.RevisionNotFoundError):
        return DownloadError(f"{repo_id}: no revision {revision!r} (a branch, tag or commit) on the Hub; check "
                             "the name, or leave it out for the main branch")
    if isinstance(exc, hub_errors.RepositoryNotFoundError):
        return DownloadError(f"{repo_id}: no such model on the Hugging Face Hub (or it is private: log in with "
                             "`hf auth login`)")
    if status == 401:
        return DownloadError(f"{repo_id}: the Hub did not accept your token (401 Unauthorized); log in again with "
                             "`hf auth login`, or unset HF_TOKEN")
    if status == 403:
        return DownloadError(f"{repo_id}: the Hub refused access (403 Forbidden); check that your token may read "
                             "this repo (`hf auth login` with a token that can)")
    return DownloadError(f"{repo_id}: download failed: {first_line(exc)}")


def _disk_error(repo_id: str, exc: OSError, cache_dir: str | None) -> DownloadError:
    from huggingface_hub import constants

    where = exc.filename or cache_dir or constants.HF_HUB_CACHE
    if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return DownloadError(f"{repo_id}: the disk is full ({exc.strerror}) writing {where}; what was downloaded "
                             "is kept: free some space or choose another cache folder (--cache-dir, or the HF_HOME "
                             "environment variable), then run the same command again")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return DownloadError(f"{repo_id}: cannot write to the cache folder ({exc.strerror}: {where}); choose a "
                             "writable one (--cache-dir, or the HF_HOME environment variable)")
    return DownloadError(f"{repo_id}: download failed: {first_line(exc)}")


def _cached_snapshot(repo_id: str, revision: str | None, cache_dir: str | None) -> Path:
    """The cached snapshot of ``repo_id`` when the Hub cannot be asked (offline mode, no network)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub import errors as hub_errors

    last: Path | None = None
    for patterns, marker in ((list(MISTRAL_FILES), "params.json"), (list(HF_FILES), "config.json")):
        try:
            last = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, cache_dir=cache_dir,
                                          local_files_only=True))
        except hub_errors.IncompleteSnapshotError:
            raise DownloadError(f"{repo_id}: the local copy is incomplete and the Hub cannot be reached; connect "
                                "to the network to finish the download") from None
        except hub_errors.LocalEntryNotFoundError:
            # constants.HF_HUB_OFFLINE also honours TRANSFORMERS_OFFLINE
            offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true")
            why = "offline mode (HF_HUB_OFFLINE) is on and it is not in the local cache" if offline else \
                "the Hugging Face Hub cannot be reached and it is not in the local cache"
            raise DownloadError(f"{repo_id}: cannot download the model: {why}; "
                                "connect to the network or use a local checkpoint folder") from None
        if (last / marker).is_file():
            return last
    raise DownloadError(f"{repo_id}: the cached copy has neither params.json nor config.json; not a Voxtral "
                        "checkpoint")


# ---------------------------------------------------------------------------------------------------------------
# Reading tensors


class TensorFiles:
    """Read-only view of the tensors of one or more safetensors files, memory-mapped, by name."""

    def __init__(self, files: list[Path], device: torch.device) -> None:
        from safetensors import SafetensorError, safe_open

        self._stack = ExitStack()
        self._where: dict[str, Any] = {}
        # safetensors loads straight to CUDA; other devices go through the CPU mapping.
        open_device = str(device) if device.type == "cuda" else "cpu"
        for file in files:
            try:
                handle = self._stack.enter_context(safe_open(str(file), framework="pt", device=open_device))
            except (SafetensorError, OSError) as exc:
                self.close()
                raise CheckpointError(f"{file}: not a readable safetensors file ({first_line(exc)}); "
                                      "the download may be incomplete") from None
            self._check_complete(file)
            for key in handle.keys():  # noqa: SIM118 - a safetensors handle is not a dict
                self._where[key] = (handle, file)

    @staticmethod
    def _check_complete(file: Path) -> None:
        # A truncated file keeps a valid header: compare the data it promises with what is on disk.
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        promised = 8 + header_len + max(
            (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        size = file.stat().st_size
        if promised > size:
            raise CheckpointError(f"{file}: truncated ({size} bytes of {promised}); delete it and download again")

    def keys(self) -> set[str]:
        return set(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        handle, _ = self._where[key]
        return tuple(handle.get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        handle, file = self._where[key]
        try:
            return handle.get_tensor(key)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for unreadable data
            raise CheckpointError(f"{file}: cannot read tensor {key} ({first_line(exc)})") from None

    def close(self) -> None:
        self._stack.close()


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint layouts: where each network weight comes from


@dataclass(frozen=True)
class Part:
    """One source tensor of a network weight; ``rope_heads`` > 0 means "permute its rows from interleaved RoPE"."""

    key: str | None  # None: rows of zeros (the encoder's missing k bias)
    rows: int = 0  # rows this part fills in a fused weight (0: the whole weight)
    rope_heads: int = 0


def _encoder_layer_parts(cfg: ModelConfig, src: Callable[[str], str], names: dict[str, str],
                         rope: bool) -> dict[str, list[Part]]:
    e = cfg.encoder
    heads = e.n_heads if rope else 0
    qkv = e.n_heads * e.head_dim
    return {
        "attention_norm.weight": [Part(src(names["attention_norm"]))],
        "attention.wqkv.weight": [Part(src(names["wq"] + ".weight"), qkv, heads),
                                  Part(src(names["wk"] + ".weight"), qkv, heads),
                                  Part(src(names["wv"] + ".weight"), qkv)],
        "attention.wqkv.bias": [Part(src(names["wq"] + ".bias"), qkv, heads),
                                Part(None, qkv),
                                Part(src(names["wv"] + ".bias"), qkv)],
        "attention.wo.weight": [Part(src(names["wo"] + ".weight"))],
        "attention.wo.bias": [Part(src(names["wo"] + ".bias"))],
        "ffn_norm.weight": [Part(src(names["ffn_norm"]))],
        "feed_forward.w13.weight": [Part(src(names["w1"]), e.hidden_dim), Part(src(names["w3"]), e.hidden_dim)],
        "feed_forward.w2.weight": [Part(src(names["w2"] + ".weight"))],
        "feed_forward.w2.bias": [Part(src(names["w2"] + ".bias"))],
    }


def _decoder_layer_parts(cfg: ModelConfig, src: Callable[[str], str], names: dict[str, str],
                         rope: bool) -> dict[str, list[Part]]:
    d = cfg.decoder
    q, kv = d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim
    return {
        "attention_norm.weight": [Part(src(names["attention_norm"]))],
        "attention.wqkv.weight": [Part(src(names["wq"]), q, d.n_heads if rope else 0),
                                  Part(src(names["wk"]), kv, d.n_kv_heads if rope else 0),
                                  Part(src(names["wv"]), kv)],
        "attention.wo.weight": [Part(src(names["wo"]))],
        "ffn_norm.weight": [Part(src(names["ffn_norm"]))],
        "ada_norm.w_in.weight": [Part(src(names["ada_in"]))],
        "ada_norm.w_out.weight": [Part(src(names["ada_out"]))],
        "feed_forward.w13.weight": [Part(src(names["w1"]), d.hidden_dim), Part(src(names["w3"]), d.hidden_dim)],
        "feed_forward.w2.weight": [Part(src(names["w2"]))],
    }


def mistral_layout(cfg: ModelConfig, keys: set[str]) -> dict[str, list[Part]]:
    """Network weight name -> source tensors, for Mistral names (also the names inside Voxtral GGUF files)."""
    enc = MISTRAL_PREFIX + "whisper_encoder."
    embed = MISTRAL_PREFIX + "tok_embeddings.weight"
    if embed not in keys and "tok_embeddings.weight" in keys:
        embed = "tok_embeddings.weight"
    layout = {
        "encoder.conv_stem.conv1.weight": [Part(enc + "conv_layers.0.conv.weight")],
        "encoder.conv_stem.conv1.bias": [Part(enc + "conv_layers.0.conv.bias")],
        "encoder.conv_stem.conv2.weight": [Part(enc + "conv_layers.1.conv.weight")],
        "encoder.conv_stem.conv2.bias": [Part(enc + "conv_layers.1.conv.bias")],
        "encoder.norm.weight": [Part(enc + "transformer.norm.weight")],
        "adapter.w_in.weight": [Part(MISTRAL_PREFIX + "audio_language_projection.0.weight")],
        "adapter.w_out.weight": [Part(MISTRAL_PREFIX + "audio_language_projection.2.weight")],
        "decoder.tok_embeddings.weight": [Part(embed)],
        "decoder.norm.weight": [Part("norm.weight")],
    }
    enc_names = {"attention_norm": "attention_norm.weight", "ffn_norm": "ffn_norm.weight", "wq": "attention.wq",
                 "wk": "attention.wk", "wv": "attention.wv", "wo": "attention.wo",
                 "w1": "feed_forward.w1.weight", "w2": "feed_forward.w2", "w3": "feed_forward.w3.weight"}
    for i in range(cfg.encoder.n_layers):
        parts = _encoder_layer_parts(cfg, lambda n, i=i: f"{enc}transformer.layers.{i}.{n}", enc_names, rope=True)
        layout.update({f"encoder.layers.{i}.{k}": v for k, v in parts.items()})
    dec_names = {"attention_norm": "attention_norm.weight", "ffn_norm": "ffn_norm.weight",
                 "wq": "attention.wq.weight", "wk": "attention.wk.weight", "wv": "attention.wv.weight",
                 "wo": "attention.wo.weight", "ada_in": "ada_rms_norm_t_cond.0.weight",
                 "ada_out": "ada_rms_norm_t_cond.2.weight", "w1": "feed_forward.w1.weight",
                 "w2": "feed_forward.w2.weight", "w3": "feed_forward.w3.weight"}
    for i in range(cfg.decoder.n_layers):
        parts = _decoder_layer_parts(cfg, lambda n, i=i: f"layers.{i}.{n}", dec_names, rope=True)
        layout.update({f"decoder.layers.{i}.{k}": v for k, v in parts.items()})
    return layout


def hf_layout(cfg: ModelConfig, keys: set[str]) -> dict[str, list[Part]]:
    """Network weight name -> source tensors, for transformers' on-disk names (already half-split RoPE)."""
    # save_pretrained writes "audio_tower.*" / "language_model.model.*"; accept the runtime names too.
    text = "language_model.model." if any(k.startswith("language_model.model.") for k in keys) else \
        "model.language_model."
    root = "model." if any(k.startswith("model.audio_tower.") for k in keys) else ""
    audio, proj = root + "audio_tower.", root + "multi_modal_projector."
    layout = {
        "encoder.conv_stem.conv1.weight": [Part(audio + "embedder.conv1.weight")],
        "encoder.conv_stem.conv1.bias": [Part(audio + "embedder.conv1.bias")],
        "encoder.conv_stem.conv2.weight": [Part(audio + "embedder.conv2.weight")],
        "encoder.conv_stem.conv2.bias": [Part(audio + "embedder.conv2.bias")],
        "encoder.norm.weight": [Part(audio + "norm.weight")],
        "adapter.w_in.weight": [Part(proj + "linear_1.weight")],
        "adapter.w_out.weight": [Part(proj + "linear_2.weight")],
        "decoder.tok_embeddings.weight": [Part(text + "embed_tokens.weight")],
        "decoder.norm.weight": [Part(text + "norm.weight")],
    }
    enc_names = {"attention_norm": "self_attn_layer_norm.weight", "ffn_norm": "final_layer_norm.weight",
                 "wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
                 "wo": "self_attn.o_proj", "w1": "mlp.gate_proj.weight", "w2": "mlp.down_proj",
                 "w3": "mlp.up_proj.weight"}
    for i in range(cfg.encoder.n_layers):
        parts = _encoder_layer_parts(cfg, lambda n, i=i: f"{audio}layers.{i}.{n}", enc_names, rope=False)
        layout.update({f"encoder.layers.{i}.{k}": v for k, v in parts.items()})
    dec_names = {"attention_norm": "input_layernorm.weight", "ffn_norm": "post_attention_layernorm.weight",
                 "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
                 "wo": "self_attn.o_proj.weight", "ada_in": "ada_rms_norm.linear1.weight",
                 "ada_out": "ada_rms_norm.linear2.weight", "w1": "mlp.gate_proj.weight",
                 "w2": "mlp.down_proj.weight", "w3": "mlp.up_proj.weight"}
    for i in range(cfg.decoder.n_layers):
        parts = _decoder_layer_parts(cfg, lambda n, i=i: f"{text}layers.{i}.{n}", dec_names, rope=False)
        layout.update({f"decoder.layers.{i}.{k}": v for k, v in parts.items()})
    return layout


def interleaved_to_half_split(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from RoPE pairs (2i, 2i+1) to halves (i, i + hd/2): [evens, then odds]."""
    rows = weight.shape[0]
    head_dim = rows // n_heads
    rest = weight.shape[1:]
    return weight.reshape(n_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)


def half_split_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows = weight.shape[0]
    head_dim = rows // n_heads
    rest = weight.shape[1:]
    return weight.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(rows, *rest)


# ---------------------------------------------------------------------------------------------------------------
# Putting it together


@dataclass
class Checkpoint:
    """A located checkpoint: its config, its tokenizer file and how to read its weights."""

    folder: Path
    config: ModelConfig
    tokenizer_path: Path
    weight_files: list[Path]
    layout: Callable[[ModelConfig, set[str]], dict[str, list[Part]]]
    format: str


def inspect_checkpoint(folder: Path) -> Checkpoint:
    """Recognize the layout of ``folder``, read its config and check its weight files' headers against it (so a
    bad download fails here, before the tokenizer is read); raise CheckpointError naming what is wrong."""
    tekken = folder / "tekken.json"
    if (folder / "params.json").is_file() or (folder / "consolidated.safetensors").is_file():
        for name in MISTRAL_FILES:
            if not (folder / name).is_file():
                raise CheckpointError(f"{folder}: Mistral-format checkpoint is missing {name}")
        tokenizer_audio = _read_tekken_audio(tekken)
        params = _read_json(folder / "params.json")
        try:
            config = ModelConfig.from_params_json(params, tokenizer_audio)
        except CheckpointError as err:  # its messages name the file but not the folder
            raise CheckpointError(f"{folder}: {err}") from None
        checkpoint = Checkpoint(folder, config, tekken, [folder / "consolidated.safetensors"], mistral_layout,
                                "mistral")
        check_weights(checkpoint)
        return checkpoint
    if (folder / "config.json").is_file():
        files = sorted(p for p in folder.glob("model*.safetensors"))
        if not files:
            raise CheckpointError(f"{folder}: config.json found but no model*.safetensors weights")
        if not tekken.is_file():
            raise CheckpointError(f"{folder}: transformers checkpoint without tekken.json (the tokenizer)")
        pre = folder / "preprocessor_config.json"
        hf_config, tokenizer_audio = _read_json(folder / "config.json"), _read_tekken_audio(tekken)
        preprocessor = _read_json(pre) if pre.is_file() else None
        try:
            config = ModelConfig.from_hf_config(hf_config, tokenizer_audio, preprocessor)
        except CheckpointError as err:
            raise CheckpointError(f"{folder}: {err}") from None
        checkpoint = Checkpoint(folder, config, tekken, files, hf_layout, "transformers")
        check_weights(checkpoint)
        return checkpoint
    raise CheckpointError(f"{folder}: not a Voxtral checkpoint (expected consolidated.safetensors + params.json + "
                          "tekken.json, or config.json + model*.safetensors)")


def check_weights(checkpoint: Checkpoint) -> None:
    """Read only the weight files' headers: every tensor the config needs is there, complete, with its shape."""
    with torch.device("meta"):
        network = VoxtralRealtime(checkpoint.config)
    files = TensorFiles(checkpoint.weight_files, torch.device("cpu"))
    try:
        _checked_layout(files, checkpoint, {name: tuple(p.shape) for name, p in network.named_parameters()})
    finally:
        files.close()


def _checked_layout(files: TensorFiles, checkpoint: Checkpoint,
                    expected: dict[str, tuple[int, ...]]) -> dict[str, list[Part]]:
    keys = files.keys()
    layout = checkpoint.layout(checkpoint.config, keys)
    used = used_keys(layout)
    missing = sorted(used - keys)
    if missing:
        raise CheckpointError(f"{checkpoint.folder}: checkpoint lacks tensor(s) {some_names(missing)}; "
                              f"it does not match its {_config_name(checkpoint)}")
    # Tensors of layers past the config's n_layers would otherwise be ignored, giving a silently wrong model.
    extra = sorted(k for k in keys - used if _LAYER.sub(r"\1layers.0.", k, count=1) in used)
    if extra:
        raise CheckpointError(f"{checkpoint.folder}: checkpoint has more layers than its {_config_name(checkpoint)} "
                              f"says (it also has {some_names(extra)})")
    if wrong := first_wrong_shape(_ordered(layout, expected), expected, files.shape):
        key, got, want = wrong
        raise CheckpointError(f"{checkpoint.folder}: tensor {key} has shape {got}, expected {want} from its "
                              f"{_config_name(checkpoint)}")
    return layout


def used_keys(layout: dict[str, list[Part]]) -> set[str]:
    """The file tensors a layout reads."""
    return {p.key for parts in layout.values() for p in parts if p.key}


def first_wrong_shape(parts: Iterable[tuple[str, list[Part]]], expected: dict[str, tuple[int, ...]],
                      shape_of: Callable[[str], tuple[int, ...]]) -> tuple[str, list[int], list[int]] | None:
    """The first file tensor whose shape (``shape_of(key)``) is not what its network parameter needs:
    (key, its shape, the shape wanted), or None."""
    for name, name_parts in parts:
        shape = expected[name]
        for part in name_parts:
            want = (part.rows or shape[0], *shape[1:])
            if part.key is not None and (got := tuple(shape_of(part.key))) != want:
                return part.key, list(got), list(want)
    return None


_LAYER = re.compile(r"(^|\.)layers\.\d+\.")


def some_names(names: list[str]) -> str:
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(names[:3]) + more


def load_weights(network: VoxtralRealtime, checkpoint: Checkpoint, *, device: torch.device, dtype: torch.dtype,
                 progress: ProgressCallback | None = None) -> None:
    """Fill a meta-device network with the checkpoint's weights on ``device`` in ``dtype``."""
    files = TensorFiles(checkpoint.weight_files, device)
    try:
        expected = {name: tuple(p.shape) for name, p in network.named_parameters()}
        layout = _checked_layout(files, checkpoint, expected)
        state: dict[str, torch.Tensor] = {}
        for done, (name, parts) in enumerate(layout.items()):
            state[name] = _assemble(files, name, parts, expected[name], checkpoint, device, dtype)
            if progress:
                progress(done + 1, len(layout))
        network.load_state_dict(state, strict=True, assign=True)
    finally:
        files.close()
    network.rebuild_buffers()
    network.eval()


def _ordered(layout: dict[str, list[Part]], expected: dict[str, tuple[int, ...]]) -> Iterator[tuple[str, list[Part]]]:
    if set(layout) != set(expected):  # a bug in the layout tables, not a user error
        raise AssertionError(f"layout/network mismatch: {sorted(set(layout) ^ set(expected))[:5]}")
    return iter(layout.items())


def _assemble(files: TensorFiles, name: str, parts: list[Part], shape: tuple[int, ...], checkpoint: Checkpoint,
              device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    pieces = []
    for part in parts:
        want = (part.rows or shape[0], *shape[1:])
        if part.key is None:
            pieces.append(torch.zeros(want, device=device, dtype=dtype))
            continue
        tensor = files.get(part.key).to(device=device, dtype=dtype)
        pieces.append(interleaved_to_half_split(tensor, part.rope_heads) if part.rope_heads else tensor)
    return (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).contiguous()


def mistral_state_dict(network: VoxtralRealtime) -> dict[str, torch.Tensor]:
    """The network's weights under Mistral names and row order (the inverse of loading a Mistral folder)."""
    return export_state_dict(network, mistral_layout(network.config, set()))


def export_state_dict(network: VoxtralRealtime, layout: dict[str, list[Part]]) -> dict[str, torch.Tensor]:
    """The network's weights under the names and row order of ``layout`` (the inverse of loading it)."""
    params = dict(network.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for name, parts in layout.items():
        pieces = params[name].detach().split([p.rows or params[name].shape[0] for p in parts])
        for part, piece in zip(parts, pieces):
            if part.key is not None:
                out[part.key] = half_split_to_interleaved(piece, part.rope_heads) if part.rope_heads else piece
    return {k: v.contiguous() for k, v in out.items()}


def _read_tekken_audio(path: Path) -> dict[str, Any]:
    audio = _read_json(path).get("audio")
    if not isinstance(audio, dict):
        raise CheckpointError(f"{path}: tokenizer has no 'audio' section; not a Voxtral Realtime tokenizer")
    return audio


def _config_name(checkpoint: Checkpoint) -> str:
    return "params.json" if checkpoint.format == "mistral" else "config.json"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data

