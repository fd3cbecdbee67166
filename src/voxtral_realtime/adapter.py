"""Stage 4: encoder frames (50 Hz) -> audio embeddings (12.5 Hz), one per decoder step.

Every ``downsample_factor`` (4) consecutive encoder frames are laid side by side (frame 4n first) and projected
to the decoder width by two bias-free linears with an exact GELU between them.  :class:`AdapterState` holds the
frames of a group that is not complete yet, so streaming gives the same embeddings as one offline pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AdapterState:
    pending: torch.Tensor  # [B, k < downsample_factor, encoder_dim]


class AudioAdapter(nn.Module):
    def __init__(self, encoder_dim: int, decoder_dim: int, downsample_factor: int) -> None:
        super().__init__()
        self.encoder_dim, self.factor = encoder_dim, downsample_factor
        self.w_in = nn.Linear(encoder_dim * downsample_factor, decoder_dim, bias=False)
        self.w_out = nn.Linear(decoder_dim, decoder_dim, bias=False)

    def new_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> AdapterState:
        return AdapterState(pending=torch.zeros(batch, 0, self.encoder_dim, device=device, dtype=dtype))

    def forward(self, frames: torch.Tensor, state: AdapterState) -> torch.Tensor:
        """Encoder frames [B, T, dim] -> embeddings [B, T', decoder_dim] of every group they complete."""
        frames = torch.cat([state.pending, frames], dim=1)
        n_groups = frames.shape[1] // self.factor
        state.pending = frames[:, n_groups * self.factor:]
        grouped = frames[:, : n_groups * self.factor].reshape(frames.shape[0], n_groups, self.factor * self.encoder_dim)
        return self.w_out(F.gelu(self.w_in(grouped)))
