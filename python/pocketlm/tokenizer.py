"""Text <-> token ids, with Hugging Face `tokenizers` as the engine.

A bundle always stores a tokenizer.json string. A Hugging Face checkpoint ships one; a GGUF file does
not, so `tokenizer_json_from_gguf` rebuilds it from the GGUF metadata (llama.cpp's key names):

    fields = gguf_tokenizer_fields(gguf.GGUFReader(path))
    tok = Tokenizer(tokenizer_json_from_gguf(fields), bos_id=..., eos_ids=(...), add_bos=...)

Three GGUF tokenizer kinds (tokenizer.ggml.model) are supported, with llama.cpp as the reference for ids
(tests/tokenizer_parity checks llama.cpp's own golden files):
- "gpt2": byte-level BPE; the pre-tokenizer split depends on `tokenizer.ggml.pre`.
- "llama": SentencePiece BPE with byte fallback and the U+2581 ("▁") space convention. Its files often
  carry no merges; they are then derived from the piece scores, which is what SentencePiece's own
  BPE encoder ranks by. The "▁" prefix follows tokenizer.ggml.add_space_prefix as in llama.cpp.
- "gemma4": BPE with merges over "▁"-escaped UTF-8 (Gemma 4).

`StreamDecoder` turns a stream of ids into printable text pieces in O(1) per token.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pocketlm.errors import BundleError, InvalidInputError, UnsupportedModelError, shown

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


# Qwen3.5: as Qwen2, with combining marks (\p{M}) kept inside words.
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# GPT-2's split (also built into HF's ByteLevel pre-tokenizer).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def _byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _split(pattern: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


def _splits_then_bytes(*patterns: str) -> dict:
    """llama.cpp applies its regexes one after the other, each to the pieces the previous one left (matches and
    the text between them), then maps the bytes to GPT-2's alphabet: HF's Split(Isolated) sequence."""
    return {"type": "Sequence", "pretokenizers": [*(_split(p) for p in patterns), _byte_level(use_regex=False)]}


_GPT2_PRE = _byte_level(use_regex=True)  # ByteLevel's built-in regex is GPT-2's
# StarCoder-family vocabularies were trained with every digit split off, then GPT-2's regex.
_DIGITS_GPT2_PRE = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True}, _byte_level(use_regex=True)]}
_NFC = {"type": "NFC"}

# tokenizer.ggml.pre -> (normalizer, pre_tokenizer, ignore_merges), following llama.cpp's llama-vocab.cpp.
# ignore_merges: a pre-token that is itself in the vocabulary becomes that token without BPE (Llama 3).
_BYTE_LEVEL_PRE: dict[str, tuple[dict | None, dict, bool]] = {
    "default": (None, _GPT2_PRE, False),
    "gpt-2": (None, _GPT2_PRE, False),
    "gpt2": (None, _GPT2_PRE, False),
    "phi-2": (None, _GPT2_PRE, False),
    "mpt": (None, _GPT2_PRE, False),
    "olmo": (None, _GPT2_PRE, False),
    "smollm": (None, _DIGITS_GPT2_PRE, False),
    "starcoder": (None, _DIGITS_GPT2_PRE, False),
    "refact": (None, _DIGITS_GPT2_PRE, False),
    "codeshell": (None, _DIGITS_GPT2_PRE, False),
    "command-r": (None, _DIGITS_GPT2_PRE, False),
    "falcon": (None, _splits_then_bytes(r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_SPLIT, r"[0-9][0-9][0-9]"), False),
    "deepseek-coder": (None, _splits_then_bytes(r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+",
                                                 r"[一-龥ࠀ-一가-퟿]+", r"\p{N}"), False),
    "llama3": (None, _splits_then_bytes(_LLAMA3_SPLIT), True),
    "llama-v3": (None, _splits_then_bytes(_LLAMA3_SPLIT), True),
    "llama-bpe": (None, _splits_then_bytes(_LLAMA3_SPLIT), True),
    "falcon3": (None, _splits_then_bytes(_LLAMA3_SPLIT), True),
    "smaug-bpe": (None, _splits_then_bytes(_LLAMA3_SPLIT), False),
    "dbrx": (None, _splits_then_bytes(_LLAMA3_SPLIT), False),
    # Qwen's tokenizer.json NFC-normalizes (llama.cpp does not; ids differ only on non-NFC input).
    "qwen2": (_NFC, _splits_then_bytes(_QWEN2_SPLIT), False),
    "deepseek-r1-qwen": (_NFC, _splits_then_bytes(_QWEN2_SPLIT), False),
    "stablelm2": (None, _splits_then_bytes(_QWEN2_SPLIT), False),
    "qwen35": (None, _splits_then_bytes(_QWEN35_SPLIT), False),  # no NFC: its golden ids keep "e\u0301"
    "gpt-4o": (None, _splits_then_bytes(_O200K_SPLIT), False),
    "llama4": (None, _splits_then_bytes(_O200K_SPLIT), False),
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
                raise BundleError(f"GGUF metadata {shown(key)} cannot be read ({shown(str(e), 200)})") from None
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
    elif model == "gemma4":
        doc = _gemma4_bpe(fields, tokens, types)
    else:
        raise UnsupportedModelError(
            f"GGUF tokenizer model {shown(model)} is not supported (supported: 'gpt2' byte-level BPE, "
            f"'llama' SentencePiece BPE, 'gemma4' BPE over SentencePiece-style pieces)")
    return compact_tokenizer_json(doc)


def _byte_level_bpe(fields: Mapping[str, Any], tokens: list[str], types: list[int]) -> dict:
    pre = fields.get(_K + "pre") or "default"
    if pre not in _BYTE_LEVEL_PRE:
        raise UnsupportedModelError(
            f"GGUF byte-level BPE pre-tokenizer {shown(pre)} (tokenizer.ggml.pre) is not supported; "
            f"supported: {', '.join(SUPPORTED_BPE_PRE)}")
    normalizer, pre_tokenizer, ignore_merges = _BYTE_LEVEL_PRE[pre]
    merges = fields.get(_K + "merges")
    if not merges:
        raise BundleError("GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges")

    # Vocabulary entries are spelled in GPT-2's byte alphabet. A normal token spelled otherwise is raw
    # text that a converter forgot to re-spell; do it here so that BPE can still produce it.
    # A re-spelling that another token already has is left alone: that token is the one BPE must produce
    # (Command-R has both "\u200d" raw and "âĢį"; llama.cpp, which never re-spells, picks the second).
    known = set(tokens)
    spelled = []
    for t, ty in zip(tokens, types):
        if ty in (NORMAL, UNUSED) and not set(t) <= _BYTE_ALPHABET:
            respelled = "".join(_BYTE_CHARS[b] for b in t.encode("utf-8"))
            t = t if respelled in known else respelled
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
            "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": ignore_merges,
            "vocab": vocab,
            "merges": _split_merges(merges),
        },
    }


def merges_for_json(pairs: Sequence[Sequence[str]]) -> list:
    """BPE merges for a tokenizer.json: "left right" strings when no piece holds a space (or is empty),
    else [left, right] pairs. `tokenizers` builds a 150k-merge vocabulary ~30 % faster from the strings
    (0.22 vs 0.31 s on Qwen2's), which is most of an engine's load time."""
    if all(a and b and " " not in a and " " not in b for a, b in pairs):
        return [f"{a} {b}" for a, b in pairs]
    return [list(p) for p in pairs]


def compact_tokenizer_json(doc: dict) -> str:
    """A parsed tokenizer.json as text that `tokenizers` loads the same but faster: merges as strings
    where that is unambiguous (see merges_for_json), no indentation. `doc` is not modified."""
    model = doc.get("model")
    if isinstance(model, dict) and model.get("type") == "BPE":
        merges = model.get("merges")
        if isinstance(merges, list) and merges and all(isinstance(m, list) and len(m) == 2 for m in merges):
            doc = {**doc, "model": {**model, "merges": merges_for_json(merges)}}
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


def _split_merges(merges: Sequence[str]) -> list[list[str]]:
    """"left right" -> [left, right], cut at the first space after the first character (as llama.cpp does, so
    that a piece that is itself a space stays whole)."""
    out = [m.split(" ", 1) if m[:1] != " " else [m[:m.find(" ", 1)], m[m.find(" ", 1) + 1:]] for m in merges]
    bad = next((m for m, pair in zip(merges, out) if len(pair) != 2 or not pair[0]), None)
    if bad is not None:
        raise BundleError(f"GGUF tokenizer merge {shown(bad)} is not two pieces separated by a space")
    return out


_ESCAPE_SPACES = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
_UNESCAPE_DECODERS = [
    {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
    {"type": "ByteFallback"},
    {"type": "Fuse"},
]


def _sentencepiece_bpe(fields: Mapping[str, Any], tokens: list[str], types: list[int]) -> dict:
    """SentencePiece BPE as llama.cpp runs it: spaces become "▁", unknown characters fall back to <0xNN> byte
    tokens, and BPE runs over each stretch of text between special tokens as a whole.

    With tokenizer.ggml.add_space_prefix (llama.cpp's default for this model type) a "▁" is prepended to every
    such stretch, also when it already starts with a space and also after a special token, as llama.cpp and
    sentencepiece do. (HF's Metaspace "first" scheme prepends only at the start of the text and never before a
    space; the ids differ on such text.) Decoding drops the one space that the prefix put at the start.
    """
    add_space_prefix = bool(fields.get(_K + "add_space_prefix", True))
    merges = fields.get(_K + "merges")
    if merges:
        merges = _split_merges(merges)
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
    # Normalizers run on each stretch between added tokens: the prefix lands where llama.cpp puts it.
    normalizers = [{"type": "Prepend", "prepend": "\u2581"}] if add_space_prefix else []
    decoders = list(_UNESCAPE_DECODERS)
    if add_space_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [*normalizers, _ESCAPE_SPACES]},
        "pre_tokenizer": None,
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


def _gemma4_bpe(fields: Mapping[str, Any], tokens: list[str], types: list[int]) -> dict:
    """Gemma 4's tokenizer ("gemma4"): BPE with merges over raw UTF-8 pieces, spaces written as "▁", no space
    prefix, <0xNN> byte fallback. llama.cpp splits the text into runs of newlines and runs of everything else
    before BPE, and takes a run of newlines whole when the vocabulary has it."""
    merges = fields.get(_K + "merges")
    if not merges:
        raise BundleError("GGUF gemma4 tokenizer has no tokenizer.ggml.merges")
    vocab = _vocab_dict(tokens)
    added = [_added_token(i, t, special=(ty in (CONTROL, UNKNOWN)))
             for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (CONTROL, UNKNOWN, USER_DEFINED)]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": _ESCAPE_SPACES,
        "pre_tokenizer": _split(r"[^\n]+|[\n]+"),
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": list(_UNESCAPE_DECODERS)},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None,
            "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": True,
            "ignore_merges": True,
            "vocab": vocab,
            "merges": _split_merges(merges),
        },
    }


# --- the runtime tokenizer -------------------------------------------------------------------------------------

def _is_panic(e: BaseException) -> bool:
    """Whether `e` is a Rust panic inside `tokenizers` (pyo3_runtime.PanicException, a BaseException
    that `except Exception` misses), e.g. Oniguruma's retry limit hit by a backtracking Split regex."""
    return type(e).__name__ == "PanicException"


@contextlib.contextmanager
def _panics_as_bundle_errors(doing: str):
    """A panic inside `tokenizers` while `doing` becomes a BundleError; anything else passes."""
    try:
        yield
    except BaseException as e:
        if not _is_panic(e):
            raise
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BundleError(f"the model's tokenizer (its tokenizer.json) failed while {doing}: {detail} "
                          "(a broken tokenizer, e.g. a pre-tokenizer regex that backtracks without end)") from None


def _check_text(text: str) -> None:
    """Raises InvalidInputError if `text` cannot be UTF-8 (a lone surrogate: invalid UTF-8 decoded with
    surrogateescape, or a broken string). Called only after the tokenizer refused the text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInputError(f"the text is not valid Unicode: a lone surrogate U+{ord(text[e.start]):04X} at "
                                f"character {e.start} (invalid UTF-8 read as text?)") from None


class Tokenizer:
    """Encode and decode with a tokenizer.json, adding BOS the way the model expects.

    Text that is not valid Unicode is an InvalidInputError; a failure inside the tokenizers library
    (a Rust panic included) is a BundleError: the bundle's tokenizer is broken."""

    def __init__(self, tokenizer_json: str, bos_id: int | None = None, eos_ids: Iterable[int] = (),
                 add_bos: bool = False):
        from tokenizers import Tokenizer as _HFTokenizer

        try:
            self._tok = _HFTokenizer.from_str(tokenizer_json)
            # A saved tokenizer.json may pad and truncate every encoding (sentence-transformers'
            # pads to 128): pocketlm encodes one text at a time and bounds lengths itself.
            self._tok.no_padding()
            self._tok.no_truncation()
            self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
            added = self._tok.get_added_tokens_decoder()
        except BaseException as e:
            if not (isinstance(e, Exception) or _is_panic(e)):
                raise
            raise BundleError(f"invalid tokenizer.json: {(str(e).strip().splitlines() or [''])[0]}") from None
        self.tokenizer_json = tokenizer_json
        self._lock = threading.Lock()
        self.bos_id = None if bos_id is None else int(bos_id)
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys(int(i) for i in eos_ids))
        self.add_bos = bool(add_bos)
        for name, ids in (("bos_id", [] if self.bos_id is None else [self.bos_id]), ("eos_ids", self.eos_ids)):
            bad = [i for i in ids if not 0 <= i < self.vocab_size]
            if bad:
                raise BundleError(f"tokenizer {name} {bad} outside the vocabulary of {self.vocab_size} tokens")
        if self.add_bos and self.bos_id is None:
            raise BundleError("tokenizer has add_bos set but no bos_id")
        self._special_ids = frozenset(i for i, t in added.items() if t.special)

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

    def vocab(self) -> dict[str, int]:
        """token string -> id, added tokens included."""
        return self._tok.get_vocab(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True, parse_special: bool = True,
               template: bool = False) -> list[int]:
        """Token ids of `text`. With add_special_tokens, BOS is prepended when the model wants it;
        with template too, the tokenizer's own post-processor adds its special tokens instead (an
        encoder's [CLS] ... [SEP], as transformers and sentence-transformers encode).

        parse_special: special (control) tokens written in the text (e.g. "<|im_start|>") are matched whole;
        without it they are tokenized as plain text, as llama.cpp's `parse_special=false`. User-defined
        tokens are matched either way (as in llama.cpp and HF)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, not {type(text).__name__}")
        try:
            with _panics_as_bundle_errors(f"encoding a text of {len(text)} characters"), self._lock:
                if parse_special:
                    ids = self._tok.encode(text, add_special_tokens=add_special_tokens and template).ids
                else:  # the flag is the engine's state: no other encode may see it set (the lock)
                    self._tok.encode_special_tokens = True
                    try:
                        ids = self._tok.encode(text, add_special_tokens=False).ids
                    finally:
                        self._tok.encode_special_tokens = False
        except TypeError:  # "TextInputSequence must be str": tokenizers cannot take lone surrogates
            _check_text(text)
            raise
        if add_special_tokens and self.add_bos and not template:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = list(ids)
        with _panics_as_bundle_errors(f"decoding {len(ids)} tokens"):
            return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        with _panics_as_bundle_errors("looking up a token"):
            return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        with _panics_as_bundle_errors("looking up a token id"):
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
