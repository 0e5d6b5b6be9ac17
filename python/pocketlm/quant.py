"""Weight quantization to the .plm tensor types (docs/format.md), vectorised with numpy.

`quantize(x, dtype)` turns a 2-D float32 tensor into the exact bytes the kernels read;
`dequantize(raw, dtype, shape)` is its inverse (up to quantization error). Q8_0, Q4_0, Q4_1,
Q5_0, Q5_1, Q4_K, Q5_K, Q6_K and BF16 are byte-identical in layout to GGUF's types of the same
name, and `dequantize` gives bit for bit the values of `gguf.quants.dequantize` for them.
The K-quants are only ever copied from GGUF files: `quantize` does not produce them.

Schemes (a "group" is one block of `dtype.block_elems` elements of a row):
  Q8_0         symmetric:  d = amax/127, q = round(x/d)                       x ~ d*q
  Q4_0 family  symmetric:  v = the element of largest |x|, d = v/-8,
                           q = clamp(round(x/d) + 8, 0, 15)                  x ~ d*(q-8)
  Q4_1 family  asymmetric: m = min, d = (max-min)/15,
                           q = clamp(round((x-m)/d), 0, 15)                  x ~ d*q + m
  I8           per row:    s = amax/127 (f32), q = round(x/s)                 x ~ s*q
  Q5_0         as Q4_0 with 5 bits: d = v/-16, q = clamp(round(x/d) + 16, 0, 31) x ~ d*(q-16)
  Q5_1         as Q4_1 with 5 bits: d = (max-min)/31                          x ~ d*q + m
  BF16         round to nearest even (NaN kept quiet), as gguf
q is computed with the f16-rounded d and m, i.e. the values the kernels will see.
"""

from __future__ import annotations

import numpy as np

from pocketlm.dtypes import X16_OF, X16_ROWS, DType, tensor_nbytes

__all__ = ["quantize", "dequantize", "interleave", "deinterleave", "first_nonfinite", "KEEP_ONLY"]

# Rows are processed in chunks of about this many elements to bound temporary memory.
_CHUNK_ELEMS = 1 << 22


