"""Tests of voxtral_realtime.audio: decoding files/bytes/arrays to 16 kHz mono float32, and its errors.

Test signals are synthesised here (chirp + tones, faded in/out) and encoded with PyAV / soundfile, so the
exact 16 kHz mono signal is known analytically and every decoded result can be compared with it.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import tempfile
import zlib
from fractions import Fraction
from pathlib import Path

import av
import av.error
import numpy as np
import pytest
import soundfile as sf

from voxtral_realtime import audio
from voxtral_realtime.audio import SAMPLE_RATE, audio_duration, load_audio
from voxtral_realtime.errors import AudioError, VoxtralError

DURATION = 1.5  # seconds

# Lossy codecs add priming/padding samples (mp3, aac) or trim to frame boundaries; the brief allows 0.1 s.
LOSSY_DURATION_TOL = 0.1
# Lowest normalised correlation with the exact signal accepted for lossy codecs at default bitrates.
# Measured: mp3/opus >= 0.9999, aac >= 0.997; FFmpeg's native vorbis encoder (experimental, used when the
# build has no libvorbis) only reaches 0.967 -- an encoder weakness: libsndfile decodes the same file to
# within 1e-6 of ours (test_lossy_file_matches_libsndfile).
LOSSY_MIN_CORRELATION = 0.99
VORBIS_MIN_CORRELATION = 0.95
# Encoders mark their priming samples (mp3 LAME tag, m4a edit list, opus pre-skip) and FFmpeg trims them,
# so the decoded audio starts on time; measured lag 0, allowed 10 ms.
LOSSY_MAX_LAG = 0.01
# Max |error| of a lossless file against the exact 16 kHz signal: set by FFmpeg's default resampler
# (32-tap filter) and 16-bit quantisation, measured ~1e-3.
LOSSLESS_VS_EXACT_TOL = 5e-3
# Max |error| of a lossless file against the same samples fed through the array path: both use the same
# FFmpeg resampler on the same data, so only float rounding differs.
LOSSLESS_VS_ARRAY_TOL = 1e-5


# ------------------------------------------------------------------------------------------ test signals


def _channel(t: np.ndarray, ch: int) -> np.ndarray:
    """Channel ``ch`` of the test signal at times ``t``: all content below 3.5 kHz so 8 kHz sources work."""
    f0, f1 = 100.0, 3000.0  # linear chirp
    chirp = np.sin(2 * np.pi * (f0 * t + (f1 - f0) / (2 * DURATION) * t**2))
    tone = np.sin(2 * np.pi * (440.0 if ch % 2 == 0 else 660.0) * t + ch)
    # Fades keep the resampler's start/end transients (it sees an implicit step from silence) negligible.
    fade = np.clip(np.minimum(t, DURATION - t) / 0.05, 0.0, 1.0)
    return (0.35 * chirp + 0.25 * tone + 0.1 * np.sin(2 * np.pi * 1234.0 * t)) * fade


def make_signal(rate: int, channels: int) -> np.ndarray:
    """Float32 samples of shape (n, channels) at ``rate`` Hz (a fresh copy: tests may modify it)."""
    return _signal(rate, channels).copy()


def expected_16k(channels: int) -> np.ndarray:
    """The exact 16 kHz mono version of ``make_signal(_, channels)``: the channel average."""
    return _signal(SAMPLE_RATE, channels).astype(np.float64).mean(axis=1)


@functools.cache
def _signal(rate: int, channels: int) -> np.ndarray:
    t = np.arange(round(DURATION * rate)) / rate
    return np.stack([_channel(t, ch) for ch in range(channels)], axis=1).astype(np.float32)


def best_correlation(got: np.ndarray, ref: np.ndarray, max_lag: int) -> tuple[float, int]:
    """Highest normalised cross-correlation of ``got`` with ``ref`` over lags within +-max_lag samples."""
    n = max(len(got), len(ref)) + max_lag
    size = 1 << (2 * n - 1).bit_length()
    corr = np.fft.irfft(np.fft.rfft(got, size) * np.conj(np.fft.rfft(ref, size)), size)
    lags = np.r_[0 : max_lag + 1, -max_lag:0]  # lag k means got[i + k] ~ ref[i]
    values = corr[lags]
    best = int(np.argmax(values))
    return float(values[best] / (np.linalg.norm(got) * np.linalg.norm(ref))), int(lags[best])


def encode_with_pyav(path: Path, fmt: str, codec: str, samples: np.ndarray, rate: int, **options: str) -> None:
    """Write ``samples`` (n, channels) float32 with a PyAV encoder; PyAV converts to the codec's format."""
    channels = samples.shape[1]
    layout = {1: "mono", 2: "stereo"}[channels]
    with av.open(str(path), mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate, layout=layout, options=options or None)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples.T), format="fltp", layout=layout)
        frame.sample_rate = rate
        # Timestamps let the encoder mark its priming samples (negative pts), which the muxer turns into
        # an edit list / pre-skip so decoders trim them, as in files made by the ffmpeg CLI.
        frame.pts = 0
        frame.time_base = Fraction(1, rate)
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def _encoder(*names: str) -> str | None:
    """First of ``names`` that this FFmpeg build can encode with."""
    for name in names:
        try:
            av.Codec(name, "w")
            return name
        except (av.error.FFmpegError, ValueError):
            continue
    return None


