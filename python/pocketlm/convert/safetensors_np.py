"""A lazy, numpy-only reader of .safetensors files, bf16 included.

safetensors' own numpy path cannot return bf16 (numpy has no such dtype), and the runtime must
not need torch, so we read the (simple) format directly: an 8-byte header length, a JSON header
of {name: {dtype, shape, data_offsets}}, then the data. Tensors are memory-mapped and decoded
one at a time.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from pocketlm.errors import BundleError, UnsupportedModelError, shown

_NP_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8"}
_ITEM_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}


class SafetensorsFile:
    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise BundleError(f"{self.path.name}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise BundleError(f"{self.path.name}: truncated safetensors header")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise BundleError(f"{self.path.name}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise BundleError(f"{self.path.name}: corrupt safetensors header (not a JSON object)")
        header.pop("__metadata__", None)
        self._data_start = 8 + n
        self._entries = header
        data_bytes = size - self._data_start
        for name, e in header.items():
            where = f"{self.path.name}: tensor {shown(name)}"
            ints = lambda v: isinstance(v, list) and all(type(x) is int and x >= 0 for x in v)  # noqa: E731
            if not (isinstance(e, dict) and isinstance(e.get("dtype"), str) and ints(e.get("shape"))
                    and ints(e.get("data_offsets")) and len(e["data_offsets"]) == 2):
                raise BundleError(f"{where}: corrupt safetensors entry (dtype, shape and data_offsets expected)")
            start, end = e["data_offsets"]
            n_elements = 1
            for d in e["shape"]:
                n_elements *= d
            if e["dtype"] in _ITEM_BYTES and end - start != _ITEM_BYTES[e["dtype"]] * n_elements:
                raise BundleError(f"{where} has inconsistent size")
            if not 0 <= start <= end <= data_bytes:
                raise BundleError(f"{where} lies outside the file (truncated?)")
        self._map: np.ndarray | None = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self._entries[name]["shape"])

    def dtype(self, name: str) -> str:
        return self._entries[name]["dtype"]

    def load_f32(self, name: str) -> np.ndarray:
        """The tensor as a new float32 array."""
        e = self._entries[name]
        dt = e["dtype"]
        if dt not in _NP_DTYPES:
            raise UnsupportedModelError(f"{self.path.name}: tensor {shown(name)} has unsupported dtype {shown(dt)}")
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        start, end = e["data_offsets"]
        raw = self._map[self._data_start + start : self._data_start + end].view(_NP_DTYPES[dt])
        if dt == "BF16":  # bf16 is the top half of an f32
            out = raw.astype(np.uint32)
            out <<= 16  # in place: a second 4-byte copy of a 1B model's tensors cost ~1 s
            out = out.view(np.float32)
        else:
            out = raw.astype(np.float32)
        return out.reshape(self.shape(name))
