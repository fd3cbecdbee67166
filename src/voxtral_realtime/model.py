"""The whole network, stage by stage: features -> encoder -> adapter -> decoder.

:class:`VoxtralRealtime` owns the weights and nothing else; what streams remember (conv context, KV caches) lives
in state objects with one row per stream, which :mod:`.engine` manages.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapter import AudioAdapter
from .config import ModelConfig
from .decoder import TextDecoder
from .encoder import AudioEncoder, EncoderState
from .features import LogMelSpectrogram
from .layers import Rotary


class VoxtralRealtime(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = AudioEncoder(config.encoder)
        self.adapter = AudioAdapter(config.encoder.dim, config.decoder.dim, config.audio.downsample_factor)
        self.decoder = TextDecoder(config.decoder)
        self.mel = LogMelSpectrogram(config.audio)
        #: bumped whenever layers are replaced in place (quantization): engines made before hold compiled code
        #: and CUDA graphs that still read the old weights
        self.layers_version = 0
        #: dtype of the KV rings that engines make for this network (None: its compute dtype); the CPU 4-bit path
        #: sets bfloat16 (quantization.use_cpu_int4_kernels): its products take bf16 inputs already, and the rings
        #: are most of the memory a long transcription adds
        self.cache_dtype: torch.dtype | None = None

    @property
    def device(self) -> torch.device:
        return self.decoder.norm.weight.device  # not the token table: it may be quantized

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.norm.weight.dtype

    def rebuild_buffers(self) -> None:
        """Recompute the non-checkpoint buffers (mel filters, window, RoPE frequencies) on the current device.

        The loader builds the network on the meta device to avoid allocating weights twice; the buffers are then
        made here, on the device the weights were loaded to.
        """
        device, cfg = self.device, self.config
        self.mel = LogMelSpectrogram(cfg.audio).to(device)
        self.encoder.rotary = Rotary(cfg.encoder.head_dim, cfg.encoder.rope_theta).to(device)
        self.decoder.rotary = Rotary(cfg.decoder.head_dim, cfg.decoder.rope_theta).to(device)

    def embed_audio(self, mel: torch.Tensor, state: EncoderState, positions: torch.Tensor, *,
                    rows: slice | None = None, enabled: torch.Tensor | None = None) -> torch.Tensor:
        """Mel frames [B, n_mels, 8k] (whole 80 ms steps) -> audio embeddings [B, k, decoder_dim]; ``positions``
        [B, 4k] are the encoder frames' absolute positions."""
        return self.adapter(self.encoder(mel, state, positions, rows=rows, enabled=enabled))
