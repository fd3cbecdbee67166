"""The user-facing API: :func:`load` a checkpoint, then :meth:`Model.transcribe` a file or :meth:`Model.stream`.

    >>> import voxtral_realtime
    >>> model = voxtral_realtime.load()                    # the Hub model, on the GPU when there is one
    >>> model.transcribe("speech.wav").text
    >>> session = model.stream(delay_ms=480)               # live: feed samples as they arrive
    >>> for chunk in microphone(): print(session.feed(chunk), end="")
    >>> print(session.finish())
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .audio import load_audio
from .config import ModelConfig
from .engine import Engine
from .errors import CheckpointError, UsageError
from .loading import DEFAULT_MODEL, inspect_checkpoint, load_weights, resolve_model_dir
from .model import VoxtralRealtime
from .streaming import StreamingSession
from .tokenizer import Tokenizer
from .transcription import Transcription

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "f16": torch.float16, "float16": torch.float16,
          "fp16": torch.float16, "f32": torch.float32, "float32": torch.float32, "fp32": torch.float32}

#: Seconds of audio :meth:`Model.transcribe` hands its session at a time, by device type ("other": the rest).  On
#: CUDA an encoder call costs about the same whatever its size (docs/performance.md, "The engine"), so a recording
#: goes in pieces of 10 minutes, which bound the audio embeddings encoded ahead of the decoder (46 MB in bf16); on
#: a CPU the encoder's time follows the audio, and short pieces keep the progress moving.
TRANSCRIBE_PIECE_SECONDS = {"cuda": 600.0, "other": 10.0}

AudioInput = str | os.PathLike[str] | np.ndarray | torch.Tensor


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (the checkpoint's own precision), f16 on Apple GPUs, f32 on the CPU (exact, and fast there)."""
    return {"cuda": torch.bfloat16, "mps": torch.float16}.get(device.type, torch.float32)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise UsageError(f"unknown dtype {dtype!r}; use bf16, f16 or f32") from None


class Model:
    """A loaded Voxtral Realtime model: network weights, tokenizer and config on one device."""

    def __init__(self, network: VoxtralRealtime, tokenizer: Tokenizer, source: str) -> None:
        self.network = network
        self.tokenizer = tokenizer
        self.source = source
        self._private_engines: list[Engine] = []
        #: compile the batched calls of every engine made from now on with torch.compile (CUDA; slow to start)
        self.compile = False

    @property
    def config(self) -> ModelConfig:
        return self.network.config

    @property
    def device(self) -> torch.device:
        return self.network.device

    @property
    def dtype(self) -> torch.dtype:
        return self.network.dtype

    def engine(self, max_streams: int, *, decoder_context: int | None = None) -> Engine:
        """A batched engine for up to ``max_streams`` concurrent sessions (pass it to :meth:`stream`).

        ``decoder_context`` caps each stream's decoder attention (and KV memory) at that many tokens (80 ms
        each); the default is the model's full window, 8192 tokens, about 870 MB per stream in bf16.
        """
        return Engine(self.network, max_streams=max_streams, decoder_context=decoder_context, compile=self.compile,
                      no_speech_id=self.tokenizer.streaming_pad_id)

    def engine_for_session(self) -> Engine:
        """A one-stream engine with a free slot, reused across sessions so its caches and CUDA graphs are kept."""
        # an engine made before the network's layers were replaced, or with the other compile setting, is stale:
        # dropped once its session is over
        key = self._engine_key()
        self._private_engines = [e for e in self._private_engines if e.made_for == key or not e.free_slots]
        for engine in self._private_engines:
            if engine.made_for == key and engine.free_slots:
                return engine
        engine = Engine(self.network, max_streams=1, compile=self.compile, no_speech_id=self.tokenizer.streaming_pad_id)
        self._private_engines.append(engine)
        return engine

    def warm_up(self) -> None:
        """Make the engine :meth:`transcribe` and :meth:`stream` use and capture its CUDA graphs (after compiling,
        with ``compile``) now, so that the first audio does not wait for them."""
        self.engine_for_session().capture_graphs()

    def _engine_key(self) -> tuple[int, bool]:
        return self.network.layers_version, self.compile

    @property
    def transcription_piece(self) -> int:
        """Samples :meth:`transcribe` hands its session at a time (see TRANSCRIBE_PIECE_SECONDS)."""
        seconds = TRANSCRIBE_PIECE_SECONDS.get(self.device.type, TRANSCRIBE_PIECE_SECONDS["other"])
        return int(seconds * self.config.audio.sample_rate)

    def stream(self, *, delay_ms: int | None = None, continue_after_eos: bool = False,
               engine: Engine | None = None) -> StreamingSession:
        """A live session: ``feed()`` 16 kHz float32 mono samples as they come, then ``finish()``.

        By default the stream ends where the model says EOS, exactly like :meth:`transcribe`; an always-on
        stream (a microphone) passes ``continue_after_eos=True`` to go on with a fresh segment instead.
        Sessions given the same ``engine`` (:meth:`engine`) are computed together, in batches.
        """
        return StreamingSession(self, delay_ms=delay_ms, continue_after_eos=continue_after_eos, engine=engine)

    def transcribe(self, audio: AudioInput, *, delay_ms: int | None = None, sample_rate: int | None = None,
                   progress: Callable[[float, float], None] | None = None) -> Transcription:
        """Transcribe a whole file (any format ffmpeg reads) or an array of samples.

        ``delay_ms``: the model's look-ahead (80..1200 in 80 ms steps, or 2400); None uses the checkpoint's
        default (480).  ``sample_rate``: of an array (default 16000; other rates and (n, channels) arrays are
        resampled and mixed down).  ``progress(seconds_done, seconds_total)`` is called as audio is consumed.
        """
        samples = load_audio(audio, sample_rate=sample_rate)
        session = StreamingSession(self, delay_ms=delay_ms, track_latency=False)
        total = len(samples) / self.config.audio.sample_rate
        session.feed_all(samples, piece=self.transcription_piece,
                         progress=(lambda done: progress(done, total)) if progress else None)
        if progress:
            progress(total, total)
        return session.transcription


