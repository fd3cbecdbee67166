"""Token ids -> text: our incremental detokenizer gives exactly mistral-common's decoding, pieces and all."""

from __future__ import annotations

import pytest

from voxtral_realtime.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tekken_path):
    return Tokenizer(tekken_path)


def test_special_ids(tokenizer):
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.streaming_pad_id) == (1, 2, 32)
    assert tokenizer.is_special(33) and not tokenizer.is_special(1000)


@pytest.mark.parametrize("text", [" Mr. Quilter is the apostle of the middle classes.", " héllo wörld",
                                  " 日本語のテキスト", " emoji 🎙️ and ü", ""])
@pytest.mark.parametrize("pads", ["none", "between_every_token"])
def test_streamed_text_equals_mistral_common_decode(tokenizer, text, pads):
    ids = tokenizer.tekken.encode(text, bos=False, eos=False)
    if pads == "between_every_token":
        ids = [x for t in ids for x in (33, t, 32)]  # [STREAMING_WORD] id [STREAMING_PAD]: splits UTF-8 runs
    ids = [1, *ids, 2]
    stream = tokenizer.text_stream()
    pieces = [stream.push(t) for t in ids] + [stream.flush()]
    assert "".join(pieces) == tokenizer.tekken.decode(ids) == tokenizer.decode(ids)
    if pads == "none":
        assert "".join(pieces) == text


def test_multibyte_character_split_across_tokens_is_held_back(tokenizer):
    ids = tokenizer.tekken.encode(" 🎙️", bos=False, eos=False)
    pieces = [tokenizer.token_bytes(t) for t in ids]
    assert any(len(p) and not _is_complete_utf8(p) for p in pieces), "need a token that splits a character"
    stream = tokenizer.text_stream()
    out = [stream.push(t) for t in ids]
    assert "\ufffd" not in "".join(out) and "".join(out) + stream.flush() == " 🎙️"


def _is_complete_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
