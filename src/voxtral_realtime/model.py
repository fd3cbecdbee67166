"""The whole network, stage by stage: features -> encoder -> adapter -> decoder.

:class:`VoxtralRealtime` owns the weights and nothing else; everything a stream remembers lives in a
:class:`StreamState`, so one network can serve any number of independent streams.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .adapter import AdapterState, AudioAdapter
from .config import ModelConfig
from .decoder import TextDecoder
from .encoder import AudioEncoder, EncoderState
from .features import LogMelSpectrogram, MelState
from .layers import KVCache, Rotary


@dataclass
class StreamState:
    """Per-stream memory of every stage: unconsumed samples, conv context, encoder/decoder KV windows."""

    mel: MelState
    encoder: EncoderState
    adapter: AdapterState
    decoder_cache: KVCache


class VoxtralRealtime(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = AudioEncoder(config.encoder)
        self.adapter = AudioAdapter(config.encoder.dim, config.decoder.dim, config.audio.downsample_factor)
        self.decoder = TextDecoder(config.decoder)
        self.mel = LogMelSpectrogram(config.audio)

    @property
    def device(self) -> torch.device:
        return self.decoder.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.tok_embeddings.weight.dtype

    def rebuild_buffers(self) -> None:
        """Recompute the non-checkpoint buffers (mel filters, window, RoPE frequencies) on the current device.

        The loader builds the network on the meta device to avoid allocating weights twice; the buffers are then
        made here, on the device the weights were loaded to.
        """
        device, cfg = self.device, self.config
        self.mel = LogMelSpectrogram(cfg.audio).to(device)
        self.encoder.rotary = Rotary(cfg.encoder.head_dim, cfg.encoder.rope_theta).to(device)
        self.decoder.rotary = Rotary(cfg.decoder.head_dim, cfg.decoder.rope_theta).to(device)

    def new_state(self, batch: int = 1, *, encoder_chunk: int, decoder_chunk: int) -> StreamState:
        """Empty state for ``batch`` streams; the chunk sizes bound the frames/tokens per transformer call."""
        device, dtype = self.device, self.dtype
        return StreamState(
            mel=self.mel.new_state(device),
            encoder=self.encoder.new_state(batch, max_chunk=encoder_chunk, device=device, dtype=dtype),
            adapter=self.adapter.new_state(batch, device, dtype),
            decoder_cache=self.decoder.new_cache(batch, max_chunk=decoder_chunk, device=device, dtype=dtype),
        )

    @torch.no_grad()
    def embed_audio(self, state: StreamState, mel: torch.Tensor) -> torch.Tensor:
        """New mel frames [n_mels, T] -> the audio embeddings they complete [1, T', decoder_dim]."""
        frames = self.encoder(mel[None], state.encoder)
        return self.adapter(frames, state.adapter)
