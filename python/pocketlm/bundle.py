"""Writing and reading `.plm` bundles (the format is specified in docs/format.md).

The writer streams: tensor bytes are produced one tensor at a time by `TensorSpec.load()`, hashed
while written, and dropped, so converting a large model never holds all weights in memory. It
writes to a temporary file next to the target and renames it into place only once complete.

The reader is a thin layer over `_core.Bundle` (csrc/format/bundle_reader.cpp), which maps the
file and validates every byte it relies on; this module only parses the metadata JSON.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import operator
import os
import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pocketlm.dtypes import DType, tensor_nbytes
from pocketlm.errors import BundleError

MAGIC = b"POCKETLM"
FORMAT_VERSION = 1
HEADER_BYTES = 256
DATA_ALIGN = 4096  # data section offset: page aligned so that weights map straight in
TENSOR_ALIGN = 64  # tensor offsets within the data section: cache-line/SIMD aligned
MAX_NAME_BYTES = 1024
MAX_DIMS = 4

# Header fields [0, 168): magic, version, header size, file size, then the three sections
# (offset, bytes) and the SHA-256 of metadata, index and data. The header's own SHA-256 follows.
_HEADER = struct.Struct("<8sIIQQQQQQQ32s32s32s")
assert _HEADER.size == 168

_WRITE_CHUNK = 16 << 20  # bytes written (and reported to `progress`) per step


def _align_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


# ----------------------------------------------------------------------------------------------
# Writing


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One tensor to write. `load()` returns its stored bytes (exactly `nbytes` of them) as
    bytes, bytearray, a numpy array or any other buffer; it is called once, when the tensor is
    written."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    load: Callable[[], Any]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(DType(self.dtype), tuple(self.shape))


@dataclasses.dataclass(frozen=True)
class _Planned:
    name: bytes  # UTF-8
    dtype: DType
    shape: tuple[int, ...]
    offset: int  # from data_offset
    nbytes: int
    spec: TensorSpec


def _plan_tensors(tensors: Sequence[TensorSpec]) -> tuple[list[_Planned], int]:
    """Validates the specs and assigns data offsets; returns (plan, data_bytes)."""
    planned: list[_Planned] = []
    seen: set[str] = set()
    pos = 0
    for spec in tensors:
        if not isinstance(spec.name, str):
            raise TypeError(f"tensor name must be a str, got {type(spec.name).__name__}")
        name = spec.name.encode("utf-8")
        if not 1 <= len(name) <= MAX_NAME_BYTES:
            raise ValueError(f"tensor {spec.name!r}: name must be 1..{MAX_NAME_BYTES} UTF-8 bytes")
        if spec.name in seen:
            raise ValueError(f"tensor {spec.name!r}: duplicate name")
        seen.add(spec.name)
        try:
            dtype = DType(spec.dtype)
        except ValueError:
            raise ValueError(f"tensor {spec.name!r}: unknown tensor type {spec.dtype!r}") from None
        try:
            shape = tuple(operator.index(d) for d in spec.shape)
        except TypeError:
            raise TypeError(f"tensor {spec.name!r}: shape must be a tuple of ints, got {spec.shape!r}") from None
        if not 1 <= len(shape) <= MAX_DIMS or any(d < 1 for d in shape):
            raise ValueError(f"tensor {spec.name!r}: shape {shape} must have 1..{MAX_DIMS} dims, each >= 1")
        try:
            nbytes = tensor_nbytes(dtype, shape)
        except ValueError as e:
            raise ValueError(f"tensor {spec.name!r}: {e}") from None
        pos = _align_up(pos, TENSOR_ALIGN)
        planned.append(_Planned(name, dtype, shape, pos, nbytes, spec))
        pos += nbytes
    return planned, pos


def _index_entry(t: _Planned, sha: bytes) -> bytes:
    return b"".join((
        struct.pack("<H", len(t.name)),
        t.name,
        struct.pack("<II", int(t.dtype), len(t.shape)),
        struct.pack(f"<{len(t.shape)}Q", *t.shape),
        struct.pack("<QQ", t.offset, t.nbytes),
        sha,
    ))


def _index_bytes(planned: Sequence[_Planned]) -> int:
    return 4 + sum(2 + len(t.name) + 8 + 8 * len(t.shape) + 16 + 32 for t in planned)


def _as_byte_view(obj: Any, spec: TensorSpec, expected: int) -> memoryview:
    """A flat uint8 view of what `load()` returned, checked to be `expected` bytes long."""
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError(f"tensor {spec.name!r}: load() returned an object array, expected raw bytes")
        obj = np.ascontiguousarray(obj).reshape(-1).view(np.uint8)
    try:
        view = memoryview(obj)
    except TypeError:
        raise TypeError(
            f"tensor {spec.name!r}: load() returned {type(obj).__name__}, expected bytes or a buffer"
        ) from None
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    view = view.cast("B")
    if view.nbytes != expected:
        raise ValueError(
            f"tensor {spec.name!r}: load() returned {view.nbytes} bytes, expected {expected} "
            f"for {DType(spec.dtype).label} {tuple(spec.shape)}"
        )
    return view


def _stream(f, view: memoryview, hashes, done: int, total: int, progress) -> int:
    """Writes `view` in chunks, feeding every hasher; returns the new bytes-done count."""
    for start in range(0, view.nbytes, _WRITE_CHUNK):
        chunk = view[start : start + _WRITE_CHUNK]
        f.write(chunk)
        for h in hashes:
            h.update(chunk)
        done += chunk.nbytes
        if progress is not None:
            progress(done, total)
    return done


def _encode_metadata(metadata: dict) -> bytes:
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    meta = dict(metadata)
    if meta.setdefault("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise ValueError(f"metadata format_version must be {FORMAT_VERSION}, got {meta['format_version']!r}")
    text = json.dumps(meta, sort_keys=True, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.encode("utf-8")


def _fsync_dir(path: str) -> None:
    try:  # makes the rename durable; not possible on every platform/filesystem
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bundle(
    path: str | os.PathLike,
    metadata: dict,
    tensors: Sequence[TensorSpec],
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Writes a .plm bundle atomically: either `path` ends up holding the complete new bundle or
    it is left as it was (and no temporary file remains). `progress(bytes_done, bytes_total)` is
    called as the data section is written."""
    path = os.fspath(path)
    meta = _encode_metadata(metadata)
    planned, data_bytes = _plan_tensors(tensors)
    meta_offset = HEADER_BYTES
    index_offset = meta_offset + len(meta)
    index_bytes = _index_bytes(planned)
    data_offset = _align_up(index_offset + index_bytes, DATA_ALIGN)
    file_bytes = data_offset + data_bytes

    folder, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{base}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            # Data first (its hashes go into the index), then header, metadata, index, padding.
            f.seek(data_offset)
            data_sha = hashlib.sha256()
            tensor_shas: list[bytes] = []
            done = 0
            if progress is not None:
                progress(0, data_bytes)
            for t in planned:
                pad = bytes(t.offset - done)
                if pad:
                    f.write(pad)
                    data_sha.update(pad)
                    done += len(pad)
                tensor_sha = hashlib.sha256()
                # The loaded bytes are referenced only inside _stream: freed before the next load.
                done = _stream(f, _as_byte_view(t.spec.load(), t.spec, t.nbytes), (tensor_sha, data_sha),
                               done, data_bytes, progress)
                tensor_shas.append(tensor_sha.digest())

            index = struct.pack("<I", len(planned)) + b"".join(
                _index_entry(t, sha) for t, sha in zip(planned, tensor_shas)
            )
            assert len(index) == index_bytes
            fields = _HEADER.pack(
                MAGIC, FORMAT_VERSION, HEADER_BYTES, file_bytes,
                meta_offset, len(meta), index_offset, index_bytes, data_offset, data_bytes,
                hashlib.sha256(meta).digest(), hashlib.sha256(index).digest(), data_sha.digest(),
            )
            header = fields + hashlib.sha256(fields).digest()
            header += bytes(HEADER_BYTES - len(header))
            f.seek(0)
            f.write(header)
            f.write(meta)
            f.write(index)
            f.write(bytes(data_offset - (index_offset + index_bytes)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(folder)


# ----------------------------------------------------------------------------------------------
# Reading


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: DType
    shape: tuple[int, ...]
    nbytes: int
    offset: int  # from the start of the data section

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


# Config entries the runtime uses as sizes and counts (python/pocketlm/models/), and as float
# parameters. Only their type and range are checked here: which ones an architecture needs, and
# how they fit together, is for its build() (Engine reports its failures as BundleError).
_CONFIG_SIZES = ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
                 "rope_dim", "max_position")
_CONFIG_POSITIVE = ("rms_eps", "norm_eps", "rope_theta")
_GENERATION_INTS = ("top_k", "max_tokens", "seed")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    # json.loads accepts NaN and Infinity, which the writer never produces.
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _type_name(v: Any) -> str:
    return "null" if v is None else {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
                                     int: "a number", float: "a number"}.get(type(v), type(v).__name__)


def _metadata_problem(meta: dict) -> str | None:
    """The first structural problem in the sections the runtime reads (architecture, config,
    tokenizer, chat_template, special_tokens, generation), or None. Sections may be absent (a
    bundle need not hold a model); Engine requires the ones it needs."""
    arch = meta.get("architecture")
    if arch is not None and not isinstance(arch, str):
        return f"architecture must be a string, got {_type_name(arch)}"
    cfg = meta.get("config", {})
    if not isinstance(cfg, dict):
        return f"config must be an object, got {_type_name(cfg)}"
    for key in _CONFIG_SIZES:
        if key in cfg and not (_is_int(cfg[key]) and cfg[key] >= 1):
            return f"config.{key} must be an integer >= 1, got {cfg[key]!r}"
    for key in _CONFIG_POSITIVE:
        if key in cfg and not (_is_number(cfg[key]) and cfg[key] > 0):
            return f"config.{key} must be a finite number > 0, got {cfg[key]!r}"
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
        return f"special_tokens.pad_id must be an integer or null, got {pad!r}"
    vocab = cfg.get("vocab_size")
    ids = [("special_tokens.bos_id", special["bos_id"])] if special.get("bos_id") is not None else []
    ids += [(f"special_tokens.eos_ids[{i}]", v) for i, v in enumerate(eos or [])]
    for name, v in ids:
        if not _is_int(v) or v < 0:
            return f"{name} must be a token id (an integer >= 0), got {v!r}"
        if vocab is not None and v >= vocab:
            return f"{name} {v} is outside the vocabulary (config.vocab_size {vocab})"
    if not isinstance(special.get("add_bos", False), bool):
        return f"special_tokens.add_bos must be true or false, got {special['add_bos']!r}"
    gen = meta.get("generation")
    if gen is not None and not isinstance(gen, dict):
        return f"generation must be an object, got {_type_name(gen)}"
    for key, v in (gen or {}).items():
        if v is not None and not (_is_int(v) if key in _GENERATION_INTS else _is_number(v)):
            kind = "an integer" if key in _GENERATION_INTS else "a finite number"
            return f"generation.{key} must be {kind} or null, got {v!r}"
    return None


class Bundle:
    """An open, validated .plm bundle. Tensor data stays in the read-only mapping."""

    def __init__(self, core: Any):
        self.core = core  # the _core.Bundle; the executor takes it directly
        self.path: str = core.path
        self.version: int = core.version
        self.file_bytes: int = core.file_bytes
        self.tensors: list[TensorInfo] = [
            TensorInfo(t["name"], DType(t["dtype"]), tuple(t["shape"]), t["nbytes"], t["offset"])
            for t in core.tensors
        ]
        self._by_name = {t.name: t for t in self.tensors}

    @functools.cached_property
    def metadata(self) -> dict:
        try:
            meta = json.loads(self.core.metadata_json)
        except json.JSONDecodeError as e:
            raise BundleError(f"{self.path}: metadata is not valid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise BundleError(f"{self.path}: metadata is not a JSON object")
        if meta.get("format_version", self.version) != self.version:
            raise BundleError(
                f"{self.path}: metadata says format_version {meta['format_version']!r}, "
                f"header says {self.version}"
            )
        problem = _metadata_problem(meta)
        if problem is not None:
            raise BundleError(f"{self.path}: bad metadata: {problem}")
        return meta

    def info(self, name: str) -> TensorInfo:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no tensor named {name!r} in {self.path}") from None

    def tensor(self, name: str) -> np.ndarray:
        """Read-only uint8 view of the tensor's stored bytes (no copy)."""
        self.info(name)
        return self.core.tensor_bytes(name)

    def verify(self) -> list[str]:
        """Hashes all tensor data; returns the problems found (empty: the bundle is intact)."""
        return list(self.core.verify())

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __repr__(self) -> str:
        return f"<pocketlm Bundle {self.path!r}: {len(self.tensors)} tensors, {self.file_bytes} bytes>"


def read_bundle(path: str | os.PathLike) -> Bundle:
    """Opens and validates a bundle (header, sections, metadata and index checksums, every index
    entry, metadata JSON and the types of the metadata sections the runtime reads). Tensor data
    is hashed only by `Bundle.verify()`. Raises BundleError."""
    from pocketlm import _core  # the converter (writer) must work without the extension

    bundle = Bundle(_core.Bundle(os.fsdecode(os.fspath(path))))
    bundle.metadata  # parse now: a broken bundle fails at open, not at first use
    return bundle


# ----------------------------------------------------------------------------------------------
# Describing (`pocketlm inspect`)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _human_count(n: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)


def _short(value: Any, width: int = 72) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 3] + "..."


def _vocab_size(tokenizer: dict) -> int | None:
    if isinstance(tokenizer.get("vocab_size"), int):
        return tokenizer["vocab_size"]
    if tokenizer.get("type") != "hf-json" or not isinstance(tokenizer.get("json"), str):
        return None
    try:
        spec = json.loads(tokenizer["json"])
        vocab = spec["model"]["vocab"]
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
        ids += [tok["id"] for tok in spec.get("added_tokens") or []]
        return max(ids) + 1 if ids else 0
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _table(rows: list[list[str]], right: set[int], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append((indent + "  ".join(cells)).rstrip())
    return out


def describe(bundle: Bundle | str | os.PathLike, show_tensors: bool = True) -> str:
    """Human-readable summary of a bundle: model, tokenizer, defaults, provenance, tensors."""
    if not isinstance(bundle, Bundle):
        bundle = read_bundle(bundle)
    meta = bundle.metadata
    lines: list[str] = []

    def field(label: str, value: Any) -> None:
        lines.append(f"{label:<15} {value}")

    def block(label: str, items: Any) -> None:
        if not isinstance(items, dict) or not items:
            field(label, "-" if items in (None, {}, "") else _short(items))
            return
        lines.append(label)
        width = max(len(str(k)) for k in items)
        for k, v in items.items():
            lines.append(f"  {str(k):<{width}}  {_short(v)}")

    field("file", f"{bundle.path} ({_human_bytes(bundle.file_bytes)}, format v{bundle.version})")
    field("architecture", meta.get("architecture", "-"))
    block("config", meta.get("config"))
    quant = meta.get("quantization")
    if isinstance(quant, dict):
        quant = " ".join(f"{k}={_short(v, 40)}" for k, v in quant.items()) or "-"
    field("quantization", quant if quant is not None else "-")
    tok = meta.get("tokenizer")
    if isinstance(tok, dict):
        vocab = _vocab_size(tok)
        field("tokenizer", f"{tok.get('type', '?')}" + (f", vocab {vocab}" if vocab is not None else ""))
    else:
        field("tokenizer", "-")
    template = meta.get("chat_template")
    field("chat template", f"present ({len(template)} chars)" if isinstance(template, str) and template else "none")
    special = meta.get("special_tokens")
    if isinstance(special, dict):
        special = " ".join(f"{k}={_short(v, 40)}" for k, v in special.items()) or "-"
    field("special tokens", special if special is not None else "-")
    gen = meta.get("generation")
    if isinstance(gen, dict):
        gen = " ".join(f"{k}={_short(v, 40)}" for k, v in gen.items()) or "-"
    field("generation", gen if gen is not None else "-")
    block("provenance", meta.get("provenance"))

    tensors = bundle.tensors
    if show_tensors and tensors:
        lines += ["", f"tensors ({len(tensors)})"]
        rows = [["name", "type", "shape", "size"]]
        rows += [
            [t.name, t.dtype.label, " x ".join(str(d) for d in t.shape), _human_bytes(t.nbytes)]
            for t in tensors
        ]
        lines += _table(rows, right={3})

    per_type: dict[DType, list[int]] = {}  # dtype -> [tensors, parameters, bytes]
    for t in tensors:
        acc = per_type.setdefault(t.dtype, [0, 0, 0])
        acc[0] += 1
        acc[1] += t.n_elements
        acc[2] += t.nbytes
    total_params = sum(a[1] for a in per_type.values())
    total_bytes = sum(a[2] for a in per_type.values())
    lines += ["", f"totals: {len(tensors)} tensors, {total_params:,} parameters ({_human_count(total_params)})"]
    if per_type:
        rows = [["type", "tensors", "parameters", "bytes", "bits/weight"]]
        for dtype in sorted(per_type):
            n, params, nbytes = per_type[dtype]
            rows.append([dtype.label, str(n), f"{params:,}", _human_bytes(nbytes), f"{8 * nbytes / params:.2f}"])
        rows.append(["all", str(len(tensors)), f"{total_params:,}", _human_bytes(total_bytes),
                     f"{8 * total_bytes / total_params:.2f}"])
        lines += _table(rows, right={1, 2, 3, 4})
    return "\n".join(lines) + "\n"
