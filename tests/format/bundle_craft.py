"""Builds raw .plm bytes by hand, independently of pocketlm.bundle.write_bundle, so that tests can
craft hostile files (and cross-check the writer against a second reading of docs/format.md)."""

from __future__ import annotations

import hashlib
import struct

HEADER = struct.Struct("<8sIIQQQQQQQ32s32s32s")  # header bytes [0, 168)
FIELDS = (
    "magic", "version", "header_size", "file_bytes",
    "meta_offset", "meta_bytes", "index_offset", "index_bytes", "data_offset", "data_bytes",
    "meta_sha", "index_sha", "data_sha",
)


def sha(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


def align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def entry(name, dtype: int, shape, offset: int, nbytes: int, digest: bytes = bytes(32),
          name_len: int | None = None, ndim: int | None = None) -> bytes:
    """One index entry; name_len/ndim override the true lengths to build lying entries."""
    raw = name.encode() if isinstance(name, str) else bytes(name)
    return b"".join((
        struct.pack("<H", len(raw) if name_len is None else name_len), raw,
        struct.pack("<II", dtype, len(shape) if ndim is None else ndim),
        b"".join(struct.pack("<Q", d) for d in shape),
        struct.pack("<QQ", offset, nbytes), digest,
    ))


def read_header(buf: bytes) -> dict:
    return dict(zip(FIELDS, HEADER.unpack_from(buf, 0)))


def write_header(buf: bytearray, **fields) -> None:
    h = read_header(buf)
    h.update(fields)
    HEADER.pack_into(buf, 0, *(h[f] for f in FIELDS))


def fix_checksums(buf: bytearray) -> bytearray:
    """Recomputes the section and header checksums (where the sections are in bounds), so that
    a tampered file must be caught by the structural checks rather than by a checksum."""
    if len(buf) < 256:
        return buf
    h = read_header(buf)
    for name, key in (("meta", "meta_sha"), ("index", "index_sha"), ("data", "data_sha")):
        off, n = h[f"{name}_offset"], h[f"{name}_bytes"]
        if off + n <= len(buf):
            h[key] = sha(bytes(buf[off : off + n]))
    HEADER.pack_into(buf, 0, *(h[f] for f in FIELDS))
    buf[168:200] = sha(bytes(buf[:168]))
    return buf


def raw_bundle(entries: list[bytes], data: bytes, meta: bytes = b'{"format_version":1}',
               n_tensors: int | None = None, index_extra: bytes = b"") -> bytearray:
    """A bundle laid out like the writer does (header, metadata, index, page-aligned data) with
    correct section checksums; tensor checksums are whatever the entries carry."""
    index = struct.pack("<I", len(entries) if n_tensors is None else n_tensors) + b"".join(entries) + index_extra
    meta_offset = 256
    index_offset = meta_offset + len(meta)
    data_offset = align_up(index_offset + len(index), 4096)
    buf = bytearray(256) + meta + index
    buf += bytes(data_offset - len(buf)) + data
    HEADER.pack_into(buf, 0, b"POCKETLM", 1, 256, len(buf), meta_offset, len(meta), index_offset,
                     len(index), data_offset, len(data), bytes(32), bytes(32), bytes(32))
    return fix_checksums(buf)


def with_metadata(buf: bytes, meta: bytes) -> bytearray:
    """`buf` (a bundle) with its metadata section replaced by `meta`, the index and data moved to
    follow it and every checksum recomputed: hostile metadata that only the metadata checks see."""
    h = read_header(buf)
    index = bytes(buf[h["index_offset"] : h["index_offset"] + h["index_bytes"]])
    data = bytes(buf[h["data_offset"] : h["data_offset"] + h["data_bytes"]])
    (n_tensors,) = struct.unpack_from("<I", index)
    return raw_bundle([], data, meta=meta, n_tensors=n_tensors, index_extra=index[4:])