# name -> (file suffix, container format, encoder candidates, rate, channels, lossless, encoder options)
PYAV_CASES = {
    "wav-pcm_s16le-44k-stereo": (".wav", "wav", ("pcm_s16le",), 44100, 2, True, {}),
    "flac-48k-stereo": (".flac", "flac", ("flac",), 48000, 2, True, {}),
    "flac-22k-mono": (".flac", "flac", ("flac",), 22050, 1, True, {}),
    "mp3-44k-stereo": (".mp3", "mp3", ("libmp3lame", "mp3"), 44100, 2, False, {}),
    "mp3-22k-mono": (".mp3", "mp3", ("libmp3lame", "mp3"), 22050, 1, False, {}),
    "ogg-opus-48k-stereo": (".opus", "ogg", ("libopus", "opus"), 48000, 2, False, {}),
    "webm-opus-48k-mono": (".webm", "webm", ("libopus", "opus"), 48000, 1, False, {}),
    # FFmpeg's native vorbis encoder is flagged experimental; libvorbis is not in every build.
    "ogg-vorbis-44k-stereo": (".ogg", "ogg", ("libvorbis", "vorbis"), 44100, 2, False, {"strict": "experimental"}),
    "m4a-aac-44k-stereo": (".m4a", "ipod", ("aac",), 44100, 2, False, {}),
    "m4a-aac-8k-mono": (".m4a", "ipod", ("aac",), 8000, 1, False, {}),
}

# name -> (rate, channels, soundfile subtype)
SOUNDFILE_CASES = {
    "sf-wav-pcm16-22k-mono": (22050, 1, "PCM_16"),
    "sf-wav-float-8k-mono": (8000, 1, "FLOAT"),
    "sf-wav-pcm24-48k-stereo": (48000, 2, "PCM_24"),
    "sf-wav-float-16k-mono": (16000, 1, "FLOAT"),  # already in the model's format: resampler passthrough
}


class Encoded:
    """An encoded test file and what went into it."""

    def __init__(self, path: Path, rate: int, channels: int, lossless: bool, written: np.ndarray) -> None:
        self.path, self.rate, self.channels, self.lossless = path, rate, channels, lossless
        self.written = written  # the samples the file holds, as written (quantised for integer PCM)


@pytest.fixture(scope="session")
def encoded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Encoded | str]:
    """All test files, encoded once per session; a string value is the reason a codec is unavailable."""
    folder = tmp_path_factory.mktemp("encoded")
    files: dict[str, Encoded | str] = {}
    for name, (suffix, fmt, candidates, rate, channels, lossless, options) in PYAV_CASES.items():
        codec = _encoder(*candidates)
        if codec is None:
            files[name] = f"no encoder among {candidates} in this FFmpeg build"
            continue
        signal = make_signal(rate, channels)
        path = folder / f"{name}{suffix}"
        encode_with_pyav(path, fmt, codec, signal, rate, **options)
        files[name] = Encoded(path, rate, channels, lossless, _read_back(path) if lossless else signal)
    for name, (rate, channels, subtype) in SOUNDFILE_CASES.items():
        path = folder / f"{name}.wav"
        sf.write(path, make_signal(rate, channels), rate, subtype=subtype)
        files[name] = Encoded(path, rate, channels, True, _read_back(path))
    return files


