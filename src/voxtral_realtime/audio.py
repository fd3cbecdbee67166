"""Audio input: turn a file, raw bytes or an array of samples into 16 kHz mono float32.

All decoding and resampling goes through PyAV (FFmpeg), so any container/codec that FFmpeg reads works and
files and arrays share one resampler.  Every problem a user can cause is raised as
:class:`~voxtral_realtime.errors.AudioError` with a one-line message naming the input; PyAV/FFmpeg and
``OSError`` exceptions never escape.
"""

from __future__ import annotations

import io
import os
import sys
from typing import IO, TYPE_CHECKING, Any, Union

import av
import av.error
import numpy as np

from voxtral_realtime.errors import AudioError

if TYPE_CHECKING:
    import torch

__all__ = ["SAMPLE_RATE", "AudioSource", "AudioTooLong", "audio_duration", "load_audio"]

SAMPLE_RATE = 16000
"""Sample rate (Hz) the model expects."""

MAX_CHANNELS = 8
"""Widest channel count accepted for arrays; also how the channel axis of a 2-D array is recognised."""

AudioSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, IO[bytes], np.ndarray, "torch.Tensor"]
"""Anything :func:`load_audio` accepts."""

# Exceptions that mean "this input is bad", not "this module is buggy".  PyAV raises FFmpegError subclasses
# (some of them also ValueError/OSError), Python file objects raise OSError, and odd file-likes may raise
# TypeError/ValueError/EOFError from inside PyAV's I/O callbacks.
_INPUT_ERRORS = (av.error.FFmpegError, OSError, EOFError, ValueError, TypeError)

# Integer PCM is scaled by its full-scale value; uint8 is offset binary (WAV 8-bit convention).
_INT_SCALE = {np.dtype(np.int8): 2.0**7, np.dtype(np.int16): 2.0**15, np.dtype(np.int32): 2.0**31}

# FFmpeg leaves a float downmix unnormalised (stereo -> mono is 0.707 * (L + R), which can exceed 1.0);
# capping the matrix gain at 1 makes stereo the plain average of the channels, as for arrays, and keeps
# FFmpeg's standard weights (normalised to sum 1, LFE dropped) for surround layouts.
_RESAMPLER_OPTIONS = {"rematrix_maxval": "1.0"}

# Arrays are fed to the resampler in pieces so a long recording never becomes one giant AVFrame.
_CHUNK = 1 << 18

#: Sample rates a file may declare.  Below the minimum no real recording exists, and a decoded frame would grow by
#: the resampling factor (a WAV header saying 1 Hz turns each 4 KiB packet into 130 MB at 16 kHz).
MIN_FILE_RATE = 1000
MAX_FILE_RATE = 768_000


class AudioTooLong(AudioError):
    """The audio lasts longer than the caller's ``max_seconds`` (found before or while decoding, not after)."""

    def __init__(self, message: str, seconds: float) -> None:
        super().__init__(message)
        #: the duration the container declares, or how far decoding got when it stopped
        self.seconds = seconds


