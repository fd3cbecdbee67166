"""Results: what a transcription returns to the user."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Transcription:
    """The text of some audio and the tokens the model produced for it.

    ``tokens`` are the generated ids after the prompt, special ones included (``[STREAMING_PAD]`` for "nothing
    this step", ``[STREAMING_WORD]``, EOS), one per 80 ms step, exactly as the model produced them.
    """

    text: str
    tokens: list[int] = field(default_factory=list)
    delay_ms: int = 480
    duration: float = 0.0  # seconds of input audio, padding excluded

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