def load(model: str | os.PathLike[str] = DEFAULT_MODEL, *, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, revision: str | None = None, cache_dir: str | None = None,
         progress: Callable[[int, int], None] | None = None,
         download_progress: Callable[[int, int], None] | None = None, status: Callable[[str], None] | None = None,
         tokenizer: str | os.PathLike[str] | None = None) -> Model:
    """Load a checkpoint from a folder (Mistral or transformers layout), a Hugging Face Hub repo id, or a GGUF
    file (``voxtral quantize``'s or the Rust project's; a shard set by any shard or its folder).

    ``device``: "cuda", "cpu", "mps"... (default: the best available); ``dtype``: bf16, f16, f32 or a torch
    dtype (default: bf16 on CUDA, f16 on MPS, f32 on CPU); quantized GGUF weights stay quantized.  ``revision``:
    the branch, tag or commit of a Hub repo (default: its main branch).  ``progress(done, total)`` counts loaded
    tensors, ``download_progress(done, total)`` downloaded bytes (when the repo is not in the cache yet), and
    ``status(stage)`` names each later stage as it starts ("reading the tokenizer", "loading weights").
    ``tokenizer``: a tekken.json for a GGUF file that has none (or to use instead of its own).
    """
    from .gguf_file import gguf_files, load_gguf

    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype, device)
    files = gguf_files(model)
    if files is not None:
        if revision is not None:
            raise CheckpointError(f"{model}: a GGUF file has no revisions; a revision is for Hub repo ids only")
        network, gguf_tokenizer = load_gguf(files, tokenizer=tokenizer, device=device, dtype=dtype, progress=progress)
        return Model(network, gguf_tokenizer, source=str(files[0]))
    if tokenizer is not None:
        raise CheckpointError(f"{model}: a tokenizer can only be given with a GGUF file; a checkpoint folder uses "
                              "its own tekken.json")
    report = status or (lambda stage: None)
    folder = resolve_model_dir(model, cache_dir=cache_dir, revision=revision, progress=download_progress)
    checkpoint = inspect_checkpoint(folder)
    report("reading the tokenizer")
    tokenizer = Tokenizer(checkpoint.tokenizer_path)
    report("loading weights")
    with torch.device("meta"):
        network = VoxtralRealtime(checkpoint.config)
    load_weights(network, checkpoint, device=device, dtype=dtype, progress=progress)
    return Model(network, tokenizer, source=str(Path(folder)))