def load_audio(source: AudioSource, *, sample_rate: int | None = None,
               max_seconds: float | None = None) -> np.ndarray:
    """Load audio as the model wants it: 1-D, contiguous, float32, mono, :data:`SAMPLE_RATE` Hz.

    ``source`` may be

    * a path (``str`` or ``os.PathLike``) to any file FFmpeg can decode (wav, flac, ogg/vorbis, ogg/opus,
      mp3, m4a/aac, webm/opus, video files...).  The first audio stream is used.
    * ``bytes`` / ``bytearray`` / ``memoryview`` holding such a file, or a binary file-like object
      (e.g. an uploaded file).
    * a ``numpy.ndarray`` or ``torch.Tensor`` of samples, shape ``(n,)`` or ``(n, channels)`` (``(channels,
      n)`` is recognised too, see :func:`_to_mono`), float in ``[-1, 1]`` or int8/uint8/int16/int32 PCM.
      Channels are averaged (for files too; surround files get FFmpeg's standard downmix weights, normalised
      to sum 1).  ``sample_rate`` is the array's rate; ``None`` means it is already 16 kHz.

    ``sample_rate`` is ignored for files and bytes, which carry their own rate.  ``max_seconds`` (files and bytes):
    refuse longer audio with :class:`AudioTooLong`, from the container's declared duration before decoding, and
    while decoding (stopping there) when it declares none or lies, so memory stays bounded by the limit.  A file's
    sample rate must be one of real audio (:data:`MIN_FILE_RATE` to :data:`MAX_FILE_RATE`).  Float samples outside
    ``[-1, 1]`` are kept as they are, not clipped.  An array that is already float32 mono 16 kHz is returned
    without a copy (it may share memory with ``source``).

    Raises:
        AudioError: with a one-line message naming the input, for a missing/unreadable/empty file, data
            that is not audio or is corrupt, audio with no samples, non-finite samples, a bad array shape,
            dtype or sample rate.
    """
    torch = sys.modules.get("torch")  # a tensor can only exist if torch is already imported
    if isinstance(source, np.ndarray) or (torch is not None and isinstance(source, torch.Tensor)):
        return _load_array(source, sample_rate)
    if isinstance(source, (str, os.PathLike)):
        return _load_path(source, max_seconds)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return _load_bytes(data, f"<{len(data)} bytes of audio>", max_seconds)
    if hasattr(source, "read"):
        return _load_file_object(source, max_seconds)
    raise AudioError(
        f"cannot load audio from a {type(source).__name__}: expected a path, bytes, a binary file object, "
        "a numpy array or a torch tensor"
    )


