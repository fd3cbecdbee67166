"""voxtral-realtime: Mistral's streaming speech recognition model Voxtral Mini 4B Realtime, in PyTorch.

Data flows one way, one module per stage: ``audio`` (files -> 16 kHz samples) -> ``features`` (log-mel) ->
``encoder`` -> ``adapter`` -> ``decoder`` (tokens) -> ``tokenizer`` (text); ``streaming`` runs the protocol,
``loading`` finds and reads checkpoints, ``api`` is the small public surface re-exported here.
"""

from .api import Model, load
from .audio import load_audio
from .errors import AudioError, CheckpointError, DownloadError, VoxtralError
from .loading import DEFAULT_MODEL, download
from .streaming import StreamingSession
from .transcription import Transcription

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL", "AudioError", "CheckpointError", "DownloadError", "Model", "StreamingSession",
    "Transcription", "VoxtralError", "__version__", "download", "load", "load_audio",
]
