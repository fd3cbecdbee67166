"""Model hyperparameters, read from a checkpoint's params.json (Mistral format) or config.json (transformers).

Nothing here is hard-coded to the 4B model: every size comes from the checkpoint, so tiny test checkpoints and
the real one run through the same code.  The streaming constants (delay, left padding) come from tekken.json's
``audio`` block, as in mistral-common.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import CheckpointError, UsageError

SAMPLE_RATE = 16_000
#: Delays the model was trained for (docs/model.md, "Delays"): every 80 ms step from 80 to 1200 ms, and 2400 ms.
SUPPORTED_DELAYS_MS = tuple(range(80, 1201, 80)) + (2400,)


@dataclass(frozen=True)
class EncoderConfig:
    """The causal audio encoder: conv stem, then a transformer with a sliding attention window."""

    dim: int
    n_layers: int
    n_heads: int
    head_dim: int
    hidden_dim: int
    sliding_window: int
    rope_theta: float
    norm_eps: float
    num_mel_bins: int


@dataclass(frozen=True)
class DecoderConfig:
    """The GQA text decoder with its delay (time) conditioning; the LM head is the tied token embedding."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    vocab_size: int
    sliding_window: int
    rope_theta: float
    norm_eps: float
    ada_dim: int


@dataclass(frozen=True)
class AudioConfig:
    """The front end and the streaming protocol constants (tekken.json ``audio`` and params.json)."""

    sample_rate: int = SAMPLE_RATE
    frame_rate: float = 12.5
    hop_length: int = 160
    window_size: int = 400
    num_mel_bins: int = 128
    global_log_mel_max: float = 1.5
    downsample_factor: int = 4
    transcription_delay_ms: int = 480
    n_left_pad_tokens: int = 32

    @property
    def samples_per_token(self) -> int:
        """Audio samples per decoder step (1280 = 80 ms)."""
        return int(self.sample_rate // self.frame_rate)

    @property
    def mel_frames_per_token(self) -> int:
        return self.samples_per_token // self.hop_length

    @property
    def token_ms(self) -> float:
        return 1000.0 / self.frame_rate

    def delay_tokens(self, delay_ms: int | None = None) -> int:
        """Number of decoder steps in ``delay_ms`` (checkpoint default when None), validated like mistral-common."""
        delay_ms = self.transcription_delay_ms if delay_ms is None else delay_ms
        step = self.token_ms
        if isinstance(delay_ms, bool) or not isinstance(delay_ms, (int, float)) or delay_ms <= 0:
            raise UsageError(f"delay must be a positive number of milliseconds, got {delay_ms!r}")
        n = delay_ms / step
        if abs(n - round(n)) > 1e-9:
            raise UsageError(f"delay {delay_ms} ms is not a multiple of the model's {step:g} ms step")
        if step == 80 and delay_ms not in SUPPORTED_DELAYS_MS:
            raise UsageError(f"delay {delay_ms} ms is not one the model was trained for (80..1200 in steps of 80, "
                             "or 2400)")
        return round(n)

    def n_right_pad_tokens(self, delay_tokens: int) -> int:
        """Silence appended after the audio: the delay, the BOS slot and 10 steps for the last word (docs/model.md)."""
        return delay_tokens + 1 + 10


@dataclass(frozen=True)
class ModelConfig:
    encoder: EncoderConfig
    decoder: DecoderConfig
    audio: AudioConfig

    @classmethod
    def from_params_json(cls, params: dict[str, Any], tekken_audio: dict[str, Any] | None) -> ModelConfig:
        """Build from a Mistral-format params.json and the ``audio`` block of tekken.json."""
        try:
            whisper = params["multimodal"]["whisper_model_args"]
            enc = whisper["encoder_args"]
            audio_args = enc.get("audio_encoding_args", {})
            encoder = EncoderConfig(
                dim=int(enc["dim"]),
                n_layers=int(enc["n_layers"]),
                n_heads=int(enc["n_heads"]),
                head_dim=int(enc["head_dim"]),
                hidden_dim=int(enc["hidden_dim"]),
                sliding_window=int(enc["sliding_window"]),
                rope_theta=float(enc["rope_theta"]),
                norm_eps=float(enc["norm_eps"]),
                num_mel_bins=int(audio_args.get("num_mel_bins", 128)),
            )
            decoder = DecoderConfig(
                dim=int(params["dim"]),
                n_layers=int(params["n_layers"]),
                n_heads=int(params["n_heads"]),
                n_kv_heads=int(params["n_kv_heads"]),
                head_dim=int(params["head_dim"]),
                hidden_dim=int(params["hidden_dim"]),
                vocab_size=int(params["vocab_size"]),
                sliding_window=int(params.get("sliding_window") or params.get("model_max_length", 131072)),
                rope_theta=float(params["rope_theta"]),
                norm_eps=float(params["norm_eps"]),
                ada_dim=int(params.get("ada_rms_norm_t_cond_dim", 32)),
            )
            if not params.get("ada_rms_norm_t_cond", True):
                raise CheckpointError("params.json: ada_rms_norm_t_cond is false; this is not a Voxtral Realtime model")
            if not params.get("tied_embeddings", True):
                raise CheckpointError("params.json: untied embeddings are not supported by Voxtral Realtime")
            audio = _audio_config(
                tekken_audio,
                downsample_factor=int(whisper.get("downsample_args", {}).get("downsample_factor", 4)),
                global_log_mel_max=float(audio_args.get("global_log_mel_max", 1.5)),
                hop_length=int(audio_args.get("hop_length", 160)),
                window_size=int(audio_args.get("window_size", 400)),
                num_mel_bins=encoder.num_mel_bins,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"params.json is not a Voxtral Realtime config: missing or bad field {exc}") from None
        return cls(encoder, decoder, audio).checked("params.json")

    def checked(self, source: str) -> ModelConfig:
        """Reject sizes no network can have (a hand-edited or corrupt config) with a one-line error."""
        for part in (self.encoder, self.decoder):
            for name, value in vars(part).items():
                if value <= 0:
                    raise CheckpointError(f"{source}: {name} must be positive, got {value}")
        return self

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], tekken_audio: dict[str, Any] | None,
                       preprocessor: dict[str, Any] | None = None) -> ModelConfig:
        """Build from a transformers ``config.json`` (model_type voxtral_realtime)."""
        if config.get("model_type") not in (None, "voxtral_realtime"):
            raise CheckpointError(f"config.json: model_type {config.get('model_type')!r} is not voxtral_realtime")
        try:
            a, t = config["audio_config"], config["text_config"]
            encoder = EncoderConfig(
                dim=int(a["hidden_size"]),
                n_layers=int(a["num_hidden_layers"]),
                n_heads=int(a["num_attention_heads"]),
                head_dim=int(a.get("head_dim") or a["hidden_size"] // a["num_attention_heads"]),
                hidden_dim=int(a["intermediate_size"]),
                sliding_window=int(a["sliding_window"]),
                rope_theta=_hf_rope_theta(a),
                norm_eps=float(a.get("rms_norm_eps", 1e-5)),
                num_mel_bins=int(a.get("num_mel_bins", 128)),
            )
            decoder = DecoderConfig(
                dim=int(t["hidden_size"]),
                n_layers=int(t["num_hidden_layers"]),
                n_heads=int(t["num_attention_heads"]),
                n_kv_heads=int(t["num_key_value_heads"]),
                head_dim=int(t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]),
                hidden_dim=int(t["intermediate_size"]),
                vocab_size=int(t["vocab_size"]),
                sliding_window=int(t.get("sliding_window") or t.get("max_position_embeddings", 131072)),
                rope_theta=_hf_rope_theta(t),
                norm_eps=float(t.get("rms_norm_eps", 1e-5)),
                ada_dim=32,  # hard-coded in transformers' VoxtralRealtimeTextAdaRmsNorm
            )
            pre = preprocessor or {}
            audio = _audio_config(
                tekken_audio,
                downsample_factor=int(config.get("downsample_factor", 4)),
                global_log_mel_max=float(pre.get("global_log_mel_max", 1.5)),
                hop_length=int(pre.get("hop_length", 160)),
                window_size=int(pre.get("win_length", 400)),
                num_mel_bins=encoder.num_mel_bins,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"config.json is not a Voxtral Realtime config: missing or bad field {exc}") from None
        return cls(encoder, decoder, audio).checked("config.json")


