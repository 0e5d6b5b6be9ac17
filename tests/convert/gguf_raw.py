"""GGUF files byte by byte, for hostile inputs no writer would produce: any count, offset, type or
value. Written from the GGUF spec (ggml docs/gguf.md); the value type ids and encodings are those of
pocketlm's reader (pocketlm.convert.gguf_file), the GGML type ids those of the gguf package.

A file is a list of metadata entries and a list of tensors; `to_bytes` lays the tensors out
aligned and in order unless a tensor names its own offset, and takes overrides for the header
counts, the version and the magic.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as _GGML

# Value types (spec: gguf_metadata_value_type) and their encodings: pocketlm's reader's own table.
from pocketlm.convert.gguf_file import (_SCALAR_DTYPES, ARRAY, BOOL, DEFAULT_ALIGNMENT, FLOAT32,  # noqa: F401
                                        FLOAT64, INT8, INT16, INT32, INT64, MAGIC, STRING, UINT8, UINT16, UINT32,
                                        UINT64)

# GGML type ids (ggml.h enum ggml_type), from the gguf package
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, I8, BF16 = (int(t) for t in (
    _GGML.F32, _GGML.F16, _GGML.Q4_0, _GGML.Q4_1, _GGML.Q5_0, _GGML.Q5_1, _GGML.Q8_0, _GGML.Q4_K, _GGML.Q5_K,
    _GGML.Q6_K, _GGML.I8, _GGML.BF16))


def string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def value(vtype: int, v, elem: int | None = None) -> bytes:
    if vtype == STRING:
        return string(v)
    if vtype == ARRAY:
        return struct.pack("<IQ", elem, len(v)) + b"".join(value(elem, x) for x in v)
    return np.array(v, dtype=_SCALAR_DTYPES[vtype]).tobytes()


@dataclass
class KV:
    key: str
    vtype: int
    value: object
    elem: int | None = None  # an array's element type
    raw: bytes | None = None  # the encoded value, used as is when given

    def to_bytes(self) -> bytes:
        body = self.raw if self.raw is not None else value(self.vtype, self.value, self.elem)
        return string(self.key) + struct.pack("<I", self.vtype) + body


@dataclass
class Tensor:
    name: str | bytes
    dims: tuple[int, ...]  # innermost first, as GGUF lists them
    type_id: int
    data: bytes
    offset: int | None = None  # from the data section's start; None: next aligned position


@dataclass
class GGUF:
    kvs: list[KV]
    tensors: list[Tensor]
    alignment: int = DEFAULT_ALIGNMENT  # the layout's; general.alignment is whatever `kvs` say
    version: int = 3
    magic: bytes = MAGIC
    counts: tuple[int | None, int | None] = (None, None)  # (tensor_count, kv_count) overrides

    def kv(self, key: str) -> KV:
        return next(k for k in self.kvs if k.key == key)

    def set(self, key: str, vtype: int, v, elem: int | None = None) -> None:
        """Replaces (or adds) a metadata entry."""
        self.kvs = [k for k in self.kvs if k.key != key] + [KV(key, vtype, v, elem)]

    def tensor(self, name: str) -> Tensor:
        return next(t for t in self.tensors if t.name == name)

    def natural_offsets(self) -> list[int]:
        """Where each tensor goes when none names its own offset: in order, aligned."""
        offsets, pos = [], 0
        for t in self.tensors:
            pos = -(-pos // self.alignment) * self.alignment
            offsets.append(pos)
            pos += len(t.data)
        return offsets

    def to_bytes(self) -> bytes:
        offsets = [n if t.offset is None else t.offset for t, n in zip(self.tensors, self.natural_offsets())]
        n_tensors = len(self.tensors) if self.counts[0] is None else self.counts[0]
        n_kv = len(self.kvs) if self.counts[1] is None else self.counts[1]
        head = self.magic + struct.pack("<IQQ", self.version, n_tensors, n_kv)
        head += b"".join(k.to_bytes() for k in self.kvs)
        for t, off in zip(self.tensors, offsets):
            head += string(t.name) + struct.pack("<I", len(t.dims)) + struct.pack(f"<{len(t.dims)}Q", *t.dims)
            head += struct.pack("<IQ", t.type_id, off)
        out = bytearray(head + bytes(-len(head) % self.alignment))
        data = bytearray()
        for t, off in zip(self.tensors, offsets):
            if off + len(t.data) <= (1 << 40):  # a hostile offset gets no data
                data[len(data):] = bytes(max(0, off - len(data)))
                data[off:off + len(t.data)] = t.data
        return bytes(out + data)


def f16_bytes(v: float) -> bytes:
    return np.array([v], dtype="<f2").tobytes()