def _read_back(path: Path) -> np.ndarray:
    """The samples a lossless file holds (after the encoder's quantisation), read by libsndfile.

    Integer PCM is read as int16/int32 so the array path's integer scaling is checked against FFmpeg's.
    """
    subtype = sf.info(path).subtype
    dtype = {"PCM_16": "int16", "PCM_24": "int32", "PCM_32": "int32"}.get(subtype, "float32")
    return sf.read(path, dtype=dtype, always_2d=True)[0]


def _get(encoded: dict[str, Encoded | str], name: str) -> Encoded:
    item = encoded[name]
    if isinstance(item, str):
        pytest.skip(item)
    return item


ALL_CASES = [*PYAV_CASES, *SOUNDFILE_CASES]
LOSSLESS_CASES = [n for n in ALL_CASES if n in SOUNDFILE_CASES or PYAV_CASES[n][5]]


# ---------------------------------------------------------------------------------------------- files


def _check_model_format(samples: np.ndarray) -> None:
    assert isinstance(samples, np.ndarray)
    assert samples.dtype == np.float32
    assert samples.ndim == 1
    assert samples.flags.c_contiguous


@pytest.mark.parametrize("name", ALL_CASES)
def test_file_decodes_to_16k_mono_matching_the_signal(encoded: dict[str, Encoded | str], name: str) -> None:
    enc = _get(encoded, name)
    got = load_audio(enc.path)
    _check_model_format(got)
    ref = expected_16k(enc.channels)
    if enc.lossless:
        # The resampler is flushed, so not a single sample is lost.
        assert abs(len(got) - len(ref)) <= 1, (len(got), len(ref))
        n = min(len(got), len(ref))
        assert np.max(np.abs(got[:n] - ref[:n])) < LOSSLESS_VS_EXACT_TOL
    else:
        assert abs(audio_duration(got) - DURATION) <= LOSSY_DURATION_TOL, audio_duration(got)
        corr, lag = best_correlation(got, ref, max_lag=int(LOSSY_DURATION_TOL * SAMPLE_RATE))
        assert corr > (VORBIS_MIN_CORRELATION if "vorbis" in name else LOSSY_MIN_CORRELATION), (corr, lag)
        assert abs(lag) <= LOSSY_MAX_LAG * SAMPLE_RATE, lag


@pytest.mark.parametrize("name", ["mp3-44k-stereo", "ogg-opus-48k-stereo", "ogg-vorbis-44k-stereo"])
def test_lossy_file_matches_libsndfile(encoded: dict[str, Encoded | str], name: str) -> None:
    """An independent decoder (libsndfile) gives the same samples, so lossy errors are the encoder's."""
    enc = _get(encoded, name)
    try:
        samples, rate = sf.read(enc.path, dtype="float32", always_2d=True)
    except sf.LibsndfileError as err:  # older libsndfile builds lack mp3/opus
        pytest.skip(f"libsndfile cannot read {enc.path.suffix}: {err}")
    ours = load_audio(enc.path)
    theirs = load_audio(samples, sample_rate=rate)
    assert ours.shape == theirs.shape
    assert np.max(np.abs(ours - theirs)) < 1e-4  # measured <= 1.2e-6; decoders may round differently


@pytest.mark.parametrize("name", LOSSLESS_CASES)
def test_lossless_file_equals_array_path(encoded: dict[str, Encoded | str], name: str) -> None:
    """A file and the array it holds go through the same downmix and resampler, so they agree exactly."""
    enc = _get(encoded, name)
    from_file = load_audio(enc.path)
    from_array = load_audio(enc.written, sample_rate=enc.rate)
    assert from_file.shape == from_array.shape
    assert np.max(np.abs(from_file - from_array)) < LOSSLESS_VS_ARRAY_TOL