def _f16_round(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(f16 values, the same as f32) for an f32 array."""
    h = v.astype(np.float16)
    return h, h.astype(np.float32)


def _safe_inverse(d: np.ndarray) -> np.ndarray:
    """1/d, and 0 where d == 0 (all-zero groups quantize to q = 0 / the zero point)."""
    out = np.zeros_like(d)
    np.divide(np.float32(1.0), d, out=out, where=d != 0)
    return out


def _pack_nibbles(q: np.ndarray, group: int) -> np.ndarray:
    """q: [n_blocks, group] uint8 in [0, 15] -> [n_blocks, group/2] packed GGUF-style."""
    runs = q.reshape(q.shape[0], group // 32, 2, 16)
    return (runs[:, :, 0, :] | (runs[:, :, 1, :] << 4)).reshape(q.shape[0], group // 2)


def _unpack_nibbles(packed: np.ndarray, group: int) -> np.ndarray:
    """Inverse of _pack_nibbles: [n_blocks, group/2] -> [n_blocks, group] uint8."""
    runs = packed.reshape(packed.shape[0], group // 32, 1, 16)
    q = np.concatenate([runs & 0x0F, runs >> 4], axis=2)
    return q.reshape(packed.shape[0], group)


def _quantize_q8_0(xb: np.ndarray) -> np.ndarray:
    amax = np.max(np.abs(xb), axis=1)
    d16, d = _f16_round(amax / np.float32(127.0))
    q = np.clip(np.rint(xb * _safe_inverse(d)[:, None]), -127, 127).astype(np.int8)
    out = np.empty((xb.shape[0], 34), dtype=np.uint8)
    out[:, :2] = d16.view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q.view(np.uint8)
    return out


def _quantize_q4_0(xb: np.ndarray, group: int) -> np.ndarray:
    idx = np.argmax(np.abs(xb), axis=1)
    vmax = np.take_along_axis(xb, idx[:, None], axis=1)[:, 0]
    d16, d = _f16_round(vmax / np.float32(-8.0))
    q = np.clip(np.rint(xb * _safe_inverse(d)[:, None]) + 8, 0, 15).astype(np.uint8)
    out = np.empty((xb.shape[0], 2 + group // 2), dtype=np.uint8)
    out[:, :2] = d16.view(np.uint8).reshape(-1, 2)
    out[:, 2:] = _pack_nibbles(q, group)
    return out


def _quantize_q4_1(xb: np.ndarray, group: int) -> np.ndarray:
    lo = np.min(xb, axis=1)
    hi = np.max(xb, axis=1)
    d16, d = _f16_round((hi - lo) / np.float32(15.0))
    m16, m = _f16_round(lo)
    q = np.clip(np.rint((xb - m[:, None]) * _safe_inverse(d)[:, None]), 0, 15).astype(np.uint8)
    out = np.empty((xb.shape[0], 4 + group // 2), dtype=np.uint8)
    out[:, 0:2] = d16.view(np.uint8).reshape(-1, 2)
    out[:, 2:4] = m16.view(np.uint8).reshape(-1, 2)
    out[:, 4:] = _pack_nibbles(q, group)
    return out


def _pack_q5(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """q: [n_blocks, 32] uint8 in [0, 31] -> (qh [n_blocks, 4] little-endian bits, qs [n_blocks, 16])."""
    qs = _pack_nibbles(q & 0x0F, 32)
    qh = np.packbits(q >> 4, axis=-1, bitorder="little")
    return qh, qs


def _quantize_q5_0(xb: np.ndarray) -> np.ndarray:
    idx = np.argmax(np.abs(xb), axis=1)
    vmax = np.take_along_axis(xb, idx[:, None], axis=1)[:, 0]
    d16, d = _f16_round(vmax / np.float32(-16.0))
    q = np.clip(np.rint(xb * _safe_inverse(d)[:, None]) + 16, 0, 31).astype(np.uint8)
    qh, qs = _pack_q5(q)
    out = np.empty((xb.shape[0], 22), dtype=np.uint8)
    out[:, 0:2] = d16.view(np.uint8).reshape(-1, 2)
    out[:, 2:6] = qh
    out[:, 6:] = qs
    return out


def _quantize_q5_1(xb: np.ndarray) -> np.ndarray:
    lo = np.min(xb, axis=1)
    hi = np.max(xb, axis=1)
    d16, d = _f16_round((hi - lo) / np.float32(31.0))
    m16, m = _f16_round(lo)
    q = np.clip(np.rint((xb - m[:, None]) * _safe_inverse(d)[:, None]), 0, 31).astype(np.uint8)
    qh, qs = _pack_q5(q)
    out = np.empty((xb.shape[0], 24), dtype=np.uint8)
    out[:, 0:2] = d16.view(np.uint8).reshape(-1, 2)
    out[:, 2:4] = m16.view(np.uint8).reshape(-1, 2)
    out[:, 4:8] = qh
    out[:, 8:] = qs
    return out


def _to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16): round to nearest even, NaN kept quiet (as gguf)."""
    n = np.ascontiguousarray(x, dtype="<f4").view(np.uint32).astype(np.uint64)
    nan = (n & 0x7FFFFFFF) > 0x7F800000
    rounded = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
    quiet = ((n & 0xFFFF0000) | (64 << 16)) >> 16
    return np.where(nan, quiet, rounded).astype("<u2")


# Types quantize() cannot produce: GGUF K-quants are only kept (copied) from GGUF files.
KEEP_ONLY = (DType.Q4_K, DType.Q5_K, DType.Q6_K)


# --- x16 interleaving (layout: csrc/common.h) --------------------------------------------------


# Header field sizes in bytes, in block order (csrc/common.h x16_block); the rest of a block is codes.
_X16_FIELDS = {DType.Q8_0: (2,), DType.Q4_0: (2,), DType.Q4_1: (2, 2), DType.I8: (), DType.Q5_0: (2, 4),
               DType.Q5_1: (2, 2, 4), DType.Q4_0_G64: (2,), DType.Q4_0_G128: (2,), DType.Q4_1_G64: (2, 2),
               DType.Q4_1_G128: (2, 2)}


def _x16_args(raw, base: DType, shape):
    """(bytes, header field sizes, code bytes per block, row groups, blocks per row, bytes per block,
    bytes of all blocks) of a [rows, cols] tensor of `base`, its size checked. Blocks are the x16
    type's (I8: 32 elements; its row scales follow the blocks)."""
    if base not in X16_OF:
        raise ValueError(f"{base.label} has no x16 form")
    rows, cols = (int(s) for s in shape)
    x16 = X16_OF[base]
    nbytes = tensor_nbytes(x16, (rows, cols))  # checks rows % 16 and the block size
    buf = np.asarray(raw, dtype=np.uint8).reshape(-1)
    if buf.size != nbytes:
        raise ValueError(f"a {base.label} tensor of shape {(rows, cols)} has {nbytes} bytes, got {buf.size}")
    fields = _X16_FIELDS[base]
    nb, bb = cols // x16.block_elems, x16.block_bytes
    return buf, fields, bb - sum(fields), rows // X16_ROWS, nb, bb, rows * nb * bb


def interleave(raw: np.ndarray, base: DType, shape) -> np.ndarray:
    """Bytes of a [rows, cols] tensor of row-major type `base` (Q8_0, Q4_* of any group, I8, Q5_0,
    Q5_1) in its x16 form: each group of 16 rows as one run of block records (header fields, then
    code bytes in 4-byte units, row 0 first). Same size; I8's row scales stay at the end. One C++
    pass of copies (csrc/common.h x16_scatter_row) where the extension is built, else numpy."""
    buf, *_ = _x16_args(raw, DType(base), shape)
    try:
        from pocketlm._core import interleave_x16
    except ImportError:  # the converter runs without the extension (bundle/reader.py)
        return interleave_numpy(raw, base, shape)
    return interleave_x16(np.ascontiguousarray(buf), int(X16_OF[DType(base)]), int(shape[0]), int(shape[1]))


def interleave_numpy(raw: np.ndarray, base: DType, shape) -> np.ndarray:
    """`interleave` in numpy transposes (4x slower than the C++ pass; the tests compare the two)."""
    buf, fields, code, g, nb, bb, n = _x16_args(raw, DType(base), shape)
    blocks = buf[:n].reshape(g, X16_ROWS, nb, bb)
    parts, off = [], 0
    for size in fields:  # each field: [g, nb, 16 rows, size]
        parts.append(blocks[..., off:off + size].transpose(0, 2, 1, 3).reshape(g, nb, -1))
        off += size
    codes = blocks[..., off:].reshape(g, X16_ROWS, nb, code // 4, 4).transpose(0, 2, 3, 1, 4)
    rec = np.concatenate([*parts, codes.reshape(g, nb, -1)], axis=2)
    return np.concatenate([rec.reshape(-1), buf[n:]])


def deinterleave(raw: np.ndarray, base: DType, shape) -> np.ndarray:
    """The inverse of `interleave`: x16 bytes back to the row-major bytes of `base`."""
    buf, fields, code, g, nb, bb, n = _x16_args(raw, DType(base), shape)
    rec = buf[:n].reshape(g, nb, X16_ROWS * bb)
    parts, off = [], 0
    for size in fields:
        parts.append(rec[..., off:off + X16_ROWS * size].reshape(g, nb, X16_ROWS, size).transpose(0, 2, 1, 3))
        off += X16_ROWS * size
    codes = rec[..., off:].reshape(g, nb, code // 4, X16_ROWS, 4).transpose(0, 3, 1, 2, 4)
    blocks = np.concatenate([*parts, codes.reshape(g, X16_ROWS, nb, -1)], axis=3)
    return np.concatenate([blocks.reshape(-1), buf[n:]])


# ---- The 2:4-sparse types Q4_0_24_X16 and I8_24_X16 (layouts: csrc/common.h) ----
SPARSE24_PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
# Bytes of a record (16 rows x 64 columns) and where its pattern codes start.
_SPARSE24_RECORD = {DType.Q4_0_24_X16: (384, 288), DType.I8_24_X16: (608, 512)}


def is_2_of_4(x: np.ndarray) -> bool:
    """Every run of four columns of the 2-D x has at most two non-zero values."""
    rows, cols = x.shape
    return cols % 4 == 0 and bool(np.all(np.count_nonzero(x.reshape(rows, cols // 4, 4), axis=2) <= 2))


def _sparse24_pick(g: np.ndarray) -> np.ndarray:
    """[..., 4] groups with at most two non-zeros -> the two kept columns [..., 2] (the non-zeros, then
    the lowest zero columns), ascending."""
    order = np.argsort(g == 0, axis=-1, kind="stable")[..., :2]  # non-zeros first, by column
    return np.sort(order, axis=-1)


def _quantize_sparse24(x: np.ndarray, dtype: DType) -> np.ndarray:
    rows, cols = x.shape
    tensor_nbytes(dtype, (rows, cols))
    if not is_2_of_4(x):
        raise ValueError(f"{dtype.label} needs at most two non-zero values in every four columns (2:4)")
    nb, r16 = cols // 64, rows // 16
    record, pat = _SPARSE24_RECORD[dtype]
    groups = np.asarray(x, np.float32).reshape(rows, nb, 16, 4)
    kept = _sparse24_pick(groups)                                    # [rows, nb, 16, 2]
    values = np.take_along_axis(groups, kept, axis=-1).reshape(rows, nb, 32)
    codes = np.full(kept.shape[:-1], -1, np.int64)
    for c, (a, b) in enumerate(SPARSE24_PAIRS):
        codes[(kept[..., 0] == a) & (kept[..., 1] == b)] = c
    out = np.zeros((r16, nb, record), np.uint8)
    if dtype == DType.Q4_0_24_X16:
        q4 = _quantize_q4_0(values.reshape(rows * nb, 32), 32).reshape(r16, 16, nb, 18)  # [r16, i, b, {d, qs[16]}]
        out[:, :, :32] = q4[..., :2].transpose(0, 2, 1, 3).reshape(r16, nb, 32)
        qs = q4[..., 2:].transpose(0, 2, 1, 3).reshape(r16, nb, 16, 4, 4)  # [r16, b, i, u, 4]
        out[:, :, 32:288] = qs.transpose(0, 1, 3, 2, 4).reshape(r16, nb, 256)
        scales = None
    else:  # the int8 mode's per-row scale over the kept values (the row's largest magnitudes)
        scales = (np.max(np.abs(values), axis=(1, 2)) / np.float32(127.0)).astype("<f4")
        q = np.clip(np.rint(values * _safe_inverse(scales)[:, None, None]), -127, 127).astype(np.int8)
        q = q.reshape(r16, 16, nb, 8, 4).transpose(0, 2, 3, 1, 4)    # [r16, b, u, i, 4]
        out[:, :, :512] = q.reshape(r16, nb, 512).view(np.uint8)
    codes = codes.reshape(r16, 16, nb, 16)                            # [r16, i, b, g]
    # unit u, row i: 12 bits at 12 i = codes of groups 2u, 2u+1, 8+2u, 9+2u at bits 0, 3, 6, 9
    for u in range(4):
        bits = np.zeros((r16, nb, 16), "<u2")
        for k, grp in enumerate((2 * u, 2 * u + 1, 8 + 2 * u, 9 + 2 * u)):
            bits |= (codes[..., grp].transpose(0, 2, 1) << (3 * k)).astype("<u2")
        # each row's 12 bits, one per byte (little-endian), then the 16 rows' back to back: 192 bits
        word = np.unpackbits(bits[..., None].view(np.uint8), axis=-1, bitorder="little")[..., :12]
        out[:, :, pat + 24 * u:pat + 24 * (u + 1)] = np.packbits(word.reshape(r16, nb, 192), axis=-1, bitorder="little")
    out = out.reshape(-1)
    return out if scales is None else np.concatenate([out, scales.view(np.uint8)])


def _dequantize_sparse24(raw: np.ndarray, dtype: DType, rows: int, cols: int) -> np.ndarray:
    nb, r16 = cols // 64, rows // 16
    record, pat = _SPARSE24_RECORD[dtype]
    buf = np.asarray(raw).reshape(-1).view(np.uint8)
    rec = buf[:r16 * nb * record].reshape(r16, nb, record)
    if dtype == DType.Q4_0_24_X16:
        d = rec[:, :, :32].copy().view("<f2").astype(np.float32)                    # [r16, b, i]
        qs = rec[:, :, 32:288].reshape(r16, nb, 4, 16, 4).transpose(0, 1, 3, 2, 4)  # [r16, b, i, u, 4]
        qs = qs.reshape(r16, nb, 16, 16)
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32)       # [r16, b, i, 32 values]
        vals = d[..., None] * (q - 8)
    else:
        s = buf[r16 * nb * record:].copy().view("<f4").reshape(r16, 1, 16, 1)       # per row
        q = rec[:, :, :512].reshape(r16, nb, 8, 16, 4).transpose(0, 1, 3, 2, 4).reshape(r16, nb, 16, 32)
        vals = s * q.view(np.int8).astype(np.float32)
    bits = np.unpackbits(rec[:, :, pat:], axis=-1, bitorder="little").reshape(r16, nb, 4, 16, 12)
    out = np.zeros((r16, nb, 16, 16, 4), np.float32)                                # [r16, b, i, g, col]
    weights3 = np.array([1, 2, 4])
    pairs = np.array(SPARSE24_PAIRS + ((0, 1), (0, 1)))
    for u in range(4):
        for k, grp in enumerate((2 * u, 2 * u + 1, 8 + 2 * u, 9 + 2 * u)):
            code = (bits[:, :, u, :, 3 * k:3 * k + 3] * weights3).sum(-1)   # [r16, b, i]
            a, b = pairs[code, 0], pairs[code, 1]
            np.put_along_axis(out[:, :, :, grp], a[..., None], vals[:, :, :, 2 * grp, None], axis=-1)
            np.put_along_axis(out[:, :, :, grp], b[..., None], vals[:, :, :, 2 * grp + 1, None], axis=-1)
    return out.reshape(r16, nb, 16, 64).transpose(0, 2, 1, 3).reshape(rows, cols)


# ---- I8_BITMASK: unstructured-sparse int8 (layout: csrc/common.h) ----
BITMASK_MIN_ZEROS = 0.5  # the share of zeros from which a tensor is stored as I8_BITMASK (convert)


def bitmask_nbytes(x: np.ndarray) -> int:
    """Bytes of the 2-D x as I8_BITMASK: row pointers, row scales, per row its masks and non-zero values."""
    rows, cols = x.shape
    if cols % 64:
        raise ValueError(f"i8_bitmask needs the last dimension to be a multiple of 64, got {cols}")
    return 8 * (rows + 1) + rows * (cols // 64) * 8 + int(np.count_nonzero(x)) + 4 * rows


def _quantize_bitmask(x: np.ndarray) -> np.ndarray:
    rows, cols = x.shape
    nbytes = bitmask_nbytes(x)
    nb = cols // 64
    x = np.asarray(x, np.float32)
    scales = (np.max(np.abs(x), axis=1) / np.float32(127.0)).astype("<f4")  # I8's scale
    q = np.clip(np.rint(x * _safe_inverse(scales)[:, None]), -127, 127).astype(np.int8)
    stored = x != 0  # the non-zeros are stored (even those that round to 0): bytes known from x alone
    counts = stored.sum(axis=1)
    lengths = 8 * nb + counts
    out = np.empty(nbytes, np.uint8)
    starts = np.zeros(rows + 1, np.int64)
    np.cumsum(lengths, out=starts[1:])
    out[:8 * (rows + 1)] = starts.astype("<u8").view(np.uint8)
    out[8 * (rows + 1):12 * rows + 8] = scales.view(np.uint8)
    masks = np.packbits(stored.reshape(rows, nb, 64), axis=-1, bitorder="little").reshape(rows, nb * 8)
    area = out[12 * rows + 8:]
    # each row: its masks at its start, then its stored values in column order
    mask_at = starts[:-1, None] + np.arange(8 * nb)[None, :]
    area[mask_at.reshape(-1)] = masks.reshape(-1)
    value_at = (starts[:-1] + 8 * nb)[:, None] + np.cumsum(stored, axis=1) - 1
    area[value_at[stored]] = q[stored].view(np.uint8)
    return out


def check_bitmask(buf: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The values each row stores [rows], or ValueError unless buf holds a valid I8_BITMASK [rows, cols]
    (csrc/common.h bitmask_check)."""
    nb = cols // 64
    if cols % 64 or buf.size < 8 * (rows + 1) + 4 * rows:
        raise ValueError(f"i8_bitmask [{rows}, {cols}]: too small ({buf.size} bytes) or cols not a multiple of 64")
    raw_starts = buf[:8 * (rows + 1)].copy().view("<u8")
    area = buf.size - 12 * rows - 8
    if raw_starts[0] != 0 or raw_starts[-1] != area or np.any(raw_starts > area):
        raise ValueError(f"i8_bitmask [{rows}, {cols}]: row pointers out of order or out of range")
    starts = raw_starts.astype(np.int64)
    if np.any(np.diff(starts) < 8 * nb):
        raise ValueError(f"i8_bitmask [{rows}, {cols}]: row pointers out of order or out of range")
    body = buf[12 * rows + 8:]
    masks = body[(starts[:-1, None] + np.arange(8 * nb)[None, :]).reshape(-1)]
    stored = np.unpackbits(masks.reshape(rows, 8 * nb), axis=-1).sum(axis=1)
    if np.any(np.diff(starts) != 8 * nb + stored):
        raise ValueError(f"i8_bitmask [{rows}, {cols}]: a row's values do not match its masks")
    return stored


def _dequantize_bitmask(buf: np.ndarray, rows: int, cols: int) -> np.ndarray:
    nb = cols // 64
    starts = buf[:8 * (rows + 1)].copy().view("<u8").astype(np.int64)  # checked: < 2^63
    scales = buf[8 * (rows + 1):12 * rows + 8].copy().view("<f4")
    area = buf[12 * rows + 8:]
    masks = area[(starts[:-1, None] + np.arange(8 * nb)[None, :]).reshape(-1)].reshape(rows, nb, 8)
    stored = np.unpackbits(masks, axis=-1, bitorder="little").reshape(rows, cols).astype(bool)
    value_at = (starts[:-1] + 8 * nb)[:, None] + np.cumsum(stored, axis=1) - 1
    q = np.zeros((rows, cols), np.float32)
    q[stored] = area[value_at[stored]].view(np.int8)
    return q * scales[:, None]


def quantize(x: np.ndarray, dtype: DType) -> np.ndarray:
    """Quantize a 2-D [rows, cols] float tensor; returns its .plm bytes as a 1-D uint8 array."""
    dtype = DType(dtype)
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"quantize expects a 2-D [rows, cols] array, got shape {x.shape}")
    if dtype.x16:
        tensor_nbytes(dtype, x.shape)
        return interleave(quantize(x, dtype.base), dtype.base, x.shape)
    if dtype.sparse:
        return _quantize_sparse24(x, dtype)
    if dtype.bitmask:
        return _quantize_bitmask(x)
    if dtype in KEEP_ONLY:
        raise ValueError(f"pocketlm does not quantize to {dtype.label}: K-quant tensors are only copied "
                         "from GGUF files (convert with --quant keep)")
    rows, cols = x.shape
    nbytes = tensor_nbytes(dtype, (rows, cols))  # also checks cols % block size
    if dtype == DType.F32:
        return np.ascontiguousarray(x, dtype="<f4").reshape(-1).view(np.uint8)
    if dtype == DType.F16:
        return np.ascontiguousarray(x.astype("<f2")).reshape(-1).view(np.uint8)
    if dtype == DType.BF16:
        return _to_bf16(x).reshape(-1).view(np.uint8)

    out = np.empty(nbytes, dtype=np.uint8)
    if dtype == DType.I8:
        q = out[: rows * cols].reshape(rows, cols).view(np.int8)
        scales = np.empty(rows, dtype="<f4")
        step = max(1, _CHUNK_ELEMS // max(cols, 1))
        for r0 in range(0, rows, step):
            xc = np.asarray(x[r0 : r0 + step], dtype=np.float32)
            s = np.max(np.abs(xc), axis=1) / np.float32(127.0)
            q[r0 : r0 + step] = np.clip(np.rint(xc * _safe_inverse(s)[:, None]), -127, 127)
            scales[r0 : r0 + step] = s
        out[rows * cols :] = scales.view(np.uint8)
        return out

    group = dtype.block_elems
    if dtype == DType.Q8_0:
        fn = _quantize_q8_0
    elif dtype == DType.Q5_0:
        fn = _quantize_q5_0
    elif dtype == DType.Q5_1:
        fn = _quantize_q5_1
    elif dtype in (DType.Q4_0, DType.Q4_0_G64, DType.Q4_0_G128):
        fn = lambda xb: _quantize_q4_0(xb, group)  # noqa: E731
    else:
        fn = lambda xb: _quantize_q4_1(xb, group)  # noqa: E731
    row_bytes = cols // group * dtype.block_bytes
    blocks_out = out.reshape(rows, row_bytes)
    step = max(1, _CHUNK_ELEMS // max(cols, 1))
    for r0 in range(0, rows, step):
        xc = np.asarray(x[r0 : r0 + step], dtype=np.float32)
        n = xc.shape[0]
        blocks_out[r0 : r0 + n] = fn(xc.reshape(-1, group)).reshape(n, row_bytes)
    return out


def dequantize(raw, dtype: DType, shape) -> np.ndarray:
    """Decode .plm tensor bytes of `dtype` and `shape` into a float32 array of that shape."""
    dtype = DType(dtype)
    shape = tuple(int(s) for s in shape)
    buf = np.frombuffer(raw, dtype=np.uint8) if not isinstance(raw, np.ndarray) else raw.reshape(-1)
    buf = buf.view(np.uint8)
    cols = shape[-1]
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    if dtype.bitmask:
        check_bitmask(buf, rows, cols)
        return _dequantize_bitmask(buf, rows, cols).reshape(shape)
    nbytes = tensor_nbytes(dtype, shape)
    if buf.size != nbytes:
        raise ValueError(f"{dtype.label} tensor of shape {shape} needs {nbytes} bytes, got {buf.size}")
    if dtype.x16:
        return dequantize(deinterleave(buf, dtype.base, shape), dtype.base, shape)
    if dtype.sparse:
        return _dequantize_sparse24(buf, dtype, rows, cols).reshape(shape)
    if dtype == DType.F32:
        return buf.view("<f4").astype(np.float32).reshape(shape)
    if dtype == DType.F16:
        return buf.view("<f2").astype(np.float32).reshape(shape)
    if dtype == DType.I8:
        q = buf[: rows * cols].view(np.int8).reshape(rows, cols)
        s = buf[rows * cols :].view("<f4").astype(np.float32)
        return (q.astype(np.float32) * s[:, None]).reshape(shape)

    if dtype == DType.BF16:
        return (buf.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)

    group = dtype.block_elems
    blocks = buf.reshape(-1, dtype.block_bytes)
    if dtype in _GGUF_DEQUANT:
        return _GGUF_DEQUANT[dtype](blocks).reshape(shape)
    d = blocks[:, 0:2].copy().view("<f2").astype(np.float32)  # [n_blocks, 1]
    if dtype == DType.Q8_0:
        q = blocks[:, 2:].view(np.int8).astype(np.float32)
        y = d * q
    elif dtype in (DType.Q4_0, DType.Q4_0_G64, DType.Q4_0_G128):
        q = _unpack_nibbles(blocks[:, 2:], group).astype(np.float32) - np.float32(8.0)
        y = d * q
    else:
        m = blocks[:, 2:4].copy().view("<f2").astype(np.float32)
        q = _unpack_nibbles(blocks[:, 4:], group).astype(np.float32)
        y = d * q + m
    return y.reshape(shape)


# --- GGUF 5-bit and K-quant blocks ------------------------------------------------------------
# Each decoder applies the same float32 operations, in the same order, as gguf's numpy
# dequantizers (and llama.cpp's dequantize_row_*), so the values are bit-identical:
#   Q5_0: d*(q-16)   Q5_1: (d*q) + m   Q4_K/Q5_K: (d*sc)*q - (dmin*mn)   Q6_K: (d*sc)*(q-32)
# Layouts: csrc/common.h.


def _f16_field(blocks: np.ndarray, start: int) -> np.ndarray:
    return blocks[:, start:start + 2].copy().view("<f2").astype(np.float32)  # [n_blocks, 1]


def _q5_codes(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """qh [n, 4], qs [n, 16] -> codes [n, 32] in 0..31."""
    low = _unpack_nibbles(qs, 32)
    high = np.unpackbits(qh, axis=-1, bitorder="little")  # bit j of the u32 -> element j
    return low | (high << 4)


def _dequant_q5_0(blocks: np.ndarray) -> np.ndarray:
    d = _f16_field(blocks, 0)
    q = _q5_codes(blocks[:, 2:6], blocks[:, 6:22]).astype(np.int8) - np.int8(16)
    return d * q.astype(np.float32)


def _dequant_q5_1(blocks: np.ndarray) -> np.ndarray:
    d, m = _f16_field(blocks, 0), _f16_field(blocks, 2)
    q = _q5_codes(blocks[:, 4:8], blocks[:, 8:24]).astype(np.float32)
    return (d * q) + m


def _k_scales_mins(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scales [n, 12] -> (sc [n, 8], mn [n, 8]): the 6-bit packing of Q4_K/Q5_K."""
    lo_sc, lo_mn, hi = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([lo_sc & 0x3F, (hi & 0x0F) | ((lo_sc >> 6) << 4)], axis=1)
    mn = np.concatenate([lo_mn & 0x3F, (hi >> 4) | ((lo_mn >> 6) << 4)], axis=1)
    return sc, mn


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """qs [n, 128] -> [n, 8, 32]: sub-block 2c is the low nibbles of qs[32c:32c+32], 2c+1 the high."""
    q = qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(-1, 8, 32)


def _dequant_qk(blocks: np.ndarray, q5: bool) -> np.ndarray:
    d, dmin = _f16_field(blocks, 0), _f16_field(blocks, 2)
    sc, mn = _k_scales_mins(blocks[:, 4:16])
    if q5:
        qh, qs = blocks[:, 16:48], blocks[:, 48:176]
        high = (qh.reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
        q = _k_nibbles(qs) | (high << 4)
    else:
        q = _k_nibbles(blocks[:, 16:144])
    ds = (d * sc.astype(np.float32))[:, :, None]
    dm = (dmin * mn.astype(np.float32))[:, :, None]
    return (ds * q.astype(np.float32) - dm).reshape(-1, 256)


def _dequant_q6_k(blocks: np.ndarray) -> np.ndarray:
    ql, qh = blocks[:, 0:128], blocks[:, 128:192]
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)
    d = _f16_field(blocks, 208)
    # element 128h + r: low 4 bits from ql[64h + r%64] >> 4*(r//64), high 2 from qh[32h + r%32] >> 2*(r//32)
    low = (ql.reshape(-1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    high = (qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    q = (low.reshape(-1, 256) | (high.reshape(-1, 256) << 4)).astype(np.int8) - np.int8(32)
    ds = (d * scales)[:, :, None]  # [n, 16, 1]
    return (ds * q.reshape(-1, 16, 16).astype(np.float32)).reshape(-1, 256)


_GGUF_DEQUANT = {
    DType.Q5_0: _dequant_q5_0,
    DType.Q5_1: _dequant_q5_1,
    DType.Q4_K: lambda b: _dequant_qk(b, q5=False),
    DType.Q5_K: lambda b: _dequant_qk(b, q5=True),
    DType.Q6_K: _dequant_q6_k,
}


# --- finiteness of encoded tensors ------------------------------------------------------------
# Byte offsets of each block's f16 fields (scales d, minimums m / dmin), in the row-major layouts
# above (csrc/common.h). Finite fields give finite weights: the codes are small integers, and
# the largest product, a Q6_K d*scale*q, is 65504*128*32 < 2^28.
_F16_FIELDS = {DType.Q8_0: (0,), DType.Q4_0: (0,), DType.Q4_0_G64: (0,), DType.Q4_0_G128: (0,),
               DType.Q4_1: (0, 2), DType.Q4_1_G64: (0, 2), DType.Q4_1_G128: (0, 2), DType.Q5_0: (0,),
               DType.Q5_1: (0, 2), DType.Q4_K: (0, 2), DType.Q5_K: (0, 2), DType.Q6_K: (208,)}


def first_nonfinite(raw, dtype: DType, shape) -> int | None:
    """Where the row-major bytes `raw` of a `dtype` tensor of `shape` hold a NaN or an infinity,
    or None: the element index for F32/F16/BF16, the block index for block types (a block whose
    f16 scale or minimum is not finite), the row index for I8 and I8_24_X16 (its f32 scale), the
    record index (16 rows x 64 columns) for Q4_0_24_X16. Vectorised, in chunks: a fraction of the
    cost of writing the tensor."""
    dtype = DType(dtype)
    if dtype.x16:
        raise ValueError(f"first_nonfinite reads row-major types; de-interleave {dtype.label} first")
    buf = np.asarray(raw).reshape(-1).view(np.uint8)
    if dtype == DType.Q4_0_24_X16:  # the record (16 rows x 64 columns) whose f16 scales hold one
        d = buf.reshape(-1, 384)[:, :32].reshape(-1, 16, 2)
        hits = np.flatnonzero(((d[:, :, 1] & 0x7C) == 0x7C).any(axis=1))
        return int(hits[0]) if hits.size else None
    if dtype in (DType.F32, DType.F16, DType.BF16, DType.I8, DType.I8_24_X16, DType.I8_BITMASK):
        rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
        if dtype in (DType.I8, DType.I8_24_X16):  # the row scales after the codes
            words, exp_mask = buf[buf.size - 4 * rows:].view("<u4"), 0x7F800000
        elif dtype == DType.I8_BITMASK:  # the row scales after the row pointers
            words, exp_mask = buf[8 * (rows + 1):12 * rows + 8].view("<u4"), 0x7F800000
        else:
            words = buf.view("<u4" if dtype == DType.F32 else "<u2")
            exp_mask = {DType.F32: 0x7F800000, DType.F16: 0x7C00, DType.BF16: 0x7F80}[dtype]
        for start in range(0, words.size, _CHUNK_ELEMS):  # all exponent bits set: an infinity or a NaN
            bad = np.flatnonzero((words[start:start + _CHUNK_ELEMS] & exp_mask) == exp_mask)
            if bad.size:
                return start + int(bad[0])
        return None
    blocks = buf.reshape(-1, dtype.block_bytes)
    bad = np.zeros(blocks.shape[0], dtype=bool)
    for offset in _F16_FIELDS[dtype]:  # little-endian: an f16's 5 exponent bits are bits 2..6 of its high byte
        bad |= (blocks[:, offset + 1] & 0x7C) == 0x7C
    hits = np.flatnonzero(bad)
    return int(hits[0]) if hits.size else None
