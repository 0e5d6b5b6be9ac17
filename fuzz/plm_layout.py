"""A .plm bundle taken apart and put back together with valid checksums, for the re-signing mutator.

A hostile author recomputes every SHA-256 after editing a file, so a fuzzer that only flips bits
stops at the checksums. This module reads a bundle into its parts (metadata JSON, index entries,
data) following docs/format.md, lets the mutator change any of them, and writes the file out again
laid out as the writer does, with the section, tensor and header checksums recomputed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct

HEADER = struct.Struct("<8sIIQQQQQQQ32s32s32s")  # bytes [0, 168); [168, 200) is its own SHA-256
HEADER_BYTES = 256
DATA_ALIGN = 4096


@dataclasses.dataclass
class Entry:
    name: bytes
    dtype: int
    shape: list[int]
    offset: int  # from the data section
    nbytes: int
    sha: bytes

    def pack(self) -> bytes:
        return (struct.pack("<H", len(self.name) & 0xFFFF) + self.name + struct.pack("<II", self.dtype, len(self.shape))
                + b"".join(struct.pack("<Q", d & (2**64 - 1)) for d in self.shape)
                + struct.pack("<QQ", self.offset & (2**64 - 1), self.nbytes & (2**64 - 1)) + self.sha)


@dataclasses.dataclass
class Layout:
    meta: bytes
    entries: list[Entry]
    data: bytes
    version: int = 1
    index_tail: bytes = b""  # bytes after the last entry (a valid file has none)


def parse(buf: bytes) -> Layout | None:
    """The parts of a bundle, or None when its header or index cannot be followed."""
    if len(buf) < HEADER_BYTES:
        return None
    (_, version, _, _, meta_off, meta_n, index_off, index_n, data_off, data_n, *_) = HEADER.unpack_from(buf)
    if max(meta_off + meta_n, index_off + index_n, data_off + data_n) > len(buf):
        return None
    index = buf[index_off:index_off + index_n]
    if len(index) < 4:
        return None
    (count,) = struct.unpack_from("<I", index)
    pos, entries = 4, []
    try:
        for _ in range(min(count, 100_000)):
            (name_len,) = struct.unpack_from("<H", index, pos)
            name = bytes(index[pos + 2:pos + 2 + name_len])
            pos += 2 + name_len
            dtype, ndim = struct.unpack_from("<II", index, pos)
            pos += 8
            if ndim > 16:
                return None
            shape = list(struct.unpack_from(f"<{ndim}Q", index, pos))
            pos += 8 * ndim
            offset, nbytes = struct.unpack_from("<QQ", index, pos)
            sha = bytes(index[pos + 16:pos + 48])
            pos += 48
            if len(sha) != 32:
                return None
            entries.append(Entry(name, dtype, shape, offset, nbytes, sha))
    except struct.error:
        return None
    return Layout(bytes(buf[meta_off:meta_off + meta_n]), entries, bytes(buf[data_off:data_off + data_n]),
                  version, bytes(index[pos:]))


def sha(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


def build(layout: Layout, retensor: bool = True) -> bytearray:
    """The bundle's bytes, laid out as the writer does, every checksum valid. With `retensor`, each
    tensor's checksum is recomputed from the bytes its (possibly edited) entry points at."""
    data = layout.data
    if retensor:
        for e in layout.entries:
            if e.offset + e.nbytes <= len(data):
                e.sha = sha(data[e.offset:e.offset + e.nbytes])
    index = struct.pack("<I", len(layout.entries)) + b"".join(e.pack() for e in layout.entries) + layout.index_tail
    meta_off = HEADER_BYTES
    index_off = meta_off + len(layout.meta)
    data_off = -(-(index_off + len(index)) // DATA_ALIGN) * DATA_ALIGN
    buf = bytearray(HEADER_BYTES) + layout.meta + index
    buf += bytes(data_off - len(buf)) + data
    HEADER.pack_into(buf, 0, b"POCKETLM", layout.version, HEADER_BYTES, len(buf), meta_off, len(layout.meta),
                     index_off, len(index), data_off, len(data), sha(layout.meta), sha(index), sha(data))
    buf[168:200] = sha(bytes(buf[:168]))
    return buf


def resign_header(buf: bytearray) -> bytearray:
    """Recomputes the header's own checksum after the header was edited in place."""
    if len(buf) >= 200:
        buf[168:200] = sha(bytes(buf[:168]))
    return buf
