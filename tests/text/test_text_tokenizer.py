"""Tokenizers rebuilt from GGUF metadata vs references: transformers' GGUF conversion of the same file, and
for SentencePiece also the sentencepiece library itself."""

from __future__ import annotations

import json

import pytest

from pocketlm.errors import BundleError, UnsupportedModelError
from pocketlm.tokenizer import Tokenizer, tokenizer_json_from_gguf

SAMPLES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "multiple    spaces   inside",
    "line one\nline two\n\nline four\r\nwindows",
    "\n\n\n",
    "def f(x):\n    if x:\n        return x * 2\n    return 0\n",
    "\tindented with a tab\n\t\ttwo tabs",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "1234567",
    "Pi is 3.14159265358979, e is 2.71828, and 1,000,000 is a million.",
    "phone: +1 (555) 123-4567",
    "emoji: 😀🎉👍🏽 family: 👨‍👩‍👧‍👦",
    "中文文本测试，你好世界。",
    "日本語のテキストです。カタカナもある。",
    "한국어 텍스트",
    "مرحبا بالعالم",
    "Привет, мир! Как дела?",
    "Ελληνικά γράμματα",
    "café naïve résumé über Ångström façade",
    "ﬁ ligature and ™ sign",
    "It's we'll they've I'd YOU'RE",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "a <|im_end|> b<|im_start|>c",
    "<not_a_special_token> <|im_start",
    "mixed: 中文 and English and 😀 and 123",
    "URL https://example.com/path?q=1&r=2#frag",
    "snake_case camelCase PascalCase kebab-case",
    "!!!???...,,,;;;:::",
    "x",
    "",
]


def test_smollm_matches_transformers(smollm_tokenizer, hf_smollm_tokenizer):
    assert len(SAMPLES) >= 30
    for text in SAMPLES:
        expected = hf_smollm_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert smollm_tokenizer.encode(text) == expected, text


def test_smollm_round_trip(smollm_tokenizer):
    for text in SAMPLES:
        assert smollm_tokenizer.decode(smollm_tokenizer.encode(text)) == text


