"""Stage 4: encoder frames (50 Hz) -> audio embeddings (12.5 Hz), one per decoder step.

Every ``downsample_factor`` (4) consecutive encoder frames are laid side by side (frame 4n first) and projected
to the decoder width by two bias-free linears with an exact GELU between them.  Audio is always encoded in whole
80 ms steps (4 encoder frames), so no group is ever split between two calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AudioAdapter(nn.Module):
    def __init__(self, encoder_dim: int, decoder_dim: int, downsample_factor: int) -> None:
        super().__init__()
        self.encoder_dim, self.factor = encoder_dim, downsample_factor
        self.w_in = nn.Linear(encoder_dim * downsample_factor, decoder_dim, bias=False)
        self.w_out = nn.Linear(decoder_dim, decoder_dim, bias=False)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """Encoder frames [B, 4k, dim] -> embeddings [B, k, decoder_dim]."""
        batch, length, _ = frames.shape
        grouped = frames.reshape(batch, length // self.factor, self.factor * self.encoder_dim)
        return self.w_out(F.gelu(self.w_in(grouped)))