def test_path_types(encoded: dict[str, Encoded | str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    enc = _get(encoded, "flac-22k-mono")
    ref = load_audio(enc.path)  # pathlib.Path: os.PathLike
    np.testing.assert_array_equal(load_audio(str(enc.path)), ref)
    monkeypatch.setenv("HOME", str(enc.path.parent))
    np.testing.assert_array_equal(load_audio(f"~/{enc.path.name}"), ref)


def test_path_with_url_like_name_is_a_local_file(encoded: dict[str, Encoded | str], tmp_path: Path) -> None:
    """FFmpeg must not treat a local name such as 'concat:x' as a protocol."""
    enc = _get(encoded, "flac-22k-mono")
    weird = tmp_path / "concat:weird name.flac"
    weird.write_bytes(enc.path.read_bytes())
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        np.testing.assert_array_equal(load_audio("concat:weird name.flac"), load_audio(enc.path))
    finally:
        os.chdir(cwd)


def test_first_audio_stream_of_a_video_file(tmp_path: Path) -> None:
    """A video stream comes first and there are two audio tracks: the first audio track is the one used."""
    rate = 48000
    path = tmp_path / "movie.mkv"
    tracks = [make_signal(rate, 2), 0.5 * make_signal(rate, 1)]
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("mpeg4", rate=10)
        video.width = video.height = 16
        video.pix_fmt = "yuv420p"
        streams = [container.add_stream("flac", rate=rate, layout=("stereo", "mono")[i]) for i in range(2)]
        for i in range(15):
            picture = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
            picture.pts = i
            container.mux(video.encode(picture))
        container.mux(video.encode(None))
        for stream, samples in zip(streams, tracks):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(samples.T), format="fltp", layout=stream.layout.name
            )
            frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
            container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
    got = load_audio(path)
    ref = expected_16k(2)
    assert abs(len(got) - len(ref)) <= 1
    n = min(len(got), len(ref))
    assert np.max(np.abs(got[:n] - ref[:n])) < LOSSLESS_VS_EXACT_TOL


# ------------------------------------------------------------------------------ bytes and file objects


@pytest.mark.parametrize(
    "name", ["mp3-44k-stereo", "ogg-opus-48k-stereo", "m4a-aac-44k-stereo", "sf-wav-pcm16-22k-mono"]
)
def test_bytes_and_file_objects_match_the_path(encoded: dict[str, Encoded | str], name: str) -> None:
    enc = _get(encoded, name)
    ref = load_audio(enc.path)
    data = enc.path.read_bytes()

    class NonSeekable(io.RawIOBase):  # like a pipe or a streamed HTTP upload
        def __init__(self) -> None:
            self._buf = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, b: bytearray) -> int:  # type: ignore[override]
            return self._buf.readinto(b)

    spooled = tempfile.SpooledTemporaryFile()  # noqa: SIM115 - closed by the with below; what web frameworks hand out
    spooled.write(data)
    spooled.seek(0)
    with open(enc.path, "rb") as opened, spooled:
        for source in (data, bytearray(data), memoryview(data), io.BytesIO(data), opened, NonSeekable(), spooled):
            got = load_audio(source)
            _check_model_format(got)
            np.testing.assert_array_equal(got, ref, err_msg=type(source).__name__)


# --------------------------------------------------------------------------------------------- arrays


def test_16k_float32_array_is_returned_as_is() -> None:
    x = make_signal(SAMPLE_RATE, 1)[:, 0]
    got = load_audio(x)
    _check_model_format(got)
    np.testing.assert_array_equal(got, x)
    np.testing.assert_array_equal(load_audio(x, sample_rate=SAMPLE_RATE), x)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000, 16000])
@pytest.mark.parametrize("layout", ["n", "n1", "n2", "2n", "n6"])
def test_array_shapes_and_rates(rate: int, layout: str) -> None:
    channels = {"n": 1, "n1": 1, "n2": 2, "2n": 2, "n6": 6}[layout]
    signal = make_signal(rate, channels)
    x = {"n": signal[:, 0], "2n": signal.T}.get(layout, signal)
    got = load_audio(x, sample_rate=rate)
    _check_model_format(got)
    ref = expected_16k(channels)
    assert abs(len(got) - len(ref)) <= 1
    n = min(len(got), len(ref))
    assert np.max(np.abs(got[:n] - ref[:n])) < LOSSLESS_VS_EXACT_TOL


