"""voxtral-realtime: Mistral's streaming speech recognition model Voxtral Mini 4B Realtime, in PyTorch.

Data flows one way (docs/architecture.md); every module in a line:

* ``errors``: the user errors, one class per kind of mistake.
* ``config``: hyperparameters read from a checkpoint, and the model's constants.
* ``audio``: files, arrays and URLs to 16 kHz mono samples; resampling.
* ``features``: samples to log-mel frames, incrementally.
* ``layers``: what encoder and decoder share: RMSNorm, rotary embedding, the KV ring, attention, SwiGLU.
* ``encoder``: mel frames to encoder frames (causal conv stem, windowed transformer).
* ``adapter``: four encoder frames to one audio embedding per 80 ms.
* ``decoder``: token + audio embedding to the next token's logits; the fused one-stream step.
* ``model``: the whole network (weights only).
* ``kernels``: the Triton kernels (``attention``, ``gemv``, ``q4``, ``rounding``, ``common``).
* ``tokenizer``: token ids to text.
* ``transcription``: the result: text, tokens, timed words.
* ``writers``: transcripts as txt, json, srt and vtt.
* ``loading``: finding, checking and reading checkpoints (folders, the Hub).
* ``quantization``: the GGUF block formats and the quantized layers.
* ``cpu_kernels``: the quantized layers' products on the CPU, through onnxruntime (int8 activations).
* ``gguf_file``: reading and writing GGUF files.
* ``protocol``: the streaming protocol's prompt, left padding and closing silence.
* ``engine``: the batched computation of many streams, one slot each.
* ``streaming``: a session: audio in, text out; what it needs of a model and an engine.
* ``api``: ``load()`` and ``Model``, the public surface re-exported here.
* ``batch``: a corpus to JSONL, in this process or on Ray.
* ``server``: the HTTP/WebSocket server (``app``, ``realtime``, ``state``, ``worker``, ``load``, ``keepalive``,
  ``verbose``, ``replicas``).
* ``browser``: the ONNX export for a web page (``graphs``, ``export``, ``runner``, ``page``).
* ``benchmarking``: ``benchmark`` (the runs), ``cpu`` (the CPU bench: a fresh process per model, against the
  memory bandwidth), ``crispasr`` (ggml's implementation timed beside it), ``random_weights`` (full-size networks
  without the real files), ``signals`` (synthetic speech-like audio), ``reference`` (transformers' model on our
  weights).
* ``cli``: the ``voxtral`` command, one module per subcommand (``transcribe``, ``listen``, ``bench``,
  ``download``, ``quantize``, ``serve``, ``batch``, ``export``); ``common`` holds what they share.
"""

from .api import Model, load
from .audio import load_audio
from .errors import AudioError, CheckpointError, DownloadError, UsageError, VoxtralError
from .loading import DEFAULT_MODEL, download
from .streaming import StreamingSession
from .transcription import Transcription

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL", "AudioError", "CheckpointError", "DownloadError", "Model", "StreamingSession",
    "Transcription", "UsageError", "VoxtralError", "__version__", "download", "load", "load_audio",
]
