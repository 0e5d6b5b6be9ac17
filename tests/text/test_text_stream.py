"""StreamDecoder: the printed pieces concatenate to the full decode, never split a character, and each step
decodes only a short window."""

from __future__ import annotations

import pytest

from pocketlm.tokenizer import StreamDecoder, Tokenizer

MULTIBYTE = [
    "Hello, world! Ça va? Größe naïve façade.",
    "emoji 😀🎉👍🏽 and a family 👨‍👩‍👧‍👦 in one line",
    "中文文本测试，你好世界。日本語のテキスト。한국어",
    "مرحبا بالعالم — Привет, мир!",
    "mixed\n\tcode: x = '∑ᵢ xᵢ²' # ✓\n",
    "<|im_start|>assistant\nSure 😀<|im_end|>",
]


class CountingTokenizer(Tokenizer):
    """Records the longest id list any decode call sees."""

    def __init__(self, inner: Tokenizer):
        super().__init__(inner.tokenizer_json, inner.bos_id, inner.eos_ids, inner.add_bos)
        self.longest_decode = 0

    def decode(self, ids, skip_special_tokens=False):
        ids = list(ids)
        self.longest_decode = max(self.longest_decode, len(ids))
        return super().decode(ids, skip_special_tokens)


def stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool) -> list[str]:
    decoder = StreamDecoder(tok, skip_special_tokens=skip_special_tokens)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    return pieces


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_smollm_stream_equals_decode(smollm_tokenizer, skip_special_tokens):
    tok = smollm_tokenizer
    for text in MULTIBYTE:
        ids = tok.encode(text)
        pieces = stream(tok, ids, skip_special_tokens)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip_special_tokens), text
        assert not any("\ufffd" in p for p in pieces), pieces  # no piece holds half a character
    # Byte-level BPE really does cut these characters across tokens, so the hold-back is exercised.
    assert any("\ufffd" in tok.decode([i]) for i in tok.encode(MULTIBYTE[1]))


def test_sentencepiece_stream_equals_decode(spm_tokenizer):
    """Byte-fallback tokens (<0xF0><0x9F>...) and the "▁" prefix that decoding strips only at the start."""
    tok = spm_tokenizer
    for text in MULTIBYTE[:5] + ["a b  c   d", "über 😀 x"]:
        ids = tok.encode(text)
        pieces = stream(tok, ids, True)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True), text
        assert not any("\ufffd" in p for p in pieces), pieces
    assert any(tok.id_to_token(i).startswith("<0x") for i in tok.encode(MULTIBYTE[2]))


def test_stream_work_per_token_is_bounded(smollm_tokenizer):
    tok = CountingTokenizer(smollm_tokenizer)
    ids = tok.encode(" ".join(MULTIBYTE) * 20)
    assert len(ids) > 1000
    pieces = stream(tok, ids, True)
    assert "".join(pieces) == smollm_tokenizer.decode(ids, skip_special_tokens=True)
    assert tok.longest_decode <= 8  # the last piece's tokens plus one character's at most


def test_stream_pieces_arrive_promptly(smollm_tokenizer):
    tok = smollm_tokenizer
    decoder = StreamDecoder(tok)
    ids = tok.encode("Hello world")
    assert [decoder.push(i) for i in ids] == ["Hello", " world"]
    assert decoder.flush() == ""
    # An incomplete character at the end of generation comes out with flush, as decode shows it.
    emoji = tok.encode("😀")
    assert len(emoji) > 1
    assert decoder.push(emoji[0]) == ""
    assert decoder.flush() == tok.decode(emoji[:1])


def test_invalid_bytes_do_not_stall_forever(smollm_tokenizer):
    """A model may emit bytes that never form a character; the window is cut and U+FFFD printed."""
    tok = smollm_tokenizer
    lone_lead = next(i for i in range(tok.vocab_size) if tok.decode([i]) == "\ufffd")
    decoder = StreamDecoder(tok)
    out = "".join(decoder.push(lone_lead) for _ in range(40))
    assert "\ufffd" in out
    assert len(decoder._window) <= StreamDecoder.max_window + 1
