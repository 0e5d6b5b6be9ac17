"""What a bundle's metadata may hold: parsing it with bounded cost, and the type and range of every
entry the runtime reads (docs/format.md describes the sections).

A bundle is a file a user may download, so every number its metadata feeds into a size, an offset,
a loop bound or a float parameter of the executor is range-checked here, before anything is built
or allocated from it. The bounds are far outside every released model (the largest values seen
are given beside each) and keep every product the runtime forms well inside int64.

`parse_metadata` is the reader's entry point (pocketlm.bundle.Bundle.metadata); `metadata_problem`
also serves the writer and the converter, which refuse to write what the reader would refuse, and
`config_problem` / `generation_problem` the importers (pocketlm.convert), which check the config
they make from a source file here, naming the file's keys: this is the one schema.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Callable, Mapping

from pocketlm.errors import shown

# -- bounds on the JSON text, checked before it is parsed ------------------------------------------------------

# The whole metadata section. Its bulk is tokenizer.json, held as one string: 1.3 MB for SmolLM2,
# 13 MB for a 262k-token Gemma vocabulary as the converter writes it (compact). A string costs its
# size (up to 4x as a Python str), so this bounds the memory parsing may take.
MAX_METADATA_BYTES = 64 << 20
# Values outside strings (numbers, true/false/null, arrays, objects). A converted bundle has a few
# thousand (tensor names in provenance, LongRoPE factors); each costs ~50 bytes once parsed, which is
# how 60 MB of "[1,1,1,...]" became 1.7 GB: this keeps parsed metadata within ~10 MB.
MAX_METADATA_VALUES = 200_000
# Nesting of arrays and objects. Converted bundles nest 4 deep; Python's parser recurses per level.
MAX_METADATA_DEPTH = 32
# Digits of one integer: Python refuses past 4300 with a bare ValueError; no entry needs 20.
MAX_INT_DIGITS = 40

# -- bounds on the model config --------------------------------------------------------------------------------

MAX_LAYERS = 4096           # largest released: 126 (Llama 3.1 405B)
MAX_WIDTH = 1 << 20         # hidden_size, ffn_dim, n_heads * head_dim; largest: 53248 (405B's ffn)
MAX_HEADS = 4096            # n_heads, n_kv_heads; largest: 128
MAX_HEAD_DIM = 4096         # largest: 256 (Gemma)
MAX_VOCAB = 1 << 24         # largest: 262144 (Gemma 3); token ids are int32
# Trained context and sliding windows. Largest trained context: 10M (Llama 4 Scout). A window may
# exceed the trained context (Phi-3-mini-128k ships 262144 with a 131072 context): it then means
# full attention, so windows share this bound rather than max_position.
MAX_POSITIONS = 1 << 24
# Norm epsilon: the executor takes it as a float32 > 0; released models use 1e-5 or 1e-6 (1e-12 at
# the smallest). 1e-300 would round to 0.
EPS_RANGE = (1e-12, 1.0)
# Positive float parameters that become float32 values (softcaps 30-50, query_pre_attn_scalar
# 144-256, RoPE bases 1e4-1e7, scaling factors 1-64): bounded so that they, their square roots and
# reciprocals stay normal float32 numbers.
POSITIVE_RANGE = (1e-6, 1e12)

MAX_INT32 = 2**31 - 1

_CONFIG_INTS = {  # key -> (lowest, highest)
    "vocab_size": (1, MAX_VOCAB),
    "hidden_size": (1, MAX_WIDTH),
    "n_layers": (1, MAX_LAYERS),
    "n_heads": (1, MAX_HEADS),
    "n_kv_heads": (1, MAX_HEADS),
    "head_dim": (1, MAX_HEAD_DIM),
    "ffn_dim": (1, MAX_WIDTH),
    "rope_dim": (2, MAX_HEAD_DIM),
    "max_position": (1, MAX_POSITIONS),
}
_CONFIG_EPS = ("rms_eps", "norm_eps")
POOLINGS = ("mean", "cls", "last")  # an embedding model's pooling of its tokens' hidden states
# Positive floats. All but rope_theta may be null (absent); softcaps may also be 0 (off).
_CONFIG_POSITIVE = ("rope_theta", "rope_local_theta", "query_pre_attn_scalar", "attn_softcap", "final_softcap")
_CONFIG_FLAGS = ("encoder", "normalize", "gelu_exact", "tie_embeddings", "attn_bias", "qk_norm", "post_norms",
                 "rope_freq_factors", "scale_attn_weights", "scale_attn_by_inverse_layer_idx")

# Generation defaults: the ranges SamplingParams accepts (pocketlm.sampling), as integers where it
# wants integers.
_GENERATION = {  # key -> (integer?, lowest, highest, lowest excluded?)
    "temperature": (False, 0.0, 1e6, False),
    "top_k": (True, 0, MAX_INT32, False),
    "top_p": (False, 0.0, 1.0, True),
    "min_p": (False, 0.0, 1.0, False),
    "repetition_penalty": (False, 0.0, 1e6, True),
    "greedy_repetition_penalty": (False, 0.0, 1e6, True),  # at temperature 0, where it differs
    "repeat_last_n": (True, -1, MAX_INT32, False),
    "max_tokens": (True, 1, MAX_INT32, False),
    "seed": (True, 0, 2**64 - 1, False),
}

_LONG_INT = re.compile(r"[0-9]{%d,}" % (MAX_INT_DIGITS + 1))
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


class MetadataError(ValueError):
    """A problem with the metadata; its message names the entry (the caller adds the file)."""


def _type_name(v: Any) -> str:
    return "null" if v is None else {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
                                     int: "a number", float: "a number"}.get(type(v), type(v).__name__)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _outside_strings(text: str) -> str:
    """What is left of a JSON text outside its string literals, each literal as "". Escapes are read
    left to right as a JSON parser does: a backslash pair is one escaped backslash, then a backslash
    before a quote escapes it; no quote is left inside a literal and every other quote delimits one.
    (Four times faster than one regular expression for whole literals, on tokenizer documents that
    escape ~600k quotes.)"""
    plain = text.replace("\\\\", "").replace('\\"', "")
    return '""'.join(plain.split('"')[0::2])


def _shape_problem(text: str, max_values: int = MAX_METADATA_VALUES) -> str | None:
    """Size, nesting, value count and integer lengths of a JSON text, without parsing it (a few
    C-level passes: ~20 ms for a 150k-token tokenizer's metadata)."""
    if len(text) > MAX_METADATA_BYTES:  # characters <= bytes: a cheap first bound
        return f"metadata is {len(text)} characters, more than the {MAX_METADATA_BYTES} allowed"
    outside = _outside_strings(text)
    if _LONG_INT.search(outside):
        return f"metadata holds a number of more than {MAX_INT_DIGITS} digits"
    values = outside.count(",") + outside.count("[") + outside.count("{") + 1
    if values > max_values:
        return f"metadata holds more than {max_values} values outside strings"
    brackets = _NOT_BRACKET.sub("", outside)
    if len(brackets) > 2 * max_values:  # unbalanced: closing ones beyond the opening ones
        return f"metadata holds more than {max_values} values outside strings"
    depth = deepest = 0
    for ch in brackets:
        depth += 1 if ch in "[{" else -1
        deepest = max(deepest, depth)
    if deepest > MAX_METADATA_DEPTH:
        return f"metadata nests {deepest} levels deep, more than the {MAX_METADATA_DEPTH} allowed"
    return None


def _key(k: Any) -> str:
    """An object key in an entry path, shortened when long (a key may be megabytes)."""
    k = str(k)
    return k if len(k) <= 80 else shown(k)


def _first_non_finite(value: Any, where: str = "") -> str | None:
    """The key path of a NaN or infinite number in `value`, or None (json.loads accepts NaN, Infinity)."""
    stack = [(value, where)]
    while stack:
        v, at = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            return at or "(top level)"
        if isinstance(v, dict):
            stack.extend((x, f"{at}.{_key(k)}" if at else _key(k)) for k, x in v.items())
        elif isinstance(v, list):
            stack.extend((x, f"{at}[{i}]") for i, x in enumerate(v))
    return None


# tokenizer.json parsed in Python (`inspect` counts its vocabulary): a 262k-token vocabulary with its
# merges holds ~1.5M values.
MAX_TOKENIZER_VALUES = 4_000_000


def parse_json_bounded(text: str, max_values: int = MAX_TOKENIZER_VALUES) -> Any:
    """json.loads within the size, nesting and value bounds above; raises MetadataError."""
    problem = _shape_problem(text, max_values)
    if problem is not None:
        raise MetadataError(problem.replace("metadata", "the document"))
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise MetadataError(f"not valid JSON ({e})") from None


def parse_metadata(text: str) -> dict:
    """The metadata object of a bundle, parsed with bounded time and memory and checked by
    `metadata_problem`. Raises MetadataError naming the entry at fault."""
    problem = _shape_problem(text)
    if problem is not None:
        raise MetadataError(problem)
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise MetadataError(f"metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise MetadataError("metadata is not a JSON object")
    problem = metadata_problem(meta)
    if problem is not None:
        raise MetadataError(f"bad metadata: {problem}")
    return meta


def encode_problem(meta: dict) -> str | None:
    """What stops `meta` from being written as metadata the reader accepts, or None."""
    where = _first_non_finite(meta)
    if where is not None:
        return f"{where} is not a finite number (bundles hold only finite numbers)"
    return None


def check_encoded(text: str) -> None:
    """Raises MetadataError if the reader would refuse this encoded metadata for its shape."""
    problem = _shape_problem(text)
    if problem is not None:
        raise MetadataError(problem)


# -- the schema ------------------------------------------------------------------------------------------------
# Every check returns the first problem as a message naming the entry (config.rope_theta, ...); an importer
# checking a config it made from a source file passes `names`, the source's key for each entry it read
# (pocketlm.convert), so that the message names what the user can find in that file.

def _positive(v: Any, lo: float, hi: float) -> bool:
    return _is_number(v) and lo <= v <= hi


def _bound(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _namer(names: Mapping[str, str] | None) -> Callable[[str], str]:
    """Config entry path ("rope_theta", "rope_scaling.factor", "layer_windows[2]") -> its name in a
    message: the source's key from `names` (for a path below a named object, the object's key and
    the rest; for an array's entry, the array's key: windows come from one source value), else
    config.<path>."""
    names = names or {}

    def name(path: str) -> str:
        if path in names:
            return names[path]
        head, dot, rest = path.partition(".")
        if dot and head in names:
            return f"{names[head]}.{rest}"
        base = path.split("[", 1)[0]
        if base != path and base in names:
            return names[base]
        return f"config.{path}"
    return name


def _rope_scaling_problem(path: str, s: Any, cfg: dict, name: Callable[[str], str]) -> str | None:
    if s is None:
        return None
    if not isinstance(s, dict):
        return f"{name(path)} must be an object or null, got {_type_name(s)}"
    kind = s.get("type")
    lo, hi = POSITIVE_RANGE

    def need_positive(field: str) -> str | None:
        if field not in s:
            return f"{name(path)} ({shown(kind)}) has no {field!r}"
        if not _positive(s[field], lo, hi):
            return f"{name(path + '.' + field)} must be a number in [{lo:g}, {hi:g}], got {shown(s[field])}"
        return None

    def need_context(field: str) -> str | None:
        if field not in s:
            return f"{name(path)} ({shown(kind)}) has no {field!r}"
        if not (_is_int(s[field]) and 1 <= s[field] <= MAX_POSITIONS):
            return f"{name(path + '.' + field)} must be an integer in 1..{MAX_POSITIONS}, got {shown(s[field])}"
        return None

    if kind == "linear":
        return need_positive("factor")
    if kind == "llama3":
        problem = (need_positive("factor") or need_positive("low_freq_factor") or need_positive("high_freq_factor")
                   or need_context("original_max_position_embeddings"))
        if problem:
            return problem
        if not s["high_freq_factor"] > s["low_freq_factor"]:  # the smoothing divides by their difference
            return (f"{name(path)}: high_freq_factor {s['high_freq_factor']!r} must be greater than "
                    f"low_freq_factor {s['low_freq_factor']!r}")
        return None
    if kind == "longrope":
        problem = need_context("original_max_position_embeddings")
        if problem:
            return problem
        if "attention_factor" in s and not _positive(s["attention_factor"], lo, hi):
            return (f"{name(path + '.attention_factor')} must be a number in [{lo:g}, {hi:g}], "
                    f"got {shown(s['attention_factor'])}")
        half = cfg.get("rope_dim", 0) // 2 if _is_int(cfg.get("rope_dim")) else None
        for field in ("short_factor", "long_factor"):
            f = s.get(field)
            if not isinstance(f, list) or (half is not None and len(f) != half):
                return (f"{name(path + '.' + field)} must be an array of rope_dim / 2 = {half} numbers, "
                        f"got {_type_name(f)}" + (f" of {len(f)}" if isinstance(f, list) else ""))
            bad = next((i for i, x in enumerate(f) if not _positive(x, lo, hi)), None)
            if bad is not None:
                return f"{name(path + '.' + field)}[{bad}] must be a number in [{lo:g}, {hi:g}], got {shown(f[bad])}"
        return None
    return f"{name(path + '.type')} must be one of linear, llama3, longrope, got {shown(kind)}"


def _window_problem(where: str, v: Any) -> str | None:
    if v is None:
        return None
    if not _is_int(v) or not 0 <= v <= MAX_POSITIONS:
        return f"{where}: window {shown(v)} must be >= 0 (0 = full attention) and at most {MAX_POSITIONS}"
    return None


def _is_off(key: str, v: Any) -> bool:
    """A float entry left out: null (all but rope_theta), or 0 for a softcap."""
    if key == "rope_theta":
        return False
    return v is None or (key.endswith("softcap") and _is_number(v) and v == 0)


def config_problem(cfg: dict, names: Mapping[str, str] | None = None) -> str | None:
    """The first entry of a model config outside its type or range, or an inconsistency between
    entries that the executor's sizes rely on; None if there is none. Which entries an
    architecture needs is for its build() (pocketlm.models). `names`: entry path -> the source
    file's key it came from, to name in the message (see _namer)."""
    name = _namer(names)
    other = (names or {}).get  # an entry named inside a message about another
    config = "" if names else "config: "
    for key, (lo, hi) in _CONFIG_INTS.items():
        if key in cfg and not (_is_int(cfg[key]) and lo <= cfg[key] <= hi):
            v = cfg[key]
            if not _is_int(v) or v < lo:
                return f"{name(key)} must be an integer >= {lo}, got {shown(v)}"
            return f"{name(key)} must be an integer in {lo}..{hi}, got {v}"
    for key in _CONFIG_EPS:
        if key in cfg and not _positive(cfg[key], *EPS_RANGE):
            return (f"{name(key)} must be a finite number > 0, in [{EPS_RANGE[0]:g}, {EPS_RANGE[1]:g}], "
                    f"got {shown(cfg[key])}")
    lo, hi = POSITIVE_RANGE
    for key in _CONFIG_POSITIVE:
        v = cfg.get(key)
        if key not in cfg or _is_off(key, v):
            continue
        if not _positive(v, lo, hi):
            return f"{name(key)} must be a finite number > 0, in [{lo:g}, {hi:g}], got {shown(v)}"
    for key in _CONFIG_FLAGS:
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            return f"{name(key)} must be true, false or null, got {shown(cfg[key])}"

    if cfg.get("pooling") is not None and cfg["pooling"] not in POOLINGS:
        return f"{name('pooling')} must be one of {', '.join(POOLINGS)} or null, got {shown(cfg['pooling'])}"

    n_heads, n_kv, head_dim = cfg.get("n_heads"), cfg.get("n_kv_heads"), cfg.get("head_dim")
    if n_heads is not None and n_kv is not None and n_heads % n_kv:
        return (f"{config}{other('n_heads', 'n_heads')} {n_heads} is not a multiple of "
                f"{other('n_kv_heads', 'n_kv_heads')} {n_kv}")
    if n_heads is not None and head_dim is not None and n_heads * head_dim > MAX_WIDTH:
        return (f"{config}{other('n_heads', 'n_heads')} {n_heads} x {other('head_dim', 'head_dim')} {head_dim} "
                f"is more than {MAX_WIDTH}")
    rope_dim = cfg.get("rope_dim")
    if rope_dim is not None and (rope_dim % 2 or (head_dim is not None and rope_dim > head_dim)):
        return f"{name('rope_dim')} {rope_dim} must be even and at most {other('head_dim', 'head_dim')} ({head_dim})"

    problem = _window_problem(name("sliding_window"), cfg.get("sliding_window"))
    if problem:
        return problem
    windows = cfg.get("layer_windows")
    if windows is not None:
        if not isinstance(windows, list):
            return f"{name('layer_windows')} must be an array or null, got {_type_name(windows)}"
        n_layers = cfg.get("n_layers")
        if n_layers is not None and windows and len(windows) != n_layers:
            return f"{name('layer_windows')} has {len(windows)} entries, {name('n_layers')} is {n_layers}"
        for i, w in enumerate(windows):
            problem = _window_problem(name(f"layer_windows[{i}]"), w)
            if problem:
                return problem
    for key in ("rope_scaling", "rope_local_scaling"):
        problem = _rope_scaling_problem(key, cfg.get(key), cfg, name)
        if problem:
            return problem
    return None


def generation_problem(key: str, v: Any, name: str | None = None) -> str | None:
    """What is wrong with `v` as the sampling default `key` (generation.<key>, or `name` in the
    message), or None. Null is allowed: no default."""
    if v is None:
        return None
    integer, lo, hi, open_lo = _GENERATION.get(key, (False, -math.inf, math.inf, False))
    kind = "an integer" if integer else "a finite number"
    name = name or f"generation.{key}"
    if not (_is_int(v) if integer else _is_number(v)):
        return f"{name} must be {kind} or null, got {shown(v)}"
    if not ((lo < v if open_lo else lo <= v) and v <= hi):
        return f"{name} must be {kind} in {'(' if open_lo else '['}{_bound(lo)}, {_bound(hi)}], got {shown(v)}"
    return None


def metadata_problem(meta: dict) -> str | None:
    """The first problem in the sections the runtime reads (architecture, config, tokenizer,
    chat_template, special_tokens, generation), or None. Sections may be absent (a bundle need not
    hold a model); Engine requires the ones it needs."""
    arch = meta.get("architecture")
    if arch is not None and not isinstance(arch, str):
        return f"architecture must be a string, got {_type_name(arch)}"
    cfg = meta.get("config", {})
    if not isinstance(cfg, dict):
        return f"config must be an object, got {_type_name(cfg)}"
    problem = config_problem(cfg)
    if problem:
        return problem
    tok = meta.get("tokenizer", {})
    if not isinstance(tok, dict):
        return f"tokenizer must be an object, got {_type_name(tok)}"
    if "json" in tok and not isinstance(tok["json"], str):
        return f"tokenizer.json must be a string, got {_type_name(tok['json'])}"
    template = meta.get("chat_template")
    if template is not None and not isinstance(template, str):
        return f"chat_template must be a string or null, got {_type_name(template)}"
    special = meta.get("special_tokens", {})
    if not isinstance(special, dict):
        return f"special_tokens must be an object, got {_type_name(special)}"
    eos = special.get("eos_ids")
    if eos is not None and not isinstance(eos, list):
        return f"special_tokens.eos_ids must be an array, got {_type_name(eos)}"
    pad = special.get("pad_id")
    if pad is not None and not _is_int(pad):  # not range checked: unused, and some configs say -1
        return f"special_tokens.pad_id must be an integer or null, got {shown(pad)}"
    vocab = cfg.get("vocab_size")
    ids = [("special_tokens.bos_id", special["bos_id"])] if special.get("bos_id") is not None else []
    ids += [(f"special_tokens.eos_ids[{i}]", v) for i, v in enumerate(eos or [])]
    for name, v in ids:
        if not _is_int(v) or v < 0:
            return f"{name} must be a token id (an integer >= 0), got {shown(v)}"
        if vocab is not None and v >= vocab:
            return f"{name} {v} is outside the vocabulary (config.vocab_size {vocab})"
    if not isinstance(special.get("add_bos", False), bool):
        return f"special_tokens.add_bos must be true or false, got {shown(special['add_bos'])}"
    gen = meta.get("generation")
    if gen is not None and not isinstance(gen, dict):
        return f"generation must be an object, got {_type_name(gen)}"
    for key, v in (gen or {}).items():
        problem = generation_problem(key, v)
        if problem:
            return problem
    where = _first_non_finite(meta)  # anywhere else (the entries above name their own)
    if where is not None:
        return f"{where} is not a finite number"
    return None
