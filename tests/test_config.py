"""Configs: the real params.json gives the real model; impossible values are one-line CheckpointErrors."""

from __future__ import annotations

import copy

import pytest

from voxtral_realtime.config import FULL_SIZE_PARAMS, ModelConfig
from voxtral_realtime.errors import CheckpointError, UsageError

TEKKEN_AUDIO = {"sampling_rate": 16000, "frame_rate": 12.5, "transcription_delay_ms": 480,
                "streaming_n_left_pad_tokens": 32,
                "audio_encoding_config": {"num_mel_bins": 128, "hop_length": 160, "window_size": 400}}


def test_real_params_give_the_real_shapes():
    cfg = ModelConfig.from_params_json(FULL_SIZE_PARAMS, TEKKEN_AUDIO)
    assert (cfg.decoder.n_layers, cfg.decoder.n_kv_heads, cfg.encoder.sliding_window) == (26, 8, 750)
    assert cfg.audio.samples_per_token == 1280 and cfg.audio.mel_frames_per_token == 8
    assert [cfg.audio.delay_tokens(d) for d in (80, 480, 1200, 2400)] == [1, 6, 15, 30]
    assert cfg.audio.n_right_pad_tokens(6) == 17


@pytest.mark.parametrize("delay", [0, -80, 100, 1280, 1.5, "480"])
def test_unsupported_delays_are_usage_errors(delay):
    with pytest.raises(UsageError):
        ModelConfig.from_params_json(FULL_SIZE_PARAMS, TEKKEN_AUDIO).audio.delay_tokens(delay)


@pytest.mark.parametrize("path, value", [(("dim",), -3072), (("n_layers",), 0),
                                         (("multimodal", "whisper_model_args", "encoder_args", "n_heads"), 0)])
def test_impossible_sizes(path, value):
    params = copy.deepcopy(FULL_SIZE_PARAMS)
    node = params
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(CheckpointError, match=f"{path[-1]} must be positive"):
        ModelConfig.from_params_json(params, TEKKEN_AUDIO)


@pytest.mark.parametrize("field", ["frame_rate", "transcription_delay_ms"])
def test_impossible_tokenizer_audio(field):
    with pytest.raises(CheckpointError, match=f"{field} must be positive"):
        ModelConfig.from_params_json(FULL_SIZE_PARAMS, {**TEKKEN_AUDIO, field: 0})
