"""Tokenizers rebuilt from GGUF metadata vs llama.cpp's own tokenizer test suite (test-tokenizer-0): the
vocabulary-only GGUF files and golden ids shipped in the llama-cpp-python sdist (see tests/vocabs.py).

As llama.cpp's test, inputs are tokenized with add_special=false (no BOS) and parse_special=false (text that
spells a control token is plain text). llama.cpp's test does not check decoding; we also require that the
golden ids decode back to the input exactly.
"""

from __future__ import annotations

import os

import pytest

import vocabs
from pocketlm.errors import UnsupportedModelError
from pocketlm.tokenizer import Tokenizer, gguf_tokenizer_fields, tokenizer_json_from_gguf

# Every vocabulary with golden files in the pinned llama.cpp, and (model, pre) as its metadata says.
SUPPORTED = {
    "llama-spm": ("llama", "default"), "phi-3": ("llama", "default"),
    "gemma-4": ("gemma4", None),
    "gpt-2": ("gpt2", "gpt-2"), "llama-bpe": ("gpt2", "llama-bpe"), "qwen2": ("gpt2", "qwen2"),
    "qwen35": ("gpt2", "qwen35"), "starcoder": ("gpt2", "starcoder"), "refact": ("gpt2", "refact"),
    "command-r": ("gpt2", "command-r"), "mpt": ("gpt2", "mpt"), "falcon": ("gpt2", "falcon"),
    "deepseek-coder": ("gpt2", "deepseek-coder"),
}
UNSUPPORTED = {
    "bert-bge": "WordPiece (tokenizer.ggml.model 'bert'): an encoder's tokenizer, no generative model uses it",
    "deepseek-llm": "pre-tokenizer 'deepseek-llm' (a long hand-written letter class) is not implemented",
}


@pytest.fixture(scope="module")
def golden_dir():
    try:
        return vocabs.vocab_dir()
    except vocabs.VocabsUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"llama.cpp's tokenizer golden files are needed in CI: {e}")
        pytest.skip(f"llama.cpp's tokenizer golden files cannot be fetched (no network?): {e}")


def test_every_golden_vocab_is_covered_or_named(golden_dir):
    names = vocabs.golden_names(golden_dir)
    assert {"llama-spm", "llama-bpe", "qwen2", "gpt-2", "phi-3", "gemma-4"} <= set(names)
    assert set(names) == set(SUPPORTED) | set(UNSUPPORTED), "a new golden vocab: cover it or say why not"
    for name in UNSUPPORTED:
        with pytest.raises(UnsupportedModelError):
            tokenizer_json_from_gguf(vocabs.tokenizer_fields(golden_dir / f"ggml-vocab-{name}.gguf"))


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_golden_ids_and_round_trip(golden_dir, name):
    path = golden_dir / f"ggml-vocab-{name}.gguf"
    fields = vocabs.tokenizer_fields(path)
    assert (fields.get("tokenizer.ggml.model"), fields.get("tokenizer.ggml.pre")) == SUPPORTED[name]
    tok = Tokenizer.from_gguf_fields(fields)
    cases = vocabs.read_golden(path)
    assert len(cases) >= 40
    if tok.bos_id is not None:  # the golden ids carry no BOS, even for vocabs that add one
        assert not any(ids[:1] == [tok.bos_id] for _, ids in cases if ids)
    for text, expected in cases:
        assert tok.encode(text, add_special_tokens=False, parse_special=False) == expected, (name, text)
        assert tok.decode(expected) == text, (name, text)


def test_space_prefix_follows_the_gguf_flag(golden_dir):
    """llama.cpp prepends "▁" to every stretch of SentencePiece text, also one that starts with a space,
    unless tokenizer.ggml.add_space_prefix is false."""
    fields = vocabs.tokenizer_fields(golden_dir / "ggml-vocab-llama-spm.gguf")
    tok = Tokenizer.from_gguf_fields(fields)
    assert [tok.id_to_token(i) for i in tok.encode(" Hello", add_special_tokens=False)] == ["▁", "▁Hello"]
    assert tok.encode("Hello") == [tok.bos_id, tok.token_to_id("▁Hello")]
    # After a control token written in the text, the next stretch gets its own prefix.
    assert [tok.id_to_token(i) for i in tok.encode("</s>Hello", add_special_tokens=False)] == ["</s>", "▁Hello"]
    plain = Tokenizer.from_gguf_fields(dict(fields, **{"tokenizer.ggml.add_space_prefix": False}))
    assert [plain.id_to_token(i) for i in plain.encode(" Hello", add_special_tokens=False)] == ["▁Hello"]
    assert plain.decode(plain.encode(" Hello")) == "<s> Hello"
    assert tok.decode(tok.encode(" Hello", add_special_tokens=False)) == " Hello"


def test_fast_metadata_reader_equals_gguf_reader(golden_dir):
    """The tests read GGUF metadata with vocabs.read_gguf_metadata for speed; it must agree with gguf's."""
    import gguf

    path = golden_dir / "ggml-vocab-phi-3.gguf"
    assert vocabs.tokenizer_fields(path) == gguf_tokenizer_fields(gguf.GGUFReader(str(path)))
