"""Stage 6: token ids -> text, with the Tekken tokenizer of mistral-common.

Special ids (< ``num_special_tokens``: BOS, EOS, ``[STREAMING_PAD]``, ``[STREAMING_WORD]``...) carry no text.
:class:`TextStream` turns ids into text one at a time and gives exactly what ``Tekkenizer.decode`` gives for
the whole sequence: bytes of consecutive text tokens are decoded together (a UTF-8 character may span tokens),
and a special token ends such a run, as in mistral-common.
"""

from __future__ import annotations

import codecs
from pathlib import Path

from .errors import CheckpointError, first_line


class Tokenizer:
    def __init__(self, path: str | Path) -> None:
        from mistral_common.tokens.tokenizers.tekken import Tekkenizer

        self.path = Path(path)
        try:
            self.tekken = Tekkenizer.from_file(self.path)
            self.streaming_pad_id = self.tekken.get_special_token("[STREAMING_PAD]")
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: tokenizer file not found") from None
        except Exception as exc:  # noqa: BLE001 - mistral-common raises ValueError/KeyError/JSON errors for a bad file
            raise CheckpointError(f"{self.path}: not a usable Tekken tokenizer ({first_line(exc)})") from None
        try:
            self.streaming_word_id = self.tekken.get_special_token("[STREAMING_WORD]")
        except Exception:  # noqa: BLE001 - older tokenizer files lack it; it then never occurs
            self.streaming_word_id = -1
        self.bos_id = self.tekken.bos_id
        self.eos_id = self.tekken.eos_id
        self.num_special_tokens = self.tekken.num_special_tokens

    def is_special(self, token_id: int) -> bool:
        return token_id < self.num_special_tokens

    def decode(self, token_ids: list[int]) -> str:
        """Text of ``token_ids``, special tokens dropped."""
        return self.tekken.decode(list(token_ids))

    def token_bytes(self, token_id: int) -> bytes:
        return self.tekken.id_to_byte_piece(token_id)

    def text_stream(self) -> TextStream:
        return TextStream(self)


class TextStream:
    """Incremental detokenizer: :meth:`push` one id, get the text it completes."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if self.tokenizer.is_special(token_id):
            return self.flush()
        return self._utf8.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Text held back for an incomplete UTF-8 character (replacement characters if it never completes)."""
        return self._utf8.decode(b"", final=True)

