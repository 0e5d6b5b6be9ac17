"""Text <-> token ids, with Hugging Face `tokenizers` as the engine.

A bundle always stores a tokenizer.json string. A Hugging Face checkpoint ships one; a GGUF file does
not, so `tokenizer_json_from_gguf` rebuilds it from the GGUF metadata (llama.cpp's key names):

    fields = gguf_tokenizer_fields(gguf.GGUFReader(path))
    tok = Tokenizer(tokenizer_json_from_gguf(fields), bos_id=..., eos_ids=(...), add_bos=...)

Two GGUF tokenizer kinds are supported:
- "gpt2": byte-level BPE; the pre-tokenizer split depends on `tokenizer.ggml.pre`.
- "llama": SentencePiece BPE with byte fallback and the U+2581 ("▁") space convention. Its files often
  carry no merges; they are then derived from the piece scores, which is what SentencePiece's own
  BPE encoder ranks by.

`StreamDecoder` turns a stream of ids into printable text pieces in O(1) per token.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pocketlm.errors import BundleError, UnsupportedModelError

# llama.cpp's token types (tokenizer.ggml.token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_K = "tokenizer.ggml."  # prefix of the GGUF tokenizer keys

# --- pre-tokenizer splits, keyed by tokenizer.ggml.pre ---------------------------------------------------------

# Llama 3's split: contractions, letters with one leading non-letter, numbers in runs of at most 3.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2: as Llama 3 but every digit on its own.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tiktoken's o200k split (GPT-4o, Llama 4): case-aware words, contractions attached.
_O200K_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _split_then_bytes(pattern: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        _byte_level(use_regex=False),
    ]}


_GPT2_PRE = _byte_level(use_regex=True)  # ByteLevel's built-in regex is GPT-2's
# StarCoder-family vocabularies were trained with every digit split off, then GPT-2's regex.
_DIGITS_GPT2_PRE = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True}, _byte_level(use_regex=True)]}
_NFC = {"type": "NFC"}

# tokenizer.ggml.pre -> (normalizer, pre_tokenizer) of the model's own tokenizer.json.
_BYTE_LEVEL_PRE: dict[str, tuple[dict | None, dict]] = {
    "default": (None, _GPT2_PRE),
    "gpt-2": (None, _GPT2_PRE),
    "gpt2": (None, _GPT2_PRE),
    "smollm": (None, _DIGITS_GPT2_PRE),
    "starcoder": (None, _DIGITS_GPT2_PRE),
    "refact": (None, _DIGITS_GPT2_PRE),
    "codeshell": (None, _DIGITS_GPT2_PRE),
    "llama3": (None, _split_then_bytes(_LLAMA3_SPLIT)),
    "llama-v3": (None, _split_then_bytes(_LLAMA3_SPLIT)),
    "llama-bpe": (None, _split_then_bytes(_LLAMA3_SPLIT)),
    "falcon3": (None, _split_then_bytes(_LLAMA3_SPLIT)),
    "smaug-bpe": (None, _split_then_bytes(_LLAMA3_SPLIT)),
    # Qwen2's tokenizer.json NFC-normalizes (llama.cpp does not; ids differ only on non-NFC input).
    "qwen2": (_NFC, _split_then_bytes(_QWEN2_SPLIT)),
    "deepseek-r1-qwen": (_NFC, _split_then_bytes(_QWEN2_SPLIT)),
    "gpt-4o": (None, _split_then_bytes(_O200K_SPLIT)),
    "llama4": (None, _split_then_bytes(_O200K_SPLIT)),
}

SUPPORTED_BPE_PRE = tuple(sorted(_BYTE_LEVEL_PRE))


# --- GGUF metadata -> tokenizer.json ---------------------------------------------------------------------------

def gguf_tokenizer_fields(reader: Any) -> dict[str, Any]:
    """The tokenizer metadata of a `gguf.GGUFReader` as {GGUF key: Python value}.

    Takes every `tokenizer.*` key (tokens, token types, merges, scores, special ids, flags, chat template)
    and `general.architecture`.
    """
    fields = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.") or key == "general.architecture":
            try:
                fields[key] = field.contents()
            except Exception as e:  # a malformed field: name it rather than fail deep inside gguf
                raise BundleError(f"GGUF metadata {key!r} cannot be read ({e})") from None
    return fields


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_CHARS = _bytes_to_unicode()
_BYTE_ALPHABET = frozenset(_BYTE_CHARS.values())


def _added_token(token_id: int, content: str, special: bool) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def _vocab_dict(tokens: Sequence[str]) -> dict[str, int]:
    """{token: id}, keeping every id: a repeated spelling (seen in some converted files) gets a placeholder
    name so that the vocabulary keeps its size and the ids stay where the model expects them."""
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t in vocab:
            t = f"<pocketlm_duplicate_{i}>"
        vocab[t] = i
    return vocab


def _merges_from_scores(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> list[list[str]]:
    """BPE merges implied by a SentencePiece vocabulary.

    SentencePiece's BPE encoder repeatedly joins the adjacent pair whose concatenation is the highest-scoring
    piece. The same result comes from HF's merge-rank BPE when every split (left, right) of a piece into two
    pieces is a merge ranked by the score of the joined piece. Ties go to the lower id (learned earlier).
    Only normal pieces take part: byte, control and user-defined tokens are never built by merging.
    """
    mergeable = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    ranked = []
    for piece, piece_id in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-float(scores[piece_id]), piece_id, cut, left, right))
    ranked.sort(key=lambda m: m[:3])
    return [[left, right] for *_, left, right in ranked]


def _list_field(fields: Mapping[str, Any], key: str, n: int, default: Any) -> list:
    value = fields.get(_K + key)
    if value is None:
        return [default] * n
    value = list(value)
    if len(value) != n:
        raise BundleError(f"GGUF {_K + key} has {len(value)} entries but the vocabulary has {n} tokens")
    return value


def tokenizer_json_from_gguf(fields: Mapping[str, Any]) -> str:
    """A complete tokenizer.json (as a string) for the tokenizer a GGUF file describes.

    `fields` maps GGUF metadata keys ("tokenizer.ggml.tokens", ...) to values, as `gguf_tokenizer_fields`
    returns. The result has no post-processor: BOS is added by `Tokenizer` (see `add_bos`).
    """
    model = fields.get(_K + "model")
    tokens = fields.get(_K + "tokens")
    if not tokens:
        raise BundleError("GGUF has no tokenizer.ggml.tokens: the file carries no tokenizer")
    tokens = [str(t) for t in tokens]
    n = len(tokens)
    types = [int(t) for t in _list_field(fields, "token_type", n, NORMAL)]

    if model == "gpt2":
        doc = _byte_level_bpe(fields, tokens, types)
    elif model == "llama":
        doc = _sentencepiece_bpe(fields, tokens, types)
    else:
        raise UnsupportedModelError(
            f"GGUF tokenizer model {model!r} is not supported (supported: 'gpt2' byte-level BPE, "
            f"'llama' SentencePiece BPE)")
    return json.dumps(doc, ensure_ascii=False)


def _byte_level_bpe(fields: Mapping[str, Any], tokens: list[str], types: list[int]) -> dict:
    pre = fields.get(_K + "pre") or "default"
    if pre not in _BYTE_LEVEL_PRE:
        raise UnsupportedModelError(
            f"GGUF byte-level BPE pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; "
            f"supported: {', '.join(SUPPORTED_BPE_PRE)}")
    normalizer, pre_tokenizer = _BYTE_LEVEL_PRE[pre]
    merges = fields.get(_K + "merges")
    if not merges:
        raise BundleError("GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges")

    # Vocabulary entries are spelled in GPT-2's byte alphabet. A normal token spelled otherwise is raw
    # text that a converter forgot to re-spell; do it here so that BPE can still produce it.
    spelled = []
    for t, ty in zip(tokens, types):
        if ty in (NORMAL, UNUSED) and not set(t) <= _BYTE_ALPHABET:
            t = "".join(_BYTE_CHARS[b] for b in t.encode("utf-8"))
        spelled.append(t)
    vocab = _vocab_dict(spelled)
    added = [_added_token(i, t, special=(ty == CONTROL))
             for i, (t, ty) in enumerate(zip(spelled, types)) if ty in (CONTROL, USER_DEFINED)]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab,
            "merges": [m.split(" ", 1) for m in merges],
        },
    }


def _sentencepiece_bpe(fields: Mapping[str, Any], tokens: list[str], types: list[int]) -> dict:
    """SentencePiece BPE as HF's Llama/Mistral tokenizer.json spells it: spaces become "▁", a "▁" is
    prepended to the start of the text (unless add_space_prefix is false), unknown characters fall back
    to <0xNN> byte tokens, and decoding undoes all three."""
    add_space_prefix = bool(fields.get(_K + "add_space_prefix", True))
    merges = fields.get(_K + "merges")
    if merges:
        merges = [m.split(" ", 1) for m in merges]
    else:
        scores = _list_field(fields, "scores", len(tokens), None)
        if any(s is None for s in scores):
            raise BundleError("GGUF SentencePiece tokenizer has neither tokenizer.ggml.merges nor scores")
        merges = _merges_from_scores(tokens, scores, types)

    unk_id = fields.get(_K + "unknown_token_id")
    if unk_id is None and "<unk>" in tokens:
        unk_id = tokens.index("<unk>")
    vocab = _vocab_dict(tokens)
    added = [_added_token(i, t, special=(ty in (CONTROL, UNKNOWN)))
             for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (CONTROL, UNKNOWN, USER_DEFINED)]
    decoders = [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if add_space_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581",
                          "prepend_scheme": "first" if add_space_prefix else "never", "split": False},
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": None,
            "unk_token": tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None,
            "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


# --- the runtime tokenizer -------------------------------------------------------------------------------------

class Tokenizer:
    """Encode and decode with a tokenizer.json, adding BOS the way the model expects."""

    def __init__(self, tokenizer_json: str, bos_id: int | None = None, eos_ids: Iterable[int] = (),
                 add_bos: bool = False):
        from tokenizers import Tokenizer as _HFTokenizer

        try:
            self._tok = _HFTokenizer.from_str(tokenizer_json)
        except Exception as e:
            raise BundleError(f"invalid tokenizer.json: {e}") from None
        self.tokenizer_json = tokenizer_json
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = None if bos_id is None else int(bos_id)
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys(int(i) for i in eos_ids))
        self.add_bos = bool(add_bos)
        for name, ids in (("bos_id", [] if self.bos_id is None else [self.bos_id]), ("eos_ids", self.eos_ids)):
            bad = [i for i in ids if not 0 <= i < self.vocab_size]
            if bad:
                raise BundleError(f"tokenizer {name} {bad} outside the vocabulary of {self.vocab_size} tokens")
        if self.add_bos and self.bos_id is None:
            raise BundleError("tokenizer has add_bos set but no bos_id")
        self._special_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    @classmethod
    def from_file(cls, path: str | Path, bos_id: int | None = None, eos_ids: Iterable[int] = (),
                  add_bos: bool = False) -> Tokenizer:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise BundleError(f"cannot read {path}: {e}") from None
        return cls(text, bos_id=bos_id, eos_ids=eos_ids, add_bos=add_bos)

    @classmethod
    def from_gguf_fields(cls, fields: Mapping[str, Any]) -> Tokenizer:
        """The tokenizer of a GGUF file, with BOS/EOS taken from its metadata.

        End-of-generation ids are EOS plus llama.cpp's end-of-turn / end-of-message ids when present.
        llama.cpp adds BOS to SentencePiece vocabularies unless the file says otherwise.
        """
        eos_ids = [fields[_K + k] for k in ("eos_token_id", "eot_token_id", "eom_token_id")
                   if fields.get(_K + k) is not None]
        add_bos = fields.get(_K + "add_bos_token")
        if add_bos is None:
            add_bos = fields.get(_K + "model") == "llama"
        bos_id = fields.get(_K + "bos_token_id")
        return cls(tokenizer_json_from_gguf(fields), bos_id=bos_id, eos_ids=eos_ids,
                   add_bos=bool(add_bos) and bos_id is not None)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (e.g. "<|im_start|>") are matched whole.
        With add_special_tokens, BOS is prepended when the model wants it."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, not {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_ids={self.eos_ids}, "
                f"add_bos={self.add_bos})")


# --- streaming detokenization ----------------------------------------------------------------------------------

_REPLACEMENT = "\ufffd"


def _trailing_replacements(text: str) -> int:
    n = 0
    while n < len(text) and text[len(text) - 1 - n] == _REPLACEMENT:
        n += 1
    return n


class StreamDecoder:
    """Text pieces for tokens as they are generated; the pieces concatenate to `tokenizer.decode(ids)`.

    Each step decodes a short window and prints what it gained over what was already printed. The window
    starts with context: the tokens of the last completed piece of text. Context matters because decoders
    treat the first token specially ("▁world" alone decodes to "world", after "▁Hello" to " world"), and it
    must begin on a character boundary, since a lone continuation byte would spoil the bytes after it.
    Text that ends in U+FFFD is held back: it is usually a multi-byte character whose other bytes are in the
    next tokens. So each step decodes a handful of tokens, whatever the length of the generation.
    """

    # Longest window before trailing U+FFFD is taken as real (invalid bytes) and the window is cut. A UTF-8
    # character has at most 4 bytes, so a genuine partial character never needs this much.
    max_window = 16

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.reset()

    def reset(self) -> None:
        self._window: list[int] = []  # context tokens, then tokens whose text is not all printed yet
        self._n_context = 0
        self._printed = 0  # characters of decode(self._window) already returned

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it completes (possibly "")."""
        self._window.append(int(token_id))
        text = self._decode(self._window)
        held = _trailing_replacements(text)
        out = text[self._printed:len(text) - held]
        self._printed += len(out)
        if held == 0:
            self._new_context(self._window[self._n_context:])  # a clean boundary: all printed
        elif len(self._window) > self.max_window:
            # The tail will not complete: print it as the full decode would, and start afresh.
            out += text[self._printed:]
            self._new_context(self._window[-1:])
        return out

    def flush(self) -> str:
        """Whatever is still held back (e.g. an incomplete character at the end of generation)."""
        out = self._decode(self._window)[self._printed:]
        if len(self._window) > self._n_context:
            self._new_context(self._window[self._n_context:])
        return out

    def _new_context(self, ids: list[int]) -> None:
        self._window = ids
        self._n_context = len(ids)
        self._printed = len(self._decode(ids))