def audio_duration(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """Duration in seconds of 1-D ``samples`` at ``sample_rate`` Hz (length of axis 0 for 2-D input)."""
    return len(samples) / float(sample_rate)


# --------------------------------------------------------------------------------------------------- files


def _load_path(path: str | os.PathLike[str], max_seconds: float | None) -> np.ndarray:
    name = os.path.expanduser(os.fsdecode(path))
    label = repr(name)
    # Check the path up front: FFmpeg's own messages for these cases are vague ("No such file" vs a
    # protocol error) and a directory may even "open" successfully.
    try:
        st = os.stat(name)
    except FileNotFoundError:
        raise AudioError(f"cannot load audio {label}: file not found") from None
    except PermissionError:
        raise AudioError(f"cannot load audio {label}: permission denied") from None
    except (OSError, ValueError) as err:  # ValueError: embedded NUL byte in the path
        raise AudioError(f"cannot load audio {label}: {_describe(err)}") from None
    if os.path.isdir(name):
        raise AudioError(f"cannot load audio {label}: is a directory, not an audio file")
    if st.st_size == 0 and os.path.isfile(name):
        raise AudioError(f"cannot load audio {label}: the file is empty (0 bytes)")
    # The "file:" prefix stops FFmpeg from reading a local name such as "http:x" or "concat:a|b" as a URL.
    return _decode("file:" + os.path.abspath(name), label, max_seconds)


def _load_bytes(data: bytes, label: str, max_seconds: float | None = None) -> np.ndarray:
    if not data:
        raise AudioError(f"cannot load audio {label}: no data (0 bytes)")
    return _decode(io.BytesIO(data), label, max_seconds)


def _load_file_object(fileobj: Any, max_seconds: float | None) -> np.ndarray:
    name = getattr(fileobj, "filename", None) or getattr(fileobj, "name", None)
    label = repr(name) if isinstance(name, str) and name else f"<{type(fileobj).__name__} object>"
    if isinstance(fileobj, io.TextIOBase):
        raise AudioError(f"cannot load audio {label}: file object is opened in text mode, open it with 'rb'")
    try:
        seekable = bool(fileobj.seekable()) if hasattr(fileobj, "seekable") else False
        if seekable:
            start = fileobj.tell()
            end = fileobj.seek(0, io.SEEK_END)
            fileobj.seek(start)
            if end is not None and end - start <= 0:
                raise AudioError(f"cannot load audio {label}: no data (0 bytes)")
            return _decode(fileobj, label, max_seconds)
        # FFmpeg's format probing wants to seek back; a pipe/stream cannot, so buffer it.
        data = fileobj.read()
    except AudioError:
        raise
    except _INPUT_ERRORS as err:
        raise AudioError(f"cannot load audio {label}: cannot read the file object ({_describe(err)})") from None
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise AudioError(f"cannot load audio {label}: read() returned {type(data).__name__}, not bytes")
    return _load_bytes(bytes(data), label, max_seconds)


def _open_options() -> dict[str, str]:
    """PyAV < 19 fails on undecodable metadata unless told to ignore it; PyAV 19 no longer takes the option."""
    major = av.__version__.split(".")[0]
    return {"metadata_errors": "ignore"} if major.isdigit() and int(major) < 19 else {}


_OPEN_OPTIONS = _open_options()


def _decode(file: str | IO[bytes], label: str, max_seconds: float | None = None) -> np.ndarray:
    """Decode the first audio stream of ``file`` to 16 kHz mono float32 (at most ``max_seconds`` of it)."""
    try:
        container = av.open(file, mode="r", **_OPEN_OPTIONS)
    except PermissionError:
        raise AudioError(f"cannot load audio {label}: permission denied") from None
    except FileNotFoundError:
        raise AudioError(f"cannot load audio {label}: file not found") from None
    except IsADirectoryError:
        raise AudioError(f"cannot load audio {label}: is a directory, not an audio file") from None
    except _INPUT_ERRORS as err:
        raise AudioError(
            f"cannot load audio {label}: not an audio file FFmpeg can read, or the data is corrupt "
            f"({_describe(err)})"
        ) from None

    chunks: list[np.ndarray] = []
    try:
        with container:
            if not container.streams.audio:
                kinds = sorted({s.type for s in container.streams if s.type})
                found = f" (found only {', '.join(kinds)} streams)" if kinds else ""
                raise AudioError(f"cannot load audio {label}: the file has no audio stream{found}")
            stream = container.streams.audio[0]
            _check_declared(container, stream, label, max_seconds)
            limit = None if max_seconds is None else int(max_seconds * SAMPLE_RATE)
            resampler = _Resampler()
            decoded = 0
            for frame in container.decode(stream):
                _check_rate_of(frame.sample_rate, label)
                pieces = resampler.push(frame)
                chunks.extend(pieces)
                decoded += sum(len(piece) for piece in pieces)
                if limit is not None and decoded > limit:
                    raise _too_long(label, decoded / SAMPLE_RATE, max_seconds, "at least ")
            chunks.extend(resampler.flush())
    except AudioError:
        raise
    except _INPUT_ERRORS as err:
        raise AudioError(f"cannot load audio {label}: corrupt or undecodable audio data ({_describe(err)})") from None

    samples = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    if max_seconds is not None and len(samples) > max_seconds * SAMPLE_RATE:  # the resampler's flush
        raise _too_long(label, len(samples) / SAMPLE_RATE, max_seconds, "")
    if samples.size == 0:
        raise AudioError(f"cannot load audio {label}: decoded audio contains no samples")
    if not np.isfinite(samples).all():
        raise AudioError(f"cannot load audio {label}: decoded audio contains NaN or infinite samples")
    return np.ascontiguousarray(samples, dtype=np.float32)


def _check_declared(container: Any, stream: Any, label: str, max_seconds: float | None) -> None:
    """Refuse what the container's header already gives away: an absurd sample rate, a duration over the limit."""
    _check_rate_of(stream.codec_context.sample_rate or stream.rate, label)
    if max_seconds is None:
        return
    declared = [float(stream.duration * stream.time_base)] if stream.duration and stream.time_base else []
    if container.duration:
        declared.append(container.duration / av.time_base)
    # the smaller of the two: an estimate from the bit rate may run long; a header that lies short is caught while
    # decoding
    if declared and min(declared) > max_seconds:
        raise _too_long(label, min(declared), max_seconds, "")


def _check_rate_of(rate: int | None, label: str) -> None:
    if rate and not MIN_FILE_RATE <= rate <= MAX_FILE_RATE:
        raise AudioError(f"cannot load audio {label}: its sample rate of {rate} Hz is not one of real audio "
                         f"({MIN_FILE_RATE} to {MAX_FILE_RATE} Hz)")


def _too_long(label: str, seconds: float, max_seconds: float, prefix: str) -> AudioTooLong:
    return AudioTooLong(f"cannot load audio {label}: it lasts {prefix}{seconds:.0f} s, more than the limit of "
                        f"{max_seconds:g} s", seconds)


class _Resampler:
    """``av.AudioResampler`` to 16 kHz mono float32 that survives mid-stream format changes.

    PyAV's resampler is configured from the first frame and raises if a later frame differs (chained Ogg,
    an AAC stream switching layout); here such a change flushes the old resampler and starts a new one.
    """

    def __init__(self) -> None:
        self._resampler: av.AudioResampler | None = None
        self._key: tuple[str, str, int] | None = None

    def push(self, frame: av.AudioFrame) -> list[np.ndarray]:
        key = (frame.format.name, frame.layout.name, frame.sample_rate)
        out: list[np.ndarray] = []
        if key != self._key:
            out = self.flush()
            self._resampler = _new_resampler()
            self._key = key
        assert self._resampler is not None
        return out + _frames_to_arrays(self._resampler.resample(frame))

    def flush(self) -> list[np.ndarray]:
        # Without this the last few milliseconds held in the resampler's filter delay would be lost.
        if self._resampler is None:
            return []
        out = _frames_to_arrays(self._resampler.resample(None))
        self._resampler = None
        self._key = None
        return out


def _new_resampler() -> av.AudioResampler:
    return av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE, options=_RESAMPLER_OPTIONS)


