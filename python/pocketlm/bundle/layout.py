"""The .plm layout (docs/format.md): the header, where the sections go, the index entries.

    header (256 bytes) | metadata JSON | index | padding to DATA_ALIGN | data

This is the one Python reading and writing of the header and the index: the writer packs them,
the loader's checks without the C++ extension read them (reader.PyLayout), and so does the fuzzers'
re-signing mutator (fuzz/plm_layout.py). Reading here only follows the structure; the C++ reader
(csrc/format/bundle_reader.cpp) is the one that checks every checksum and bound.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections.abc import Sequence
from typing import NamedTuple

MAGIC = b"POCKETLM"
FORMAT_VERSION = 1
HEADER_BYTES = 256
DATA_ALIGN = 4096  # data section offset: page aligned so that weights map straight in
TENSOR_ALIGN = 64  # tensor offsets within the data section: cache-line/SIMD aligned
MAX_NAME_BYTES = 1024
MAX_DIMS = 4

# Header fields [0, 168): magic, version, header size, file size, then the three sections
# (offset, bytes) and the SHA-256 of metadata, index and data. The header's own SHA-256 follows.
HEADER = struct.Struct("<8sIIQQQQQQQ32s32s32s")
HEADER_SHA = slice(HEADER.size, HEADER.size + 32)
assert HEADER.size == 168

_ENTRY_HEAD = struct.Struct("<II")  # dtype, number of dims (after the name)
_ENTRY_TAIL = struct.Struct("<QQ32s")  # offset, nbytes, SHA-256 (after the dims)


def sha256(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


def align_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


class Header(NamedTuple):
    magic: bytes
    version: int
    header_bytes: int
    file_bytes: int
    meta_offset: int
    meta_bytes: int
    index_offset: int
    index_bytes: int
    data_offset: int
    data_bytes: int
    meta_sha: bytes
    index_sha: bytes
    data_sha: bytes

    @classmethod
    def unpack(cls, buf) -> Header:
        """The header fields at the start of `buf` (at least HEADER.size bytes)."""
        return cls._make(HEADER.unpack_from(buf))

    def pack(self) -> bytes:
        """HEADER_BYTES bytes: the fields, their SHA-256, zero padding."""
        fields = HEADER.pack(*self)
        return (fields + sha256(fields)).ljust(HEADER_BYTES, b"\0")


def sign_header(buf: bytearray) -> bytearray:
    """Recomputes the header's own checksum of the bundle in `buf` (after its fields were edited)."""
    if len(buf) >= HEADER_SHA.stop:
        buf[HEADER_SHA] = sha256(bytes(buf[: HEADER.size]))
    return buf


def section_offsets(meta_bytes: int, index_bytes: int) -> tuple[int, int, int]:
    """(meta_offset, index_offset, data_offset) as the writer lays the sections out: metadata right
    after the header, the index right after it, the data at the next DATA_ALIGN boundary."""
    index_offset = HEADER_BYTES + meta_bytes
    return HEADER_BYTES, index_offset, align_up(index_offset + index_bytes, DATA_ALIGN)


@dataclasses.dataclass
class IndexEntry:
    name: bytes  # UTF-8
    dtype: int
    shape: list[int]
    offset: int  # from the start of the data section
    nbytes: int
    sha: bytes  # SHA-256 of the tensor's bytes

    def pack(self) -> bytes:
        return b"".join((
            struct.pack("<H", len(self.name)), self.name,
            _ENTRY_HEAD.pack(self.dtype, len(self.shape)),
            struct.pack(f"<{len(self.shape)}Q", *self.shape),
            _ENTRY_TAIL.pack(self.offset, self.nbytes, self.sha),
        ))

    @staticmethod
    def packed_bytes(name_bytes: int, ndim: int) -> int:
        return 2 + name_bytes + _ENTRY_HEAD.size + 8 * ndim + _ENTRY_TAIL.size


def pack_index(entries: Sequence[IndexEntry]) -> bytes:
    return struct.pack("<I", len(entries)) + b"".join(e.pack() for e in entries)


def parse_index(index: bytes, dims: range = range(1, MAX_DIMS + 1)) -> tuple[list[IndexEntry], int]:
    """The entries of an index section and where the last one ends. Raises ValueError when the
    section ends inside an entry, or an entry's number of dims is not in `dims`."""
    try:
        (count,) = struct.unpack_from("<I", index)
        pos, entries = 4, []
        for _ in range(count):
            (name_len,) = struct.unpack_from("<H", index, pos)
            name = bytes(index[pos + 2 : pos + 2 + name_len])
            pos += 2 + name_len
            dtype, ndim = _ENTRY_HEAD.unpack_from(index, pos)
            pos += _ENTRY_HEAD.size
            if ndim not in dims:
                raise ValueError(f"tensor {name.decode('utf-8', 'replace')!r} has {ndim} dims")
            shape = list(struct.unpack_from(f"<{ndim}Q", index, pos))
            pos += 8 * ndim
            offset, nbytes, sha = _ENTRY_TAIL.unpack_from(index, pos)
            pos += _ENTRY_TAIL.size
            entries.append(IndexEntry(name, dtype, shape, offset, nbytes, sha))
    except struct.error as e:
        raise ValueError(f"the index ends inside an entry ({e})") from None
    return entries, pos