@pytest.mark.parametrize(
    "dtype, scale",
    [(np.float64, 1.0), (np.float16, 1.0), (np.int16, 2**15), (np.int32, 2**31), (np.int8, 2**7), (np.uint8, 2**7)],
)
def test_array_dtypes(dtype: type, scale: float) -> None:
    signal = make_signal(22050, 2)
    offset = 128 if dtype == np.uint8 else 0
    if scale > 1:
        x = (np.round(signal.astype(np.float64) * (scale - 1)) + offset).astype(dtype)
    else:
        x = signal.astype(dtype)
    got = load_audio(x, sample_rate=22050)
    _check_model_format(got)
    ref = expected_16k(2)
    n = min(len(got), len(ref))
    # 8-bit quantisation is the coarsest here: error up to ~1/128 per sample.
    assert np.max(np.abs(got[:n] - ref[:n])) < (2.0 / scale if scale > 1 else 0) + LOSSLESS_VS_EXACT_TOL


def test_int16_scaling_is_full_scale() -> None:
    np.testing.assert_array_equal(load_audio(np.array([-32768, 0, 16384], dtype=np.int16)), [-1.0, 0.0, 0.5])


def _torch():  # type: ignore[no-untyped-def]
    # Imported only by the tests that need it: a cold `import torch` can take longer than this whole file.
    return pytest.importorskip("torch")


@pytest.mark.parametrize("dtype_name", ["float32", "float64", "bfloat16", "int16"])
def test_torch_tensors(dtype_name: str) -> None:
    torch = _torch()
    dtype = getattr(torch, dtype_name)
    signal = make_signal(44100, 2)
    t = torch.from_numpy(signal.T.copy())  # torchaudio layout: (channels, n)
    t = (t * 32767).round().to(dtype) if dtype == torch.int16 else t.to(dtype)
    got = load_audio(t, sample_rate=44100)
    _check_model_format(got)
    ref = expected_16k(2)
    n = min(len(got), len(ref))
    assert np.max(np.abs(got[:n] - ref[:n])) < (1e-2 if dtype == torch.bfloat16 else LOSSLESS_VS_EXACT_TOL)


def test_tiny_arrays() -> None:
    assert load_audio(np.zeros(1, dtype=np.float32)).shape == (1,)
    assert load_audio(np.zeros((3, 2), dtype=np.float32)).shape == (3,)
    assert abs(len(load_audio(np.zeros(441, dtype=np.float32), sample_rate=44100)) - 160) <= 1
    # Shorter than FFmpeg's resampling filter: nothing comes out, which is an error, not an empty array.
    assert "too few samples" in _error(np.zeros(10, dtype=np.float32), sample_rate=44100)