def _frames_to_arrays(frames: list[av.AudioFrame | None]) -> list[np.ndarray]:
    # A passthrough resampler (input already flt/mono/16k) answers a flush with [None].
    return [f.to_ndarray().reshape(-1) for f in frames if f is not None]


# -------------------------------------------------------------------------------------------------- arrays


def _load_array(array: Any, sample_rate: int | None) -> np.ndarray:
    label = f"<{type(array).__name__} of shape {tuple(array.shape)}>"
    rate = _check_rate(sample_rate, label)
    x = _as_numpy(array, label)
    if x.ndim not in (1, 2):
        raise AudioError(
            f"cannot load audio {label}: expected a 1-D (samples,) or 2-D (samples, channels) array, "
            f"got {x.ndim}-D"
        )
    if x.size == 0:
        raise AudioError(f"cannot load audio {label}: the array has no samples")
    x = _to_mono(_to_float(x, label), label)
    if rate != SAMPLE_RATE:
        x = _resample(x, rate, label)
    return np.ascontiguousarray(x, dtype=np.float32)


def _check_rate(sample_rate: Any, label: str) -> int:
    if sample_rate is None:
        return SAMPLE_RATE
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float, np.integer, np.floating)):
        raise AudioError(f"cannot load audio {label}: sample_rate must be an integer, got {sample_rate!r}")
    if not float(sample_rate).is_integer() or sample_rate <= 0:
        raise AudioError(f"cannot load audio {label}: sample_rate must be a positive integer, got {sample_rate!r}")
    return int(sample_rate)


