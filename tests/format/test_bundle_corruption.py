"""Damaged and hostile bundles: every one must raise BundleError naming the problem (or, for damaged
tensor data, be reported by verify()), and none may crash the process or read out of bounds."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest

from bundle_craft import entry, fix_checksums, raw_bundle, read_header, write_header
from pocketlm import _core
from pocketlm.bundle import TensorSpec, read_bundle, write_bundle
from pocketlm.dtypes import DType
from pocketlm.errors import BundleError

RNG = np.random.default_rng(7)
A = RNG.integers(0, 256, 256, dtype=np.uint8).tobytes()  # f32 (4, 16)
B = RNG.integers(0, 256, 68, dtype=np.uint8).tobytes()  # q8_0 (2, 32), at offset 256
DATA = A + B


def good_entries():
    return [
        entry("a", int(DType.F32), (4, 16), 0, 256, hashlib.sha256(A).digest()),
        entry("b", int(DType.Q8_0), (2, 32), 256, 68, hashlib.sha256(B).digest()),
    ]


def open_bytes(tmp_path, buf, name="x.plm"):
    path = tmp_path / name
    path.write_bytes(bytes(buf))
    return read_bundle(path)


@pytest.fixture
def written(tmp_path):
    """A writer-made bundle with gaps between tensors, plus its header fields."""
    specs = [
        TensorSpec("t0", DType.F32, (3,), lambda: A[:12]),  # 12 bytes: 52 bytes of padding follow
        TensorSpec("t1", DType.Q8_0, (2, 32), lambda: B),
    ]
    path = tmp_path / "w.plm"
    write_bundle(path, {"architecture": "test", "note": "é"}, specs)
    buf = bytearray(path.read_bytes())
    return path, buf, read_header(buf)


def test_crafted_baseline_is_valid(tmp_path):
    b = open_bytes(tmp_path, raw_bundle(good_entries(), DATA))
    assert [t.name for t in b.tensors] == ["a", "b"] and b.verify() == []


# ---- single byte flips, checksums left alone ----

def flip(buf, pos):
    out = bytearray(buf)
    out[pos] ^= 0x10
    return out


@pytest.mark.parametrize("pos, match", [
    (20, "header checksum"),  # file size field
    (30, "header checksum"),  # meta_offset
    (60, "header checksum"),  # data_offset
    (140, "header checksum"),  # data sha
    (170, "header checksum"),  # the header checksum itself
    (230, "reserved header bytes"),
])
def test_header_flip_fails_open(tmp_path, written, pos, match):
    _, buf, _ = written
    with pytest.raises(BundleError, match=match):
        open_bytes(tmp_path, flip(buf, pos))


def test_metadata_index_and_padding_flips_fail_open(tmp_path, written):
    _, buf, h = written
    for pos, match in [
        (h["meta_offset"], "metadata checksum"),
        (h["meta_offset"] + h["meta_bytes"] - 1, "metadata checksum"),
        (h["index_offset"] + 5, "index checksum"),
        (h["index_offset"] + h["index_bytes"] - 1, "index checksum"),
        (h["index_offset"] + h["index_bytes"], "padding before the data section"),
        (h["data_offset"] - 1, "padding before the data section"),
    ]:
        with pytest.raises(BundleError, match=match):
            open_bytes(tmp_path, flip(buf, pos))


def test_data_flip_is_named_by_verify(tmp_path, written):
    _, buf, h = written
    d = h["data_offset"]
    b = open_bytes(tmp_path, flip(buf, d + 64 + 40), "t1.plm")  # opens: data is hashed on request
    assert b.verify() == ["data section: checksum mismatch", "tensor 't1': checksum mismatch"]
    b = open_bytes(tmp_path, flip(buf, d + 3), "t0.plm")
    assert "tensor 't0': checksum mismatch" in b.verify()
    b = open_bytes(tmp_path, flip(buf, d + 20), "pad.plm")  # padding between t0 and t1
    (problem,) = b.verify()
    assert problem.startswith("data section: checksum mismatch") and "padding" in problem


# ---- truncation ----

def test_truncation_at_many_offsets(tmp_path, written):
    _, buf, h = written
    size = len(buf)
    cuts = [0, 1, 7, 8, 100, 255, 256, h["meta_offset"] + h["meta_bytes"] // 2,
            h["index_offset"] + h["index_bytes"] // 2, h["data_offset"], h["data_offset"] + 30, size - 1]
    for cut in cuts:
        with pytest.raises(BundleError) as err:
            open_bytes(tmp_path, buf[:cut])
        msg = str(err.value)
        if cut == 0:
            assert "empty" in msg
        elif cut < 256:
            assert "truncated" in msg and "256-byte header" in msg
        else:
            assert f"truncated: expected {size} bytes, file has {cut}" in msg
    with pytest.raises(BundleError, match="trailing data"):
        open_bytes(tmp_path, buf + b"\0")


# ---- hostile files: structurally wrong, but with every checksum correct ----

F32, Q8 = int(DType.F32), int(DType.Q8_0)
sha_a = hashlib.sha256(A).digest()


def second(**kw):
    args = dict(name="b", dtype=Q8, shape=(2, 32), offset=256, nbytes=68)
    args.update(kw)
    return [good_entries()[0], entry(args.pop("name"), args.pop("dtype"), args.pop("shape"),
                                     args.pop("offset"), args.pop("nbytes"), **args)]


HOSTILE_INDEX = {
    "name_len 0": (second(name=b"", name_len=0), "name length 0 "),
    "name_len 60000": (second(name="b", name_len=60000), "name length 60000"),
    "name past index end": (second(name="b", name_len=1000), "ends inside the name"),
    "name not utf-8": (second(name=b"\xff\xfe"), "not valid UTF-8"),
    "ndim 0": (second(shape=(), ndim=0), "ndim 0 "),
    "ndim 5": (second(shape=(1, 1, 1, 2, 32), ndim=5), "ndim 5 "),
    "ndim larger than entry": (second(ndim=4), "tensor 'b': "),
    "dim 0": (second(shape=(0, 32)), "invalid size 0"),
    "dim 2^63": (second(shape=(2**63, 32)), "invalid size"),
    "rows overflow": (second(shape=(2**62, 2**62, 32)), "shape overflows"),
    "bytes overflow": (second(shape=(2**62, 32)), "size overflows"),
    "cols overflow": (second(dtype=F32, shape=(1, 2**62), nbytes=2**64 - 1), "size overflows"),
    "huge but no overflow": (second(dtype=DType.F16, shape=(2**62,), nbytes=2**63), "outside the data"),
    "offset past data": (second(offset=4096), "outside the data section"),
    "offset near 2^64": (second(offset=2**64 - 64), "outside the data section"),
    "offset unaligned": (second(offset=288), "not a multiple of 64"),
    "nbytes inconsistent": (second(nbytes=67), "nbytes 67 does not match"),
    "nbytes zero": (second(nbytes=0), "does not match"),
    "cols not block multiple": (second(shape=(2, 48), nbytes=68), "multiple of 32"),
    "overlap": (second(offset=192), "overlaps tensor"),
    "duplicate name": (second(name="a"), "duplicate"),
    "unknown dtype": (second(dtype=len(DType)), f"unknown tensor type id {len(DType)}"),  # the first unused id
    # x16 types hold whole groups of 16 rows: a kernel would read past the tensor otherwise
    "x16 rows not a multiple of 16": (second(dtype=int(DType.Q8_0_X16)), "rows a multiple of 16, got 2 rows"),
    "x16 not 2-D": (second(dtype=int(DType.Q8_0_X16), shape=(2, 1, 32)), "needs a 2-D shape"),
    "dtype 2^32-1": (second(dtype=2**32 - 1), "unknown tensor type"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_INDEX))
def test_hostile_index(tmp_path, case):
    entries, match = HOSTILE_INDEX[case]
    with pytest.raises(BundleError, match=match):
        open_bytes(tmp_path, raw_bundle(entries, DATA))


@pytest.mark.parametrize("kw, match", [
    (dict(index_extra=b"\0"), "1 trailing bytes"),
    (dict(index_extra=bytes(80)), "80 trailing bytes"),
    (dict(n_tensors=3), "room for at most|ends inside"),
    (dict(n_tensors=3, index_extra=entry("c", 0, (1, 16), 384, 64)[:-5]), "ends inside the sha256"),
    (dict(n_tensors=2**32 - 1), "room for at most"),
    (dict(n_tensors=1), "trailing bytes"),
    (dict(meta=b'{"a":"\xff"}'), "metadata is not valid UTF-8"),
    (dict(meta=b'{"a":"\xed\xa0\x80"}'), "metadata is not valid UTF-8"),  # surrogate
    (dict(meta=b'{"a":"\xc0\xaf"}'), "metadata is not valid UTF-8"),  # overlong
    (dict(meta=b'{"a": 1,}'), "not valid JSON"),
    (dict(meta=b"[1, 2]"), "not a JSON object"),
    (dict(meta=b'{"format_version": 2}'), "format_version"),
])
def test_hostile_index_and_metadata(tmp_path, kw, match):
    with pytest.raises(BundleError, match=match):
        open_bytes(tmp_path, raw_bundle(good_entries(), DATA, **kw))


def hdr(**fields):
    def tamper(buf):
        write_header(buf, **fields)
        return buf
    return tamper


def hostile_headers():
    h = read_header(raw_bundle(good_entries(), DATA))
    size, mo, ib, io, do = h["file_bytes"], h["meta_offset"], h["index_bytes"], h["index_offset"], h["data_offset"]
    return {
        "version 2": (hdr(version=2), "made by a newer pocketlm"),
        "version 0": (hdr(version=0), "unsupported format version 0"),
        "header size": (hdr(header_size=128), "bad header size 128"),
        "magic": (hdr(magic=b"POCKETLN"), "not a .plm bundle"),
        "file size larger": (hdr(file_bytes=size + 1), f"truncated: expected {size + 1} bytes, file has {size}"),
        "file size smaller": (hdr(file_bytes=size - 1), "trailing data"),
        "meta overlaps header": (hdr(meta_offset=100), "overlaps the header"),
        "index overlaps header": (hdr(index_offset=0), "overlaps the header"),
        "data overlaps header": (hdr(data_offset=0), "overlaps the header"),
        "index overlaps meta": (hdr(index_offset=io - 1), "overlaps"),
        "meta overlaps index": (hdr(meta_bytes=h["meta_bytes"] + 1), "overlaps"),
        "index overlaps data": (hdr(index_bytes=do - io + 1), "overlaps"),
        "data unaligned": (hdr(data_offset=do - 64, data_bytes=h["data_bytes"] + 64), "not a multiple of 4096"),
        "data past end": (hdr(data_bytes=h["data_bytes"] + 1), "outside the file"),
        "meta offset overflow": (hdr(meta_offset=2**64 - 1), "outside the file"),
        "index bytes overflow": (hdr(index_bytes=2**64 - 1), "outside the file"),
        "data short": (hdr(data_bytes=h["data_bytes"] - 4), "outside the data section|not zero"),
        "meta empty": (hdr(meta_bytes=0), "too small"),
        "index too small": (hdr(index_bytes=3), "too small"),
        "meta moved": (hdr(meta_offset=mo + 1, meta_bytes=h["meta_bytes"] - 1), "padding|JSON"),
        "index_bytes short": (hdr(index_bytes=ib - 1), "ends inside|padding"),
    }


@pytest.mark.parametrize("case", sorted(hostile_headers()))
def test_hostile_header(tmp_path, case):
    tamper, match = hostile_headers()[case]
    buf = fix_checksums(tamper(raw_bundle(good_entries(), DATA)))
    with pytest.raises(BundleError, match=match):
        open_bytes(tmp_path, buf)


def test_nonzero_trailing_padding(tmp_path):
    buf = raw_bundle(good_entries(), DATA) + b"\0" * 10 + b"x"
    write_header(buf, file_bytes=len(buf))
    with pytest.raises(BundleError, match="after the last section are not zero"):
        open_bytes(tmp_path, fix_checksums(buf))


def test_newer_version_message(tmp_path):
    buf = raw_bundle(good_entries(), DATA)
    write_header(buf, version=7)
    with pytest.raises(BundleError, match=r"format version 7, this build reads version 1\); upgrade"):
        open_bytes(tmp_path, buf)


# ---- fuzz: random damage must give success or BundleError, nothing else ----

def test_random_mutation_fuzz(tmp_path):
    rng = np.random.default_rng(2024)
    entries = good_entries() + [entry("c", int(DType.I8), (2, 3, 4), 384, 48, bytes(32))]
    base = raw_bundle(entries, DATA + bytes(384 - len(DATA)) + bytes(48))
    assert read_bundle_ok(tmp_path, base)
    h = read_header(base)
    regions = [(0, 256), (h["meta_offset"], h["meta_offset"] + h["meta_bytes"]),
               (h["index_offset"], h["index_offset"] + h["index_bytes"]), (0, len(base))]
    outcomes = {"ok": 0, "error": 0}
    for i in range(300):
        buf = bytearray(base)
        for _ in range(int(rng.integers(1, 6))):
            kind = rng.integers(0, 10)
            if kind < 7:  # flip / set bytes, mostly in the structured regions
                lo, hi = regions[rng.choice(4, p=[0.3, 0.1, 0.45, 0.15])]
                pos = int(rng.integers(lo, hi))
                if pos >= len(buf):
                    continue
                buf[pos] = int(rng.integers(0, 256)) if rng.random() < 0.5 else buf[pos] ^ (1 << int(rng.integers(8)))
            elif kind < 8:  # a plausible-looking u64 (small, huge or boundary) in the header or index
                lo, hi = regions[rng.choice([0, 2])]
                pos = int(rng.integers(lo, max(lo + 1, hi - 8)))
                values = [0, 1, 63, 64, 4096, 2**32 - 1, 2**63, 2**64 - 1, len(buf)]
                if pos + 8 <= len(buf):
                    buf[pos : pos + 8] = struct.pack("<Q", values[int(rng.integers(len(values)))])
            elif kind < 9:  # truncate
                del buf[int(rng.integers(0, len(buf))) :]
            else:  # extend
                buf += bytes(int(rng.integers(1, 5000)))
        if i % 2:
            fix_checksums(buf)
        outcomes["ok" if read_bundle_ok(tmp_path, buf) else "error"] += 1
    assert outcomes["error"] > 100  # the fuzz does reach the checks


def read_bundle_ok(tmp_path, buf) -> bool:
    try:
        b = open_bytes(tmp_path, buf, "fuzz.plm")
    except BundleError as e:
        assert "fuzz.plm: " in str(e)
        return False
    # Whatever opened must be fully usable.
    b.verify()
    for t in b.tensors:
        assert b.tensor(t.name).nbytes == t.nbytes
        assert t.offset + t.nbytes <= read_header(bytes(buf))["data_bytes"]
    return True


def test_core_open_directly_raises_bundle_error(tmp_path):
    path = tmp_path / "bad.plm"
    path.write_bytes(b"POCKETLM" + bytes(300))
    with pytest.raises(BundleError):
        _core.Bundle(str(path))
