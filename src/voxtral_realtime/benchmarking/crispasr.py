"""CrispASR (ggml's implementation of this model, PyPI ``crispasr``) timed on the same CPU, beside ``voxtral bench``.

Its GGUF is built the way its users build theirs, from random full-size weights: a transformers-layout f16
checkpoint (names and shapes from transformers' ``VoxtralRealtimeForConditionalGeneration`` on the meta device),
CrispASR's own converter (``models/convert-voxtral4b-to-gguf.py`` of its repository; not on PyPI, so its path is
an option), then Q4_K by ggml's own ``ggml_quantize_chunk`` from the wheel's ``libggml-base`` (the wheel ships no
quantize tool).  The result is cached.

Timings go through its Python binding in a fresh process each (its switches are read from the environment when
the library loads): the decoder step from the library's own per-call timing lines (``CRISPASR_VOXTRAL4B_BENCH``:
one ``llm_kv`` line per decoder call, the first one the prompt's prefill), offline RTF with the whole encoder in
one graph (``CRISPASR_VOXTRAL4B_STREAM_BATCH_ENCODER=1``, its fastest offline path), live RTF with 80 ms feeds
decoded as they come.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..audio import SAMPLE_RATE
from ..errors import UsageError
from .cpu import CACHE_DIR

QTYPE = "q4_k"
_SWITCHES = {"CRISPASR_VOXTRAL4B_BENCH": "1", "CRISPASR_VOXTRAL4B_STREAM_TIMING": "1"}
_OFFLINE = {"CRISPASR_VOXTRAL4B_STREAM_BATCH_ENCODER": "1"}


def available() -> bool:
    return importlib.util.find_spec("crispasr") is not None


def check_options(converter: Path | None) -> Path:
    """The converter's path, or a one-line error saying what is missing."""
    if not available():
        raise UsageError("--compare crispasr needs the crispasr package: pip install crispasr")
    if converter is None or not converter.is_file():
        where = f"{converter}: no such file" if converter else "give --crispasr-converter PATH"
        raise UsageError(f"--compare crispasr: {where} (models/convert-voxtral4b-to-gguf.py of the CrispASR "
                         "repository, github.com/CrispStrobe/CrispASR)")
    return converter


# -- the checkpoint -------------------------------------------------------------------------------------------

def disk_name(key: str) -> str | None:
    """A transformers model's in-memory parameter name -> the name ``save_pretrained`` stores (None: the tied LM
    head, not stored)."""
    if key == "lm_head.weight":
        return None
    for memory, disk in (("model.audio_tower.", "audio_tower."),
                         ("model.multi_modal_projector.", "multi_modal_projector."),
                         ("model.language_model.", "language_model.model.")):
        if key.startswith(memory):
            return disk + key.removeprefix(memory)
    raise KeyError(f"unexpected parameter {key}")


