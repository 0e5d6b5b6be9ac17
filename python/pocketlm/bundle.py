"""Writing and reading `.plm` bundles (the format is specified in docs/format.md).

The writer streams: tensor bytes are produced one tensor at a time by `TensorSpec.load()`, hashed
while written, and dropped, so converting a large model never holds all weights in memory. It
writes to a temporary file next to the target and renames it into place only once complete (and
only once an optional check, the loader's, accepts it).

The reader is a thin layer over `_core.Bundle` (csrc/format/bundle_reader.cpp), which maps the
file and validates every byte it relies on; the metadata JSON is parsed and range-checked by
pocketlm.metadata.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import operator
import os
import re
import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pocketlm.dtypes import DType, tensor_nbytes
from pocketlm.errors import BundleError, PocketLMError, StorageError
from pocketlm.metadata import (MAX_METADATA_BYTES, MetadataError, check_encoded, encode_problem, parse_json_bounded,
                               parse_metadata)

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


def _encode_metadata(metadata: dict, path: str) -> bytes:
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    meta = dict(metadata)
    if meta.setdefault("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise ValueError(f"metadata format_version must be {FORMAT_VERSION}, got {meta['format_version']!r}")
    problem = encode_problem(meta)  # json.dumps would say only "Out of range float values ..."
    if problem is not None:
        raise BundleError(f"{path}: not written: bad metadata: {problem}")
    text = json.dumps(meta, sort_keys=True, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    try:
        check_encoded(text)  # what the reader would refuse before parsing (size, nesting, ...)
    except MetadataError as e:
        raise BundleError(f"{path}: not written: bad metadata: {e}") from None
    return text.encode("utf-8")


_TMP_NAME = re.compile(r"^\.(?P<base>.+)\.tmp-(?P<pid>[0-9]+)$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # someone else's process (or no way to tell): keep its file
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Removes the temporary files that writes of `path` left behind when their process was killed
    (`.NAME.tmp-PID` next to it, PID no longer running); returns their paths. A file whose PID is
    running (a write in progress, or an unrelated process that reused the PID) is kept."""
    folder, base = os.path.split(os.path.abspath(os.fspath(path)))
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _TMP_NAME.match(name)
        if not m or m["base"] != base:
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            os.unlink(os.path.join(folder, name))
            removed.append(os.path.join(folder, name))
        except OSError:
            pass
    return removed


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
    check: Callable[[str], None] | None = None,
) -> None:
    """Writes a .plm bundle atomically: either `path` ends up holding the complete new bundle or
    it is left as it was (and no temporary file remains). `progress(bytes_done, bytes_total)` is
    called as the data section is written. `check(tmp_path)` runs on the complete temporary file
    before it is renamed into place; whatever it raises stops the write (pocketlm.engine.
    check_loadable: the converter never writes a bundle the loader refuses). Temporary files of
    earlier writes of `path` whose process was killed are removed first.

    Raises BundleError for metadata the reader would refuse, StorageError (an OSError, naming
    `path`) when the file cannot be written (disk full, no permission, ...)."""
    path = os.fspath(path)
    meta = _encode_metadata(metadata, path)
    planned, data_bytes = _plan_tensors(tensors)
    meta_offset = HEADER_BYTES
    index_offset = meta_offset + len(meta)
    index_bytes = _index_bytes(planned)
    data_offset = _align_up(index_offset + index_bytes, DATA_ALIGN)
    file_bytes = data_offset + data_bytes

    folder, base = os.path.split(os.path.abspath(path))
    remove_stale_temporaries(path)
    tmp = os.path.join(folder, f".{base}.tmp-{os.getpid()}")
    try:
        _write_file(path, tmp, planned, meta, data_bytes, data_offset, file_bytes, index_offset, index_bytes,
                    progress)
        if check is not None:
            try:
                check(tmp)
            except PocketLMError as e:  # said of the temporary file: say it of `path`
                msg = str(e)
                msg = msg[len(tmp) + 2:] if msg.startswith(tmp + ": ") else msg
                raise type(e)(f"{path}: not written, the loader would refuse it: {msg}") from e
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise _storage_error(path, e) from e
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:  # never written (open failed), or the folder went away
            pass
        raise
    _fsync_dir(folder)


def _storage_error(path: str, e: OSError) -> StorageError:
    """The OSError of a failed write, as a StorageError naming the bundle (the temporary file's
    name means nothing to the user)."""
    err = StorageError(f"cannot write {path}: {e.strerror or e}")
    err.errno = e.errno  # for `except OSError as e: e.errno == ENOSPC`; filename and strerror stay
    return err           # unset, or str() would become "[Errno 28] ..." instead of the message


