"""A .plm bundle taken apart and put back together with valid checksums, for the re-signing mutator.

A hostile author recomputes every SHA-256 after editing a file, so a fuzzer that only flips bits
stops at the checksums. This module reads a bundle into its parts (metadata JSON, index entries,
data) with pocketlm's own reading of the layout (pocketlm.bundle.layout), lets the mutator change
any of them, and writes the file out again laid out as the writer does, with the section, tensor
and header checksums recomputed. Unlike the writer, it packs the sizes and offsets the mutator puts in
an entry wrapped to 64 bits, and reads entries of up to 16 dims, or none.
"""

from __future__ import annotations

import dataclasses

from pocketlm.bundle.layout import (FORMAT_VERSION, HEADER_BYTES, MAGIC, Header, IndexEntry, parse_index,
                                    section_offsets, sha256, sign_header)

Entry = IndexEntry
_U64 = 2**64 - 1


@dataclasses.dataclass
class Layout:
    meta: bytes
    entries: list[Entry]
    data: bytes
    version: int = FORMAT_VERSION
    index_tail: bytes = b""  # bytes after the last entry (a valid file has none)


def parse(buf: bytes) -> Layout | None:
    """The parts of a bundle, or None when its header or index cannot be followed."""
    if len(buf) < HEADER_BYTES:
        return None
    h = Header.unpack(buf)
    if max(h.meta_offset + h.meta_bytes, h.index_offset + h.index_bytes, h.data_offset + h.data_bytes) > len(buf):
        return None
    index = buf[h.index_offset:h.index_offset + h.index_bytes]
    try:
        entries, end = parse_index(index, dims=range(17))
    except ValueError:
        return None
    return Layout(bytes(buf[h.meta_offset:h.meta_offset + h.meta_bytes]), entries,
                  bytes(buf[h.data_offset:h.data_offset + h.data_bytes]), h.version, bytes(index[end:]))


def _packable(e: Entry) -> Entry:
    """`e` with its 64-bit numbers wrapped (the mutator doubles and offsets them past 2^64)."""
    return Entry(e.name, e.dtype, [d & _U64 for d in e.shape], e.offset & _U64, e.nbytes & _U64, e.sha)


def build(layout: Layout, retensor: bool = True) -> bytearray:
    """The bundle's bytes, laid out as the writer does, every checksum valid. With `retensor`, each
    tensor's checksum is recomputed from the bytes its (possibly edited) entry points at."""
    data = layout.data
    if retensor:
        for e in layout.entries:
            if e.offset + e.nbytes <= len(data):
                e.sha = sha256(data[e.offset:e.offset + e.nbytes])
    index = (len(layout.entries).to_bytes(4, "little") + b"".join(_packable(e).pack() for e in layout.entries)
             + layout.index_tail)
    meta_off, index_off, data_off = section_offsets(len(layout.meta), len(index))
    buf = bytearray(HEADER_BYTES) + layout.meta + index
    buf += bytes(data_off - len(buf)) + data
    buf[:HEADER_BYTES] = Header(MAGIC, layout.version, HEADER_BYTES, len(buf), meta_off, len(layout.meta), index_off,
                                len(index), data_off, len(data), sha256(layout.meta), sha256(index),
                                sha256(data)).pack()
    return buf


def resign_header(buf: bytearray) -> bytearray:
    """Recomputes the header's own checksum after the header was edited in place."""
    return sign_header(buf)
