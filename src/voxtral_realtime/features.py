"""Stage 2: 16 kHz samples -> log-mel features (128 bins, one frame per 10 ms), incrementally.

The model's mel is Whisper-like with two differences (docs/model.md): the last STFT frame is dropped and the
log is floored at a *fixed* ``global_log_mel_max - 8`` rather than the utterance maximum.  Because of the fixed
floor every frame depends only on its own 400-sample window, so a stream can be featurized piece by piece with
exactly the offline result: :class:`MelState` keeps the samples that the next frame still needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from mistral_common.audio import mel_filter_bank

from .config import AudioConfig


class LogMelSpectrogram(torch.nn.Module):
    """Frames -> Hann-windowed power spectrum -> Slaney mel -> clamped log10, on the model's device in float32."""

    def __init__(self, audio: AudioConfig) -> None:
        super().__init__()
        self.audio = audio
        filters = mel_filter_bank(
            num_frequency_bins=1 + audio.window_size // 2,
            num_mel_bins=audio.num_mel_bins,
            min_frequency=0.0,
            max_frequency=audio.sample_rate / 2,
            sampling_rate=audio.sample_rate,
        )
        self.register_buffer("mel_filters", torch.from_numpy(filters).float().contiguous(), persistent=False)
        # The windowed real DFT as one matrix [window, 2 * n_freq] (cos | sin): a frame's spectrum is one matmul,
        # which batches over streams and is captured in CUDA graphs like any other kernel.
        n = torch.arange(audio.window_size, dtype=torch.float64)
        k = torch.arange(1 + audio.window_size // 2, dtype=torch.float64)
        angle = 2 * torch.pi * n[:, None] * k[None] / audio.window_size
        window = torch.hann_window(audio.window_size, dtype=torch.float64)[:, None]
        dft = torch.cat([window * torch.cos(angle), window * torch.sin(angle)], dim=1)
        self.register_buffer("windowed_dft", dft.float(), persistent=False)

    @property
    def half_window(self) -> int:
        """Samples of context each frame takes on either side of its centre (the STFT's ``center=True`` padding)."""
        return self.audio.window_size // 2

    def frames(self, padded: torch.Tensor) -> torch.Tensor:
        """Log-mel of every full window in ``padded`` ([..., n] samples starting at a frame's left edge)
        -> [..., n_mels, T]."""
        windows = padded.float().unfold(-1, self.audio.window_size, self.audio.hop_length)
        spectrum = windows @ self.windowed_dft
        n_freq = spectrum.shape[-1] // 2
        power = spectrum[..., :n_freq] ** 2 + spectrum[..., n_freq:] ** 2
        mel = power @ self.mel_filters
        log_mel = torch.clamp(mel, min=1e-10).log10()
        log_mel = torch.clamp(log_mel, min=self.audio.global_log_mel_max - 8.0)
        return ((log_mel + 4.0) / 4.0).transpose(-1, -2)

    def forward(self, samples: torch.Tensor) -> torch.Tensor:
        """Offline log-mel of a whole signal [L] -> [n_mels, L // hop], zero beyond both ends.

        Equal to the reference (``torch.stft(center=True)`` then dropping the last frame) whenever the signal
        starts and ends in silence, which the protocol's padding guarantees.
        """
        n_frames = samples.shape[-1] // self.audio.hop_length
        state = self.new_state(samples.device)
        out = [self.push(state, samples), self.flush(state, n_frames)]
        return torch.cat(out, dim=-1)

    def new_state(self, device: torch.device | str) -> MelState:
        # The first frame is centred on sample 0, so its window starts half a window before the signal.
        return MelState(pending=torch.zeros(self.half_window, device=device))

    def push(self, state: MelState, samples: torch.Tensor) -> torch.Tensor:
        """Add samples to a stream; return the frames that became complete ([n_mels, k], k may be 0)."""
        state.pending = torch.cat([state.pending, samples.to(state.pending.device, torch.float32)])
        window, hop = self.audio.window_size, self.audio.hop_length
        if state.pending.shape[0] < window:
            return state.pending.new_zeros(self.audio.num_mel_bins, 0)
        n = 1 + (state.pending.shape[0] - window) // hop
        out = self.frames(state.pending[: (n - 1) * hop + window])
        state.pending = state.pending[n * hop :]
        state.frames_done += n
        return out

    def flush(self, state: MelState, total_frames: int) -> torch.Tensor:
        """End a stream: zero-extend so frames up to ``total_frames`` complete; return those not yet returned."""
        missing = total_frames - state.frames_done
        if missing <= 0:
            return state.pending.new_zeros(self.audio.num_mel_bins, 0)
        need = (missing - 1) * self.audio.hop_length + self.audio.window_size
        tail = torch.nn.functional.pad(state.pending, (0, max(0, need - state.pending.shape[0])))[:need]
        state.pending = state.pending.new_zeros(0)
        state.frames_done = total_frames
        return self.frames(tail)


@dataclass
class MelState:
    """Samples received but not yet fully consumed by a frame, aligned to the next frame's left edge."""

    pending: torch.Tensor
    frames_done: int = 0
