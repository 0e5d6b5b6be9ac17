"""Reading a .plm bundle.

`Bundle` is a thin layer over `_core.Bundle` (csrc/format/bundle_reader.cpp), which maps the file
and validates every byte it relies on; the metadata JSON is parsed and range-checked by
pocketlm.metadata. Without the C++ extension (the converter works without it), `PyLayout` reads the
header, metadata and index in Python for the loader's checks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import numpy as np

from pocketlm.bundle.layout import HEADER, HEADER_BYTES, MAGIC, Header, parse_index
from pocketlm.dtypes import DType
from pocketlm.errors import BundleError, shown
from pocketlm.metadata import MAX_METADATA_BYTES, MetadataError, parse_metadata


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
                f"{self.path}: metadata says format_version {shown(meta['format_version'])}, "
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


class PyLayout:
    """A bundle's header, metadata and index read in Python, in the shape of a _core.Bundle for
    `Bundle`: what the loader's checks need when the C++ extension is not built (the converter
    works without it). Only the structure is checked here; the C++ reader also checks every
    checksum and bound."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                head = f.read(HEADER_BYTES)
                if len(head) < HEADER.size or head[:8] != MAGIC:
                    raise BundleError(f"{path}: not a pocketlm bundle (bad magic)")
                h = Header.unpack(head)
                self.version, self.file_bytes = h.version, h.file_bytes
                if h.meta_bytes > MAX_METADATA_BYTES:
                    raise BundleError(f"{path}: metadata is {h.meta_bytes} bytes, more than the "
                                      f"{MAX_METADATA_BYTES} allowed")
                f.seek(h.meta_offset)
                meta = f.read(h.meta_bytes)
                f.seek(h.index_offset)
                index = f.read(h.index_bytes)
        except OSError as e:
            raise BundleError(f"{path}: cannot read: {e.strerror or e}") from None
        try:
            self.metadata_json = meta.decode("utf-8")
            self.tensors = [{"name": e.name.decode("utf-8"), "dtype": e.dtype, "shape": e.shape, "nbytes": e.nbytes,
                             "offset": e.offset} for e in parse_index(index)[0]]
        except ValueError as e:  # UnicodeDecodeError is one
            raise BundleError(f"{path}: malformed bundle ({e})") from None


def open_for_checks(path: str | os.PathLike) -> Bundle:
    """The bundle as the loader opens it (read_bundle), or, without the C++ extension, its
    structure read in Python: enough for the metadata, model and tokenizer checks
    (pocketlm.engine.check_loadable), not for reading tensor data."""
    try:
        from pocketlm import _core  # noqa: F401
    except ImportError:
        bundle = Bundle(PyLayout(os.fsdecode(os.fspath(path))))
        bundle.metadata
        return bundle
    return read_bundle(path)