class _Sink:
    """The temporary file, its OSErrors raised as StorageError naming the bundle. Only the file's
    own calls are wrapped: an OSError of a tensor's load() (reading the source) stays itself."""

    def __init__(self, path: str, tmp: str):
        self.path = path
        self.f = self._do(open, tmp, "wb")

    def _do(self, fn, *args):
        try:
            return fn(*args)
        except OSError as e:
            raise _storage_error(self.path, e) from e

    def write(self, b) -> None:
        self._do(self.f.write, b)

    def seek(self, pos: int) -> None:
        self._do(self.f.seek, pos)

    def sync(self) -> None:
        self._do(self.f.flush)
        self._do(os.fsync, self.f.fileno())

    def __enter__(self) -> _Sink:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self._do(self.f.close)
        else:
            try:
                self.f.close()
            except OSError:  # the first error is the one to report
                pass


def _write_file(path: str, tmp: str, planned: Sequence[_Planned], meta: bytes, data_bytes: int, data_offset: int,
                file_bytes: int, index_offset: int, index_bytes: int, progress) -> None:
    meta_offset = HEADER_BYTES
    with _Sink(path, tmp) as f:
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
        f.sync()


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
            meta = parse_metadata(self.core.metadata_json)
        except MetadataError as e:
            raise BundleError(f"{self.path}: {e}") from None
        if meta.get("format_version", self.version) != self.version:
            raise BundleError(
                f"{self.path}: metadata says format_version {meta['format_version']!r}, "
                f"header says {self.version}"
            )
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


class _PyLayout:
    """A bundle's header, metadata and index read in Python, in the shape of a _core.Bundle for
    `Bundle`: what the loader's checks need when the C++ extension is not built (the converter
    works without it). Only the structure is checked here; the C++ reader also checks every
    checksum and bound."""

    _ENTRY = struct.Struct("<II")

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                head = f.read(HEADER_BYTES)
                if len(head) < _HEADER.size or head[:8] != MAGIC:
                    raise BundleError(f"{path}: not a pocketlm bundle (bad magic)")
                (_, self.version, _, self.file_bytes, meta_off, meta_len, index_off, index_len, _, _,
                 *_) = _HEADER.unpack_from(head)
                if meta_len > MAX_METADATA_BYTES:
                    raise BundleError(f"{path}: metadata is {meta_len} bytes, more than the "
                                      f"{MAX_METADATA_BYTES} allowed")
                f.seek(meta_off)
                meta = f.read(meta_len)
                f.seek(index_off)
                index = f.read(index_len)
        except OSError as e:
            raise BundleError(f"{path}: cannot read: {e.strerror or e}") from None
        try:
            self.metadata_json = meta.decode("utf-8")
            self.tensors = self._index(index)
        except (UnicodeDecodeError, struct.error, ValueError) as e:
            raise BundleError(f"{path}: malformed bundle ({e})") from None

    def _index(self, index: bytes) -> list[dict]:
        (n,) = struct.unpack_from("<I", index)
        pos, out = 4, []
        for _ in range(n):
            (name_len,) = struct.unpack_from("<H", index, pos)
            name = index[pos + 2 : pos + 2 + name_len].decode("utf-8")
            pos += 2 + name_len
            dtype, ndim = self._ENTRY.unpack_from(index, pos)
            if not 1 <= ndim <= MAX_DIMS:
                raise ValueError(f"tensor {name!r} has {ndim} dims")
            shape = struct.unpack_from(f"<{ndim}Q", index, pos + 8)
            offset, nbytes = struct.unpack_from("<QQ", index, pos + 8 + 8 * ndim)
            pos += 8 + 8 * ndim + 16 + 32
            out.append({"name": name, "dtype": dtype, "shape": list(shape), "nbytes": nbytes, "offset": offset})
        return out


def open_for_checks(path: str | os.PathLike) -> Bundle:
    """The bundle as the loader opens it (read_bundle), or, without the C++ extension, its
    structure read in Python: enough for the metadata, model and tokenizer checks
    (pocketlm.engine.check_loadable), not for reading tensor data."""
    try:
        from pocketlm import _core  # noqa: F401
    except ImportError:
        bundle = Bundle(_PyLayout(os.fsdecode(os.fspath(path))))
        bundle.metadata
        return bundle
    return read_bundle(path)


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
        spec = parse_json_bounded(tokenizer["json"])
        vocab = spec["model"]["vocab"]
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
        ids += [tok["id"] for tok in spec.get("added_tokens") or []]
        return max(ids) + 1 if ids else 0
    except (ValueError, KeyError, TypeError, AttributeError, MetadataError):
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
