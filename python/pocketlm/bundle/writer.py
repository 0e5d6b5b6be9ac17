"""Writing a .plm bundle.

The writer streams: tensor bytes are produced one tensor at a time by `TensorSpec.load()`, hashed
while written, and dropped, so converting a large model never holds all weights in memory. It
writes to a temporary file next to the target and renames it into place only once complete (and
only once an optional check, the loader's, accepts it): atomic.py.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import operator
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pocketlm.bundle.atomic import Sink, replacing
from pocketlm.bundle.layout import (FORMAT_VERSION, HEADER_BYTES, MAGIC, MAX_DIMS, MAX_NAME_BYTES, TENSOR_ALIGN,
                                    Header, IndexEntry, align_up, pack_index, section_offsets)
from pocketlm.dtypes import DType, tensor_nbytes
from pocketlm.errors import BundleError, PocketLMError, shown
from pocketlm.metadata import MetadataError, check_encoded, encode_problem

_WRITE_CHUNK = 16 << 20  # bytes written (and reported to `progress`) per step


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One tensor to write. `load()` returns its stored bytes (exactly `nbytes` of them; for a type
    whose bytes depend on its values, DType.variable, as many as it takes) as bytes, bytearray, a
    numpy array or any other buffer; it is called once, when the tensor is written."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    load: Callable[[], Any]

    @property
    def nbytes(self) -> int | None:
        """The stored bytes, or None for a variable type (known once loaded)."""
        dtype = DType(self.dtype)
        return None if dtype.variable else tensor_nbytes(dtype, tuple(self.shape))


@dataclasses.dataclass(frozen=True)
class _Planned:
    name: bytes  # UTF-8
    dtype: DType
    shape: tuple[int, ...]
    offset: int  # from data_offset, as planned (a variable tensor moves the ones after it)
    nbytes: int | None  # None: a variable type's, known once loaded
    spec: TensorSpec
    estimate: int  # bytes for the progress total (a variable type's at most)


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
            raise ValueError(f"tensor {shown(spec.name)}: name must be 1..{MAX_NAME_BYTES} UTF-8 bytes")
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
            if dtype.variable:  # i8_bitmask at most: every value stored
                if len(shape) != 2 or shape[1] % 64:
                    raise ValueError(f"{dtype.label} needs a 2-D shape with a multiple of 64 columns, got {shape}")
                nbytes, estimate = None, 8 * (shape[0] + 1) + shape[0] * shape[1] * 9 // 8 + 4 * shape[0]
            else:
                nbytes = estimate = tensor_nbytes(dtype, shape)
        except ValueError as e:
            raise ValueError(f"tensor {spec.name!r}: {e}") from None
        pos = align_up(pos, TENSOR_ALIGN)
        planned.append(_Planned(name, dtype, shape, pos, nbytes, spec, estimate))
        pos += estimate
    return planned, pos


def _as_byte_view(obj: Any, spec: TensorSpec, expected: int | None) -> memoryview:
    """A flat uint8 view of what `load()` returned, checked to be `expected` bytes long (None: any)."""
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
    if expected is not None and view.nbytes != expected:
        raise ValueError(
            f"tensor {spec.name!r}: load() returned {view.nbytes} bytes, expected {expected} "
            f"for {DType(spec.dtype).label} {tuple(spec.shape)}"
        )
    return view


def _stream(f, view: memoryview, hashes, done: int, total: int, progress, pool) -> int:
    """Writes `view` in chunks, feeding every hasher; returns the new bytes-done count. Each chunk's
    hashes run on `pool`'s threads while it is written (hashlib and the write release the GIL): on a
    491 MB bundle the two hashes and the write took 0.7 s + 0.8 s one after the other."""
    for start in range(0, view.nbytes, _WRITE_CHUNK):
        chunk = view[start : start + _WRITE_CHUNK]
        hashing = [pool.submit(h.update, chunk) for h in hashes]
        try:
            f.write(chunk)
        finally:
            for h in hashing:
                h.result()  # each hasher sees its chunks in order: one at a time
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
    with replacing(path) as tmp:
        _write_file(path, tmp, planned, meta, data_bytes, progress)
        if check is not None:
            try:
                check(tmp)
            except PocketLMError as e:  # said of the temporary file: say it of `path`
                msg = str(e)
                msg = msg[len(tmp) + 2:] if msg.startswith(tmp + ": ") else msg
                raise type(e)(f"{path}: not written, the loader would refuse it: {msg}") from e


def _write_file(path: str, tmp: str, planned: Sequence[_Planned], meta: bytes, data_bytes: int, progress) -> None:
    index_bytes = 4 + sum(IndexEntry.packed_bytes(len(t.name), len(t.shape)) for t in planned)
    meta_offset, index_offset, data_offset = section_offsets(len(meta), index_bytes)
    with Sink(path, tmp) as f, concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="pocketlm-hash") as pool:
        # Data first (its hashes go into the index), then header, metadata, index, padding.
        f.seek(data_offset)
        data_sha = hashlib.sha256()
        entries: list[IndexEntry] = []
        done = 0
        if progress is not None:
            progress(0, data_bytes)
        for t in planned:
            offset = align_up(done, TENSOR_ALIGN)  # as planned, until a variable tensor came out shorter
            pad = bytes(offset - done)
            if pad:
                f.write(pad)
                data_sha.update(pad)
                done += len(pad)
            tensor_sha = hashlib.sha256()
            # The loaded bytes are referenced only inside _stream: freed before the next load.
            view = _as_byte_view(t.spec.load(), t.spec, t.nbytes)
            nbytes = view.nbytes
            done = _stream(f, view, (tensor_sha, data_sha), done, max(data_bytes, done + nbytes), progress, pool)
            del view
            entries.append(IndexEntry(t.name, int(t.dtype), list(t.shape), offset, nbytes, tensor_sha.digest()))
        if progress is not None and done != data_bytes:  # a variable tensor took less than estimated
            progress(done, done)
        data_bytes = done

        index = pack_index(entries)
        assert len(index) == index_bytes
        header = Header(
            MAGIC, FORMAT_VERSION, HEADER_BYTES, data_offset + data_bytes,
            meta_offset, len(meta), index_offset, index_bytes, data_offset, data_bytes,
            hashlib.sha256(meta).digest(), hashlib.sha256(index).digest(), data_sha.digest(),
        )
        f.seek(0)
        f.write(header.pack())
        f.write(meta)
        f.write(index)
        f.write(bytes(data_offset - (index_offset + index_bytes)))
        f.sync()