def _as_numpy(array: Any, label: str) -> np.ndarray:
    if isinstance(array, np.ndarray):
        return array
    t = array.detach()
    if t.is_complex():
        raise AudioError(f"cannot load audio {label}: complex samples are not audio")
    if t.is_floating_point():
        t = t.float()  # bfloat16/float16 have no (or no exact) numpy equivalent
    return t.cpu().numpy()


def _to_float(x: np.ndarray, label: str) -> np.ndarray:
    if x.dtype in _INT_SCALE:
        return x.astype(np.float32) * np.float32(1.0 / _INT_SCALE[x.dtype])
    if x.dtype == np.uint8:
        return (x.astype(np.float32) - 128.0) * np.float32(1.0 / 128.0)
    if x.dtype.kind == "f":
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, rejected just below
            y = x.astype(np.float32, copy=False)
        if not np.isfinite(y).all():
            raise AudioError(f"cannot load audio {label}: the array contains NaN or infinite samples")
        return y
    raise AudioError(
        f"cannot load audio {label}: unsupported dtype {x.dtype} (use float, int8, uint8, int16 or int32)"
    )


def _to_mono(x: np.ndarray, label: str) -> np.ndarray:
    """Average the channels of ``(n,)``, ``(n, channels)`` or ``(channels, n)`` samples.

    The channel axis is the short one: ``(n, c)`` when ``c <= MAX_CHANNELS`` and ``n > c``, otherwise
    ``(c, n)`` -- so a (2, 48000) torchaudio-style array and a (48000, 2) soundfile-style one both work.
    """
    if x.ndim == 1:
        return x
    n, c = x.shape
    if not (c <= MAX_CHANNELS and n > c):
        x = x.T
        n, c = c, n
    if c > MAX_CHANNELS:
        raise AudioError(
            f"cannot load audio {label}: cannot tell samples from channels, expected (samples, channels) "
            f"with at most {MAX_CHANNELS} channels"
        )
    return x[:, 0] if c == 1 else x.mean(axis=1, dtype=np.float32)


def _resample(x: np.ndarray, rate: int, label: str) -> np.ndarray:
    # Same FFmpeg resampler as the file path, so an array and a file of the same audio match.
    resampler = StreamResampler(rate)
    try:
        out = [resampler.push(x[start : start + _CHUNK]) for start in range(0, len(x), _CHUNK)]
        out.append(resampler.flush())
    except _INPUT_ERRORS as err:
        raise AudioError(f"cannot load audio {label}: cannot resample from {rate} Hz ({_describe(err)})") from None
    samples = np.concatenate(out)
    if not len(samples):  # FFmpeg's resampler emits nothing for inputs shorter than its filter (~1 ms)
        raise AudioError(f"cannot load audio {label}: too few samples to resample from {rate} Hz")
    return samples


class StreamResampler:
    """Mono float32 samples at ``rate`` -> 16 kHz, piece by piece, keeping the filter state between pieces
    (a live microphone: resampling each piece on its own would click at every boundary)."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._resampler = _new_resampler() if rate != SAMPLE_RATE else None

    def push(self, samples: np.ndarray) -> np.ndarray:
        piece = np.ascontiguousarray(samples, dtype=np.float32).reshape(-1)
        if self._resampler is None or not len(piece):
            return piece
        frame = av.AudioFrame.from_ndarray(piece[None, :], format="flt", layout="mono")
        frame.sample_rate = self.rate
        return _concat(_frames_to_arrays(self._resampler.resample(frame)))

    def flush(self) -> np.ndarray:
        """The samples still inside the filter at the end of the stream."""
        if self._resampler is None:
            return np.zeros(0, np.float32)
        return _concat(_frames_to_arrays(self._resampler.resample(None)))


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0, np.float32)


# ------------------------------------------------------------------------------------------------- helpers


def _describe(err: BaseException) -> str:
    """One line of detail from an exception, without FFmpeg's errno prefix or the repeated file name."""
    if isinstance(err, (av.error.FFmpegError, OSError)) and err.strerror:
        text = str(err.strerror)
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())
