"""Weight quantization to the .plm tensor types (docs/format.md), vectorised with numpy.

`quantize(x, dtype)` turns a 2-D float32 tensor into the exact bytes the kernels read;
`dequantize(raw, dtype, shape)` is its inverse (up to quantization error). Q8_0, Q4_0 and
Q4_1 are byte-identical in layout to GGUF's types of the same name.

Schemes (a "group" is one block of `dtype.block_elems` elements of a row):
  Q8_0         symmetric:  d = amax/127, q = round(x/d)                       x ~ d*q
  Q4_0 family  symmetric:  v = the element of largest |x|, d = v/-8,
                           q = clamp(round(x/d) + 8, 0, 15)                  x ~ d*(q-8)
  Q4_1 family  asymmetric: m = min, d = (max-min)/15,
                           q = clamp(round((x-m)/d), 0, 15)                  x ~ d*q + m
  I8           per row:    s = amax/127 (f32), q = round(x/s)                 x ~ s*q
q is computed with the f16-rounded d and m, i.e. the values the kernels will see.
"""

from __future__ import annotations

import numpy as np

from pocketlm.dtypes import DType, tensor_nbytes

__all__ = ["quantize", "dequantize"]

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


def quantize(x: np.ndarray, dtype: DType) -> np.ndarray:
    """Quantize a 2-D [rows, cols] float tensor; returns its .plm bytes as a 1-D uint8 array."""
    dtype = DType(dtype)
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"quantize expects a 2-D [rows, cols] array, got shape {x.shape}")
    rows, cols = x.shape
    nbytes = tensor_nbytes(dtype, (rows, cols))  # also checks cols % block size
    if dtype == DType.F32:
        return np.ascontiguousarray(x, dtype="<f4").reshape(-1).view(np.uint8)
    if dtype == DType.F16:
        return np.ascontiguousarray(x.astype("<f2")).reshape(-1).view(np.uint8)

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
    nbytes = tensor_nbytes(dtype, shape)
    if buf.size != nbytes:
        raise ValueError(f"{dtype.label} tensor of shape {shape} needs {nbytes} bytes, got {buf.size}")
    cols = shape[-1]
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    if dtype == DType.F32:
        return buf.view("<f4").astype(np.float32).reshape(shape)
    if dtype == DType.F16:
        return buf.view("<f2").astype(np.float32).reshape(shape)
    if dtype == DType.I8:
        q = buf[: rows * cols].view(np.int8).reshape(rows, cols)
        s = buf[rows * cols :].view("<f4").astype(np.float32)
        return (q.astype(np.float32) * s[:, None]).reshape(shape)

    group = dtype.block_elems
    blocks = buf.reshape(-1, dtype.block_bytes)
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
