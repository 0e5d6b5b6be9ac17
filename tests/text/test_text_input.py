"""The runtime Tokenizer's failures (issue 10, item 7): text that is not valid Unicode is an
InvalidInputError, and a Rust panic inside the tokenizers library (pyo3's PanicException, a
BaseException that `except Exception` misses) is a BundleError at every call and at construction."""

from __future__ import annotations

import json

import pytest

from pocketlm.errors import BundleError, InvalidInputError
from pocketlm.tokenizer import StreamDecoder, Tokenizer


def _tokenizer_json(pre_tokenizer: dict | None = None) -> str:
    from tokenizers import Tokenizer as HF, models

    doc = json.loads(HF(models.BPE(vocab={"a": 0, "b": 1, "c": 2, " ": 3}, merges=[])).to_str())
    doc["pre_tokenizer"] = pre_tokenizer
    return json.dumps(doc)


BACKTRACKING = {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": False}


@pytest.fixture(scope="module")
def panic_class():
    """pyo3_runtime.PanicException, taken from a real panic (the library does not export it)."""
    tok = Tokenizer(_tokenizer_json(BACKTRACKING))
    try:
        tok._tok.encode("a" * 40 + "b")
    except BaseException as e:  # noqa: BLE001 - this is what escapes `except Exception`
        assert not isinstance(e, Exception)
        return type(e)
    pytest.fail("the backtracking regex did not panic")


def test_lone_surrogates_are_invalid_input():
    tok = Tokenizer(_tokenizer_json())
    assert tok.encode("abc ab") == [0, 1, 2, 3, 0, 1]
    for text in ("ab\udcff", "\ud800", "a\udfffb"):
        with pytest.raises(InvalidInputError, match="lone surrogate U\\+D[89A-F][0-9A-F]{2} at character"):
            tok.encode(text)
        with pytest.raises(InvalidInputError):
            tok.encode(text, parse_special=False)


def test_a_panicking_regex_is_a_bundle_error_and_the_tokenizer_still_works():
    tok = Tokenizer(_tokenizer_json(BACKTRACKING))
    assert tok.encode("abc") == [0, 1, 2]
    with pytest.raises(BundleError, match="tokenizer.json.*encoding a text of 41 characters.*retry-limit"):
        tok.encode("a" * 40 + "b")
    with pytest.raises(BundleError):
        tok.encode("a" * 40 + "b", parse_special=False)
    assert tok.encode("abc", parse_special=False) == [0, 1, 2]  # the flag was reset, the lock released
    assert tok.encode("cab") == [2, 0, 1]


def test_panics_at_every_call_and_at_construction(panic_class, monkeypatch):
    import tokenizers

    tok = Tokenizer(_tokenizer_json())

    class Panicking:
        def __getattr__(self, name):
            def fail(*args, **kwargs):
                raise panic_class("simulated panic")
            return fail

    tok._tok = Panicking()
    for call in (lambda: tok.encode("abc"), lambda: tok.decode([0, 1]), lambda: tok.token_to_id("a"),
                 lambda: tok.id_to_token(0), lambda: StreamDecoder(tok).push(0)):
        with pytest.raises(BundleError, match="simulated panic"):
            call()

    def panicking_from_str(text):
        raise panic_class("simulated panic")

    monkeypatch.setattr(tokenizers.Tokenizer, "from_str", staticmethod(panicking_from_str))
    with pytest.raises(BundleError, match="invalid tokenizer.json: simulated panic"):
        Tokenizer(_tokenizer_json())


@pytest.mark.parametrize("fields", [
    {"tokenizer.ggml.model": "m" * (1 << 20)},
    {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "p" * (1 << 20)},
    {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.merges": ["x" * (1 << 20)]},
], ids=["model", "pre", "merge"])
def test_gguf_tokenizer_errors_quote_values_shortened(fields):
    """A megabyte tokenizer model name, pre-tokenizer name or merge (strings GGUF files may hold
    up to 1 MiB) is named in the error, not echoed whole."""
    from pocketlm.errors import PocketLMError
    from pocketlm.tokenizer import tokenizer_json_from_gguf

    with pytest.raises(PocketLMError) as e:
        tokenizer_json_from_gguf({"tokenizer.ggml.tokens": ["a", "b", "a b"], **fields})
    assert len(str(e.value)) < 1000