def _hf_rope_theta(section: dict[str, Any]) -> float:
    rope = section.get("rope_parameters") or {}
    theta = rope.get("rope_theta", section.get("rope_theta"))
    if theta is None:
        # transformers would silently fall back to 10000 here, wrong for this model (docs/model.md, "Hyperparameters")
        raise KeyError("rope_parameters.rope_theta")
    return float(theta)


def _audio_config(tekken_audio: dict[str, Any] | None, **fixed: Any) -> AudioConfig:
    tek = tekken_audio or {}
    enc = tek.get("audio_encoding_config", {})
    audio = AudioConfig(
        sample_rate=int(tek.get("sampling_rate", SAMPLE_RATE)),
        frame_rate=float(tek.get("frame_rate", 12.5)),
        transcription_delay_ms=int(tek.get("transcription_delay_ms", 480)),
        n_left_pad_tokens=int(tek.get("streaming_n_left_pad_tokens", 32)),
        **{**fixed, **{k: int(enc[k2]) for k, k2 in (("hop_length", "hop_length"), ("window_size", "window_size"))
                       if k2 in enc}},
    )
    for name in ("frame_rate", "hop_length", "window_size", "transcription_delay_ms"):
        if getattr(audio, name) <= 0:
            raise CheckpointError(f"tekken.json: audio {name} must be positive, got {getattr(audio, name)}")
    if audio.sample_rate != SAMPLE_RATE:
        raise CheckpointError(f"tekken.json: sampling_rate {audio.sample_rate} is not {SAMPLE_RATE}")
    if not math.isclose(audio.samples_per_token % audio.hop_length, 0):
        raise CheckpointError("tekken.json: frame_rate and hop_length do not give whole mel frames per token")
    return audio


#: params.json of mistralai/Voxtral-Mini-4B-Realtime-2602 (docs/model.md).
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