def test_smollm_special_tokens(smollm_tokenizer):
    tok = smollm_tokenizer
    assert tok.vocab_size == 49152
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (1, (2,), False)
    assert tok.token_to_id("<|im_start|>") == 1 and tok.id_to_token(2) == "<|im_end|>"
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.is_special(1) and not tok.is_special(ids[1])
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_smollm_splits_digits(smollm_tokenizer, hf_smollm_tokenizer):
    """SmolLM's tokenizer.json (and llama.cpp's "smollm" pre-tokenizer) cut every number character out on its
    own before the GPT-2 split. transformers' GGUF conversion ignores tokenizer.ggml.pre == "smollm" and keeps
    GPT-2's split, which differs only where the vocabulary merges a space with a number's bytes ("Ġ½")."""
    tok = smollm_tokenizer
    assert [tok.decode([i]) for i in tok.encode("1234567")] == list("1234567")
    text = "a ½ b"
    assert [tok.decode([i]) for i in tok.encode(text)] == ["a", " ", "½", " b"]
    reference = hf_smollm_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert reference != tok.encode(text) and tok.decode(reference) == text  # the known divergence


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-2"])
def test_other_pre_tokenizers_match_transformers(smollm_fields, pre):
    """The split regex chosen by tokenizer.ggml.pre, on SmolLM's vocabulary, vs transformers' conversion."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except ImportError:
        pytest.skip("this transformers version has no convert_gguf_tokenizer")
    fields = dict(smollm_fields, **{"tokenizer.ggml.pre": pre})
    reference, _ = convert_gguf_tokenizer("llama", {
        "tokenizer_type": "gpt2", "pre_tokenizer_type": pre, "tokens": fields["tokenizer.ggml.tokens"],
        "token_type": fields["tokenizer.ggml.token_type"], "merges": fields["tokenizer.ggml.merges"]})
    tok = Tokenizer(tokenizer_json_from_gguf(fields))
    for text in SAMPLES:
        assert tok.encode(text) == reference.encode(text, add_special_tokens=False).ids, (pre, text)


def test_sentencepiece_matches_sentencepiece_and_transformers(spm_model, spm_gguf, spm_tokenizer):
    """A SentencePiece GGUF with no merges: merges derived from scores must reproduce sentencepiece's own BPE
    encoder and transformers' GGUF conversion.

    The "▁" prefix follows llama.cpp (the reference, see tests/tokenizer_parity): with add_space_prefix it is
    prepended to every stretch of text between special tokens, also to one that starts with a space, as
    sentencepiece itself does. transformers' conversion (HF Metaspace, prepend_scheme "first") prepends it only
    at the very start and not before a space, so it is a reference only for text without those two cases."""
    import sentencepiece as spm
    import transformers

    processor = spm.SentencePieceProcessor(model_proto=spm_model)
    reference = transformers.AutoTokenizer.from_pretrained(str(spm_gguf.parent), gguf_file=spm_gguf.name)
    assert spm_tokenizer.add_bos and spm_tokenizer.bos_id == 1 and spm_tokenizer.eos_ids == (2,)
    texts = [t for t in SAMPLES if "<|" not in t] + ["the <tool> call", "<tool>x", "über 😀"]
    for text in texts:
        ids = spm_tokenizer.encode(text)
        assert ids[0] == 1
        if not text[:1].isspace() and "<tool>" not in text:
            assert ids == reference(text)["input_ids"], text
        # sentencepiece does not know "<tool>" is to be matched whole.
        if "<tool>" not in text:
            assert ids[1:] == processor.encode(text), text
    text = " leading space"
    assert [spm_tokenizer.id_to_token(i) for i in spm_tokenizer.encode(text)[1:3]] == ["▁", "▁l"]
    assert processor.encode(text, out_type=str)[:2] == ["▁", "▁l"]
    # After a user-defined token the next stretch gets its own prefix (llama.cpp's is_prev_special).
    tool = spm_tokenizer.token_to_id("<tool>")
    assert spm_tokenizer.encode("<tool>x")[1:] == [tool, *processor.encode("x")]
    assert processor.encode("x", out_type=str)[0].startswith("▁")


def test_sentencepiece_round_trip_and_byte_fallback(spm_tokenizer):
    tok = spm_tokenizer
    for text in SAMPLES:
        if "<|" in text:
            continue
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    # The prefix is always added, so decoding drops exactly that one space and leading spaces survive.
    assert tok.decode(tok.encode("  two leading spaces"), skip_special_tokens=True) == "  two leading spaces"
    # Hand-checked: "😀" is not in the vocabulary, so it falls back to its four UTF-8 bytes after the "▁" prefix.
    ids = tok.encode("😀", add_special_tokens=False)
    assert [tok.id_to_token(i) for i in ids] == ["▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert ids[1:] == [3 + 1 + 0xF0, 3 + 1 + 0x9F, 3 + 1 + 0x98, 3 + 1 + 0x80]  # <unk> <s> </s> <tool>, then bytes


def test_sentencepiece_given_merges_equal_derived(spm_fields):
    """A file that does carry merges gives the same tokenizer as one whose merges are derived."""
    derived = json.loads(tokenizer_json_from_gguf(spm_fields))["model"]["merges"]
    with_merges = dict(spm_fields, **{"tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in derived]})
    a, b = Tokenizer(tokenizer_json_from_gguf(spm_fields)), Tokenizer(tokenizer_json_from_gguf(with_merges))
    for text in SAMPLES:
        assert a.encode(text) == b.encode(text)


def test_unsupported_tokenizers_are_named(smollm_fields):
    with pytest.raises(UnsupportedModelError, match="deepseek-llm"):
        tokenizer_json_from_gguf(dict(smollm_fields, **{"tokenizer.ggml.pre": "deepseek-llm"}))
    with pytest.raises(UnsupportedModelError, match="bert"):
        tokenizer_json_from_gguf(dict(smollm_fields, **{"tokenizer.ggml.model": "bert"}))
    with pytest.raises(BundleError):
        tokenizer_json_from_gguf({"tokenizer.ggml.model": "gpt2"})
    with pytest.raises(BundleError):
        Tokenizer("{not json")


def test_from_file_and_bos(tmp_path, smollm_tokenizer):
    path = tmp_path / "tokenizer.json"
    path.write_text(smollm_tokenizer.tokenizer_json, encoding="utf-8")
    tok = Tokenizer.from_file(path, bos_id=1, eos_ids=[2, 0], add_bos=True)
    assert tok.encode("hi") == [1, *smollm_tokenizer.encode("hi")]
    assert tok.encode("hi", add_special_tokens=False) == smollm_tokenizer.encode("hi")
    assert tok.eos_ids == (2, 0)


def test_compacted_tokenizer_json_encodes_the_same(hf_smollm_tokenizer):
    """Bundles store tokenizer.json compacted (merges as "a b" strings: faster to load); the ids
    must not change. Reference: transformers' tokenizer built from the uncompacted document."""
    from pocketlm.tokenizer import compact_tokenizer_json

    original = hf_smollm_tokenizer.backend_tokenizer.to_str()
    compact = compact_tokenizer_json(json.loads(original))
    merges = json.loads(compact)["model"]["merges"]
    assert merges and all(isinstance(m, str) for m in merges)
    tok = Tokenizer(compact)
    for text in SAMPLES:
        assert tok.encode(text) == hf_smollm_tokenizer(text, add_special_tokens=False)["input_ids"], text


def test_merges_with_a_space_stay_pairs():
    from pocketlm.tokenizer import merges_for_json

    assert merges_for_json([["a", "b"], ["ab", "c"]]) == ["a b", "ab c"]
    assert merges_for_json([["a", "b"], ["a b", "c"]]) == [["a", "b"], ["a b", "c"]]
