"""Synthetic audio for tests and benchmarks: deterministic, speech-like in level and structure, on the 16-bit grid.

Values are multiples of 1/32768, so the 16-bit WAV round trip that transformers' processor applies (docs/model.md,
"Audio front end") leaves them unchanged and both pipelines see bit-identical samples.
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16_000


def speechlike(seconds: float, seed: int = 0, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Bursts of harmonic "syllables" and noise separated by pauses, float32 in [-1, 1)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sample_rate)
    out = np.zeros(n, np.float64)
    t = 0
    while t < n:
        t += int(rng.uniform(0.05, 0.4) * sample_rate)  # pause
        length = int(rng.uniform(0.1, 0.5) * sample_rate)
        end = min(n, t + length)
        if end <= t:
            break
        time = np.arange(end - t) / sample_rate
        f0 = rng.uniform(90, 260)
        burst = sum(rng.uniform(0.2, 1.0) / k * np.sin(2 * np.pi * f0 * k * time + rng.uniform(0, 6.3))
                    for k in range(1, 8))
        burst = burst + rng.uniform(0, 0.3) * rng.standard_normal(end - t)
        envelope = np.sin(np.pi * np.arange(end - t) / (end - t)) ** 2
        out[t:end] += rng.uniform(0.05, 0.4) * envelope * burst
        t = end
    return quantize16(out)


def quantize16(x: np.ndarray) -> np.ndarray:
    return (np.clip(np.round(x * 32768), -32768, 32767) / 32768).astype(np.float32)