def test_resampler_survives_format_change_mid_stream() -> None:
    """Chained Ogg files can switch rate/layout mid-stream; PyAV's own resampler would raise."""
    resampler = audio._Resampler()
    out = []
    for rate, layout in [(44100, "stereo"), (48000, "mono"), (48000, "mono"), (22050, "stereo")]:
        channels = 2 if layout == "stereo" else 1
        frame = av.AudioFrame.from_ndarray(np.zeros((channels, rate // 10), np.float32), format="fltp", layout=layout)
        frame.sample_rate = rate
        out += resampler.push(frame)
    out += resampler.flush()
    assert abs(sum(len(a) for a in out) - 4 * SAMPLE_RATE // 10) <= 4


def test_audio_duration() -> None:
    assert audio_duration(np.zeros(24000, dtype=np.float32)) == 1.5
    assert audio_duration(np.zeros(44100), sample_rate=44100) == 1.0


# --------------------------------------------------------------------------------------------- errors


def _error(source: object, **kwargs: object) -> str:
    with pytest.raises(AudioError) as info:
        load_audio(source, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message and message.strip() == message, message
    assert isinstance(info.value, VoxtralError)
    return message


def _png_bytes() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\x80" * 12 for _ in range(4))  # 4x4 RGB, filter byte per row
    header = struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.wav"
    message = _error(path)
    assert str(path) in message and "not found" in message


def test_directory(tmp_path: Path) -> None:
    message = _error(tmp_path)
    assert str(tmp_path) in message and "directory" in message


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    message = _error(path)
    assert str(path) in message and "empty" in message


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files regardless of mode")
def test_permission_denied(encoded: dict[str, Encoded | str], tmp_path: Path) -> None:
    path = tmp_path / "secret.flac"
    path.write_bytes(_get(encoded, "flac-22k-mono").path.read_bytes())
    path.chmod(0)
    try:
        message = _error(path)
    finally:
        path.chmod(0o600)
    assert str(path) in message and "permission denied" in message


def test_permission_denied_from_ffmpeg(encoded: dict[str, Encoded | str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Same as above but works as root: FFmpeg's EACCES must become an AudioError."""
    path = _get(encoded, "flac-22k-mono").path

    def deny(*args: object, **kwargs: object) -> None:
        raise av.error.PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(audio.av, "open", deny)
    message = _error(path)
    assert str(path) in message and "permission denied" in message


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("these are meeting notes, not a recording\n" * 20)
    message = _error(path)
    assert str(path) in message


@pytest.mark.parametrize("suffix", [".png", ".wav"])
def test_image_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"picture{suffix}"
    path.write_bytes(_png_bytes())
    message = _error(path)
    assert str(path) in message and "no audio stream" in message


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    assert str(path) in _error(path)


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
@pytest.mark.parametrize("name", ["m4a-aac-44k-stereo", "flac-48k-stereo", "sf-wav-pcm16-22k-mono"])
def test_corrupt_files(encoded: dict[str, Encoded | str], tmp_path: Path, name: str, damage: str) -> None:
    enc = _get(encoded, name)
    data = bytearray(enc.path.read_bytes())
    path = tmp_path / f"{damage}{enc.path.suffix}"
    if damage == "truncated":
        data = data[:30]  # cut inside the header
    else:
        data[:16] = b"\xde\xad\xbe\xef" * 4  # destroy the magic and the header
    path.write_bytes(bytes(data))
    assert str(path) in _error(path)


def test_garbled_flac_frames(encoded: dict[str, Encoded | str], tmp_path: Path) -> None:
    """A valid header followed by damaged frames fails while decoding, not while opening."""
    data = bytearray(_get(encoded, "flac-48k-stereo").path.read_bytes())
    for i in range(200, len(data), 37):
        data[i] ^= 0xFF
    path = tmp_path / "garbled.flac"
    path.write_bytes(bytes(data))
    message = _error(path)
    assert str(path) in message and "corrupt" in message


def test_file_with_zero_samples(tmp_path: Path) -> None:
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros((0, 1), dtype=np.float32), SAMPLE_RATE)
    message = _error(path)
    assert str(path) in message and "no samples" in message


def test_file_with_nan_samples(tmp_path: Path) -> None:
    x = make_signal(SAMPLE_RATE, 1)
    x[100] = np.nan
    path = tmp_path / "nan.wav"
    sf.write(path, x, SAMPLE_RATE, subtype="FLOAT")
    message = _error(path)
    assert str(path) in message and "NaN" in message


def test_bad_bytes_and_file_objects() -> None:
    assert "0 bytes" in _error(b"")
    assert "bytes" in _error(b"definitely not audio" * 10)
    assert "0 bytes" in _error(io.BytesIO())
    named = io.BytesIO(b"definitely not audio" * 10)
    named.name = "upload.mp3"
    assert "upload.mp3" in _error(named)
    assert "text mode" in _error(io.StringIO("abc"))


def test_reading_a_file_object_fails() -> None:
    class Broken(io.RawIOBase):
        name = "broken.wav"

        def readable(self) -> bool:
            return True

        def readinto(self, b: bytearray) -> int:  # type: ignore[override]
            raise OSError(5, "Input/output error")

    assert "broken.wav" in _error(Broken())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_arrays(bad: float) -> None:
    x = np.zeros(1000, dtype=np.float32)
    x[10] = bad
    assert "NaN or infinite" in _error(x)
    assert "NaN or infinite" in _error(_torch().from_numpy(x), sample_rate=8000)
    assert "NaN or infinite" in _error(np.full(10, 1e300))  # finite float64 that overflows float32


@pytest.mark.parametrize("shape", [(), (2, 3, 100), (1, 1, 1, 10)])
def test_wrong_rank(shape: tuple[int, ...]) -> None:
    assert f"{len(shape)}-D" in _error(np.zeros(shape, dtype=np.float32))


def test_bad_arrays() -> None:
    assert "no samples" in _error(np.zeros(0, dtype=np.float32))
    assert "no samples" in _error(np.zeros((0, 2), dtype=np.float32))
    assert "channels" in _error(np.zeros((100, 50), dtype=np.float32))
    assert "dtype" in _error(np.zeros(100, dtype=np.int64))
    assert "dtype" in _error(np.zeros(100, dtype=bool))
    torch = _torch()
    assert "complex" in _error(torch.zeros(100, dtype=torch.complex64))


@pytest.mark.parametrize("rate", [0, -16000, 44100.5, "44100", True])
def test_bad_sample_rate(rate: object) -> None:
    assert "sample_rate" in _error(np.zeros(100, dtype=np.float32), sample_rate=rate)


def test_unsupported_source_type() -> None:
    assert "int" in _error(42)
    assert "list" in _error([0.0, 0.1])


@pytest.mark.parametrize(("version", "passed"), [("12.3.0", True), ("18.1.0", True), ("19.0.2", False),
                                                  ("20.0.0rc1", False), ("dev", False)])
def test_metadata_option_only_for_pyav_that_takes_it(monkeypatch, version, passed):
    """PyAV 19 removed open(metadata_errors=...): passing it there made every file fail to decode."""
    from voxtral_realtime import audio

    monkeypatch.setattr(audio.av, "__version__", version)
    assert ("metadata_errors" in audio._open_options()) is passed


# -- limits before work (a server's uploads) ---------------------------------------------------------------------


def pcm_wav_saying(rate: int, samples: int) -> bytes:
    """A PCM16 mono WAV whose header says ``rate`` (soundfile refuses to write absurd rates)."""
    data = (np.random.default_rng(0).standard_normal(samples) * 3000).astype("<i2").tobytes()
    fmt = struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    header = b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " + fmt
    return header + b"data" + struct.pack("<I", len(data)) + data


def _counting_decoded(monkeypatch) -> dict[str, int]:
    """Counts the 16 kHz samples the decoder produces."""
    counted = {"samples": 0}
    real = audio._frames_to_arrays

    def counting(frames):
        arrays = real(frames)
        counted["samples"] += sum(len(a) for a in arrays)
        return arrays

    monkeypatch.setattr(audio, "_frames_to_arrays", counting)
    return counted


def test_a_sample_rate_bomb_is_refused_before_decoding(monkeypatch) -> None:
    """A 20 KB WAV whose header says 5 Hz is 2000 s at 16 kHz (128 MB of float32): refused from the header."""
    decoded = _counting_decoded(monkeypatch)
    with pytest.raises(AudioError, match="5 Hz"):
        load_audio(pcm_wav_saying(5, 10_000))
    assert decoded["samples"] == 0


def test_audio_over_max_seconds_is_refused_from_the_header_or_while_decoding(monkeypatch) -> None:
    decoded = _counting_decoded(monkeypatch)
    wav = pcm_wav_saying(16000, 16000 * 30)
    with pytest.raises(audio.AudioTooLong) as refused:
        load_audio(wav, max_seconds=10)
    assert refused.value.seconds == pytest.approx(30) and decoded["samples"] == 0
    # a container that declares no duration (or lies): decoding stops just past the limit
    monkeypatch.setattr(audio, "_check_declared", lambda *args: None)
    with pytest.raises(audio.AudioTooLong):
        load_audio(wav, max_seconds=10)
    assert 16000 * 10 < decoded["samples"] < 16000 * 11
    assert len(load_audio(wav, max_seconds=30)) == 16000 * 30  # the limit itself is allowed