def write_hf_checkpoint(folder: Path, config: Any = None, *, shard_bytes: int = 2 * 10**9, seed: int = 0) -> Path:
    """A random-weight checkpoint in the transformers layout at f16 (``config``: a ``VoxtralRealtimeConfig``;
    default the real model's sizes), written a shard at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import VoxtralRealtimeConfig, VoxtralRealtimeForConditionalGeneration

    from .random_weights import random_init, write_tekken_json

    config = config or VoxtralRealtimeConfig()  # its defaults are the real model's sizes
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in
                  VoxtralRealtimeForConditionalGeneration(config).state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    config.torch_dtype = torch.float16
    config.to_json_file(str(folder / "config.json"))
    write_tekken_json(folder / "tekken.json")
    generator = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    size = written = 0
    for key, shape in shapes.items():
        name = disk_name(key)
        if name is None:
            continue
        nbytes = 2 * torch.Size(shape).numel()
        if shard and size + nbytes > shard_bytes:
            written += 1
            save_file(shard, str(folder / f"model-{written:05d}.safetensors"), metadata={"format": "pt"})
            shard, size = {}, 0
        # the same value scales as our random weights (the token table by our name for it)
        mean, std = random_init("tok_embeddings.weight" if name.endswith("embed_tokens.weight") else name, shape)
        shard[name] = torch.randn(shape, generator=generator).mul_(std).add_(mean).half()
        size += nbytes
    save_file(shard, str(folder / f"model-{written + 1:05d}.safetensors"), metadata={"format": "pt"})
    return folder


# -- Q4_K through ggml --------------------------------------------------------------------------------------

def _ggml() -> Any:
    import ctypes

    import crispasr

    lib = ctypes.CDLL(str(Path(crispasr.__file__).parent / "libggml-base.so"))
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_row_size.restype = ctypes.c_size_t
    return lib


def quantized_type(name: str, shape: list[int], source: Any) -> Any:
    """What CrispASR's quantize tool makes of a tensor for Q4_K (``shape`` in ggml order, row length first):
    2-D weights other than norms, from f16/f32; a row that is not whole 256-value super-blocks falls back to Q4_0
    (32-value blocks) or stays as it is."""
    from gguf import GGMLQuantizationType as T

    if len(shape) != 2 or "weight" not in name or "norm" in name or source not in (T.F32, T.F16):
        return source
    return T.Q4_K if shape[0] % 256 == 0 else T.Q4_0 if shape[0] % 32 == 0 else source


def quantize_gguf(source: Path, out: Path, *, threads: int) -> None:
    """``source`` (the converter's f16 GGUF) -> ``out`` at Q4_K, metadata copied."""
    from concurrent.futures import ThreadPoolExecutor

    import gguf
    from gguf import GGUFValueType

    lib = _ggml()
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(out, arch=reader.get_field("general.architecture").contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type",
                                                             "general.quantization_version"):
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind,
                             **({"sub_type": field.types[-1]} if kind == GGUFValueType.ARRAY else {}))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(15)  # MOSTLY_Q4_K_M's number, as llama.cpp labels such files
    plan = []
    for tensor in reader.tensors:
        shape = [int(n) for n in tensor.shape]
        kind = quantized_type(tensor.name, shape, tensor.tensor_type)
        plan.append((tensor, shape, kind))
        if kind == tensor.tensor_type:
            writer.add_tensor_info(tensor.name, list(reversed(shape)), tensor.data.dtype, tensor.data.nbytes,
                                   raw_dtype=kind)
        else:
            rows, row_bytes = int(np.prod(shape[1:])), lib.ggml_row_size(int(kind), shape[0])
            writer.add_tensor_info(tensor.name, [rows, row_bytes], np.dtype(np.uint8), rows * row_bytes,
                                   raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    with ThreadPoolExecutor(threads) as pool:
        for tensor, shape, kind in plan:
            if kind == tensor.tensor_type:
                writer.write_tensor_data(np.asarray(tensor.data))
                continue
            width = shape[0]
            values = np.ascontiguousarray(np.asarray(tensor.data), dtype=np.float32).reshape(-1, width)
            packed = np.empty((values.shape[0], lib.ggml_row_size(int(kind), width)), dtype=np.uint8)
            per_job = -(-values.shape[0] // threads)
            # ggml_quantize_chunk's start is an element offset into both the source and the output
            list(pool.map(lambda first: lib.ggml_quantize_chunk(
                int(kind), values.ctypes.data, packed.ctypes.data, first * width,
                min(per_job, values.shape[0] - first), width, None), range(0, values.shape[0], per_job)))
            writer.write_tensor_data(packed)
    writer.close()


def crispasr_gguf(converter: Path, *, threads: int, cache_dir: Path = CACHE_DIR) -> Path:
    """CrispASR's full-size random-weight Q4_K file, built once (checkpoint, its converter, ggml's quantizer;
    about 9 GB of memory and 20 GB of disk on the way) and cached."""
    out = cache_dir / f"crispasr-random-full-{QTYPE}.gguf"
    if out.is_file():
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as work:
        checkpoint = write_hf_checkpoint(Path(work) / "hf")
        f16 = Path(work) / "f16.gguf"
        done = subprocess.run([sys.executable, str(converter), "--input", str(checkpoint), "--output", str(f16)],
                              capture_output=True, text=True)
        if done.returncode:
            last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
            raise UsageError(f"{converter}: the converter failed: {last}")
        shutil.rmtree(checkpoint)
        partial = Path(work) / "q4_k.gguf"
        quantize_gguf(f16, partial, threads=threads)
        partial.rename(out)
    return out


# -- timing -----------------------------------------------------------------------------------------------

def parse_timing(text: str) -> dict[str, Any]:
    """The library's timing lines (stderr) -> decoder calls and ms per decoder step (the first ``llm_kv`` call is
    the prompt's prefill, the rest one step each), and its streaming drain summary when present."""
    out: dict[str, Any] = {}
    calls = [float(ms) for ms in re.findall(r"voxtral4b_bench: llm_kv\s+([\d.]+) ms", text)]
    if calls:
        out["prefill_ms"] = calls[0]
        out["decoder_steps"] = len(calls) - 1
        if len(calls) > 1:
            out["decoder_step_ms"] = statistics.fmean(calls[1:])
            out["decoder_step_ms_median"] = statistics.median(calls[1:])
    drain = re.search(r"drain (\d+) decode steps in ([\d.]+) ms \(avg ([\d.]+) ms/step\)", text)
    if drain:
        out["drain_steps"], out["drain_ms_per_step"] = int(drain.group(1)), float(drain.group(3))
    return out


class _CapturedStderr:
    """What C code writes to file descriptor 2 inside the block (``.text`` afterwards)."""

    def __enter__(self) -> _CapturedStderr:
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self.text = self._file.read().decode("utf-8", "replace")
        self._file.close()


def measure(model: str, audio: np.ndarray, threads: int, mode: str) -> dict[str, Any]:
    """One timing in this process: ``mode`` "offline" (``Session.transcribe``) or "live" (a live-decoding stream
    fed 80 ms at a time, then flushed).  Must run in a process whose library is not loaded yet."""
    os.environ.update(_SWITCHES | (_OFFLINE if mode == "offline" else {}))
    import crispasr

    session = crispasr.Session(model, n_threads=threads, backend="voxtral4b", use_gpu=False, verbosity=1)
    piece = SAMPLE_RATE * 80 // 1000
    audio = np.asarray(audio, dtype=np.float32)
    with _CapturedStderr() as captured:
        started = time.perf_counter()
        if mode == "offline":
            session.transcribe(audio)
        else:
            stream = session.stream_open(live=True)
            for start in range(0, len(audio), piece):
                stream.feed(audio[start:start + piece])
            stream.flush()
            stream.close()
        seconds = time.perf_counter() - started
    session.close()
    return {"mode": mode, "seconds": seconds, "rtf": seconds / (len(audio) / SAMPLE_RATE),
            **parse_timing(captured.text)}


def measure_fresh(model: str, audio: np.ndarray, threads: int, mode: str) -> dict[str, Any]:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, model, audio, threads, mode).result()


def bench(converter: Path, audio: np.ndarray, threads: list[int], *, cache_dir: Path = CACHE_DIR) -> dict[str, Any]:
    """CrispASR's numbers at each thread count: decoder step, offline RTF, live RTF."""
    from importlib.metadata import PackageNotFoundError, version

    model = crispasr_gguf(converter, threads=max(threads), cache_dir=cache_dir)
    try:
        release = version("crispasr")
    except PackageNotFoundError:
        release = "unknown"
    runs = []
    for n in threads:
        offline = measure_fresh(str(model), audio, n, "offline")
        live = measure_fresh(str(model), audio, n, "live")
        runs.append({"threads": n, "decoder_step_ms": offline.get("decoder_step_ms"), "offline_rtf": offline["rtf"],
                     "live_rtf": live["rtf"], "live_decoder_step_ms": live.get("decoder_step_ms"),
                     "offline": offline, "live": live})
    return {"version": release, "qtype": QTYPE, "model": str(model), "converter": str(converter),
            "audio_s": len(audio) / SAMPLE_RATE, "runs": runs}

