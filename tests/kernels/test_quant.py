"""pocketlm.quant: byte layout, round-trip error, GGUF compatibility."""

from __future__ import annotations

import numpy as np
import pytest

from pocketlm.dtypes import DType, tensor_nbytes
from pocketlm.quant import KEEP_ONLY, dequantize, quantize

Q4_0_FAMILY = (DType.Q4_0, DType.Q4_0_G64, DType.Q4_0_G128)
Q4_1_FAMILY = (DType.Q4_1, DType.Q4_1_G64, DType.Q4_1_G128)
QUANTIZABLE = [t for t in DType if t not in KEEP_ONLY and not t.sparse and not t.bitmask]  # test_sparse.py
# Types whose layout is GGUF's: dequantize must give gguf's values bit for bit.
GGUF_LAYOUT = [DType.Q8_0, DType.Q4_0, DType.Q4_1, DType.Q5_0, DType.Q5_1, DType.Q4_K, DType.Q5_K, DType.Q6_K,
               DType.BF16, DType.F16]


def f16_bytes(v: float) -> bytes:
    return np.array([v], dtype="<f2").tobytes()


@pytest.mark.parametrize("dtype", QUANTIZABLE, ids=lambda t: t.label)
def test_size_and_zero_groups(dtype):
    x = np.zeros((16 if dtype.x16 else 3, 256), np.float32)  # x16: whole groups of 16 rows
    x[1] = np.linspace(-2, 3, 256)
    raw = quantize(x, dtype)
    assert raw.dtype == np.uint8 and raw.size == tensor_nbytes(dtype, x.shape)
    y = dequantize(raw, dtype, x.shape)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.all(y[0] == 0) and np.all(y[2:] == 0)  # all-zero groups are exact


@pytest.mark.parametrize("dtype", QUANTIZABLE, ids=lambda t: t.label)
def test_round_trip_error(dtype):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((16, 512)) * rng.uniform(0.01, 10, (16, 1))).astype(np.float32)
    x[3, 5] = 40.0  # an outlier
    y = dequantize(quantize(x, dtype), dtype, x.shape)
    err = np.abs(y - x)
    if dtype == DType.F32:
        assert np.all(err == 0)
        return
    if dtype == DType.F16:
        assert np.all(err <= np.abs(x) * 2.0**-11)
        return
    if dtype == DType.BF16:
        assert np.all(err <= np.abs(x) * 2.0**-8)
        return
    if dtype == DType.I8:
        d = np.abs(x).max(1, keepdims=True) / 127
        assert np.all(err <= 0.5 * d * (1 + 1e-5))
        return
    g = dtype.block_elems
    xb, eb = x.reshape(-1, g), err.reshape(-1, g)
    amax = np.abs(xb).max(1, keepdims=True)
    if dtype == DType.Q8_0:  # half a step, plus the f16 rounding of d over up to 127 steps
        bound = amax / 127 * (0.5 + 127 * 2.0**-11)
    elif dtype in Q4_0_FAMILY:  # the +max side may clamp at 7 (one full step)
        bound = amax / 8 * (1.0 + 8 * 2.0**-11)
    elif dtype == DType.Q5_0:  # same scheme with 16 levels a side
        bound = amax / 16 * (1.0 + 16 * 2.0**-11)
    elif dtype == DType.Q5_1:
        lo, hi = xb.min(1, keepdims=True), xb.max(1, keepdims=True)
        d = (hi - lo) / 31
        bound = d * (0.5 + 31 * 2.0**-11) + np.abs(lo) * 2.0**-11 + d * 0.51 * (np.abs(lo) * 2.0**-11 > 0)
    else:
        lo, hi = xb.min(1, keepdims=True), xb.max(1, keepdims=True)
        d = (hi - lo) / 15
        bound = d * (0.5 + 15 * 2.0**-11) + np.abs(lo) * 2.0**-11 + d * 0.51 * (np.abs(lo) * 2.0**-11 > 0)
    assert np.all(eb <= bound * (1 + 1e-5) + 1e-7)


def test_q8_0_layout():
    # one block: d = 0.5, q = -16..15
    q = np.arange(-16, 16, dtype=np.int8)
    raw = np.frombuffer(f16_bytes(0.5) + q.tobytes(), np.uint8)
    np.testing.assert_array_equal(dequantize(raw, DType.Q8_0, (1, 32)), 0.5 * q[None].astype(np.float32))
    # quantize writes d = f16(amax/127) and q = round(x/d) with that f16 d
    x = 0.5 * q[None].astype(np.float32)
    out = quantize(x, DType.Q8_0)
    d = np.float16(8.0 / 127)
    assert out[:2].tobytes() == d.tobytes()
    np.testing.assert_array_equal(out[2:].view(np.int8), np.rint(x[0] / np.float32(d)).astype(np.int8))


def test_q4_0_layout():
    q = np.arange(32) % 16  # element j -> q[j]
    qs = (q[:16] | (q[16:] << 4)).astype(np.uint8)  # low nibble j, high nibble j+16
    raw = np.frombuffer(f16_bytes(-0.25) + qs.tobytes(), np.uint8)
    expect = (-0.25 * (q - 8)).astype(np.float32)
    np.testing.assert_array_equal(dequantize(raw, DType.Q4_0, (1, 32))[0], expect)
    back = quantize(expect[None], DType.Q4_0)
    np.testing.assert_array_equal(dequantize(back, DType.Q4_0, (1, 32))[0], expect)


def test_q4_1_layout():
    q = (np.arange(32) * 7) % 16
    qs = (q[:16] | (q[16:] << 4)).astype(np.uint8)
    raw = np.frombuffer(f16_bytes(0.125) + f16_bytes(-1.0) + qs.tobytes(), np.uint8)
    expect = (0.125 * q - 1.0).astype(np.float32)
    np.testing.assert_array_equal(dequantize(raw, DType.Q4_1, (1, 32))[0], expect)


def test_q4_g64_layout():
    q = np.arange(64) % 16
    runs = q.reshape(2, 32)
    qs = np.concatenate([(r[:16] | (r[16:] << 4)) for r in runs]).astype(np.uint8)
    raw = np.frombuffer(f16_bytes(2.0) + qs.tobytes(), np.uint8)
    np.testing.assert_array_equal(dequantize(raw, DType.Q4_0_G64, (1, 64))[0], 2.0 * (q - 8))
    raw1 = np.frombuffer(f16_bytes(2.0) + f16_bytes(0.5) + qs.tobytes(), np.uint8)
    np.testing.assert_array_equal(dequantize(raw1, DType.Q4_1_G64, (1, 64))[0], 2.0 * q + 0.5)


def test_i8_layout():
    q = np.array([[1, -2, 3], [-127, 0, 127]], np.int8)
    s = np.array([0.5, 2.0], "<f4")
    raw = np.frombuffer(q.tobytes() + s.tobytes(), np.uint8)
    np.testing.assert_array_equal(dequantize(raw, DType.I8, (2, 3)), q * s[:, None])


@pytest.mark.parametrize("dtype", [DType.Q8_0, DType.Q4_0, DType.Q4_1, DType.Q5_0, DType.Q5_1, DType.BF16],
                         ids=lambda t: t.label)
def test_matches_gguf_dequantizer(dtype):
    gguf = pytest.importorskip("gguf")
    from gguf import quants

    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 256)).astype(np.float32)
    x[0, :32] = 0  # zero block
    raw = quantize(x, dtype)
    theirs = quants.dequantize(raw.reshape(8, -1), gguf.GGMLQuantizationType[dtype.name])
    np.testing.assert_array_equal(dequantize(raw, dtype, x.shape), theirs)


def _random_gguf_bytes(dtype: DType, rows: int, cols: int, rng) -> np.ndarray:
    """Any bytes at all: NaN, inf and subnormal scales included (their bits must match too)."""
    return rng.integers(0, 256, size=tensor_nbytes(dtype, (rows, cols)), dtype=np.uint8)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # inf * 0 and NaN scales, on purpose
@pytest.mark.parametrize("dtype", GGUF_LAYOUT, ids=lambda t: t.label)
def test_random_blocks_bit_identical_to_gguf(dtype):
    """Every bit pattern decodes to gguf's float32 bits: numpy (pocketlm.quant) and the C++
    dequant_row of every kernel variant (used for the embedding gather)."""
    gguf = pytest.importorskip("gguf")
    from gguf import quants

    from kernelutil import kernels

    rng = np.random.default_rng(int(dtype) + 40)
    rows, cols = 24, 768
    raw = _random_gguf_bytes(dtype, rows, cols, rng)
    theirs = quants.dequantize(raw.reshape(rows, -1), gguf.GGMLQuantizationType[dtype.name]).astype(np.float32)
    ours = dequantize(raw, dtype, (rows, cols))
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))
    row_bytes = raw.size // rows
    for v in kernels.available():
        for r in (0, 5, rows - 1):
            got = kernels.dequant_row(int(dtype), raw[r * row_bytes:(r + 1) * row_bytes], cols, v)
            np.testing.assert_array_equal(got.view(np.uint32), theirs[r].view(np.uint32), err_msg=f"{v} row {r}")


def test_kquant_layout_by_hand():
    """One Q4_K, Q5_K and Q6_K block built element by element from the layout in csrc/common.h."""
    rng = np.random.default_rng(9)
    sc, mn = rng.integers(0, 64, 8), rng.integers(0, 64, 8)
    scales = np.zeros(12, np.uint8)
    scales[0:4] = (sc[:4] & 63) | ((sc[4:] >> 4) << 6)
    scales[4:8] = (mn[:4] & 63) | ((mn[4:] >> 4) << 6)
    scales[8:12] = (sc[4:] & 15) | ((mn[4:] & 15) << 4)
    q = rng.integers(0, 32, 256)  # element 32s + j
    qs = np.zeros(128, np.uint8)
    qh = np.zeros(32, np.uint8)
    for s in range(8):
        for j in range(32):
            v = q[32 * s + j]
            qs[32 * (s // 2) + j] |= (v & 15) << (4 * (s % 2))
            qh[j] |= (v >> 4) << s
    d, dmin = np.float16(0.01), np.float16(0.02)
    expect5 = np.array([np.float32(d) * np.float32(sc[e // 32]) * np.float32(q[e])
                        - np.float32(dmin) * np.float32(mn[e // 32]) for e in range(256)], np.float32)
    raw5 = np.frombuffer(f16_bytes(d) + f16_bytes(dmin) + scales.tobytes() + qh.tobytes() + qs.tobytes(), np.uint8)
    np.testing.assert_array_equal(dequantize(raw5, DType.Q5_K, (1, 256))[0], expect5)
    q4 = q & 15
    qs4 = np.zeros(128, np.uint8)
    for s in range(8):
        qs4[32 * (s // 2):32 * (s // 2) + 32] |= (q4[32 * s:32 * s + 32] << (4 * (s % 2))).astype(np.uint8)
    expect4 = np.array([np.float32(d) * np.float32(sc[e // 32]) * np.float32(q4[e])
                        - np.float32(dmin) * np.float32(mn[e // 32]) for e in range(256)], np.float32)
    raw4 = np.frombuffer(f16_bytes(d) + f16_bytes(dmin) + scales.tobytes() + qs4.tobytes(), np.uint8)
    np.testing.assert_array_equal(dequantize(raw4, DType.Q4_K, (1, 256))[0], expect4)

    q6 = rng.integers(0, 64, 256)
    sc6 = rng.integers(-128, 128, 16).astype(np.int8)
    ql, qh6 = np.zeros(128, np.uint8), np.zeros(64, np.uint8)
    for e in range(256):
        h, r = divmod(e, 128)
        ql[64 * h + r % 64] |= (q6[e] & 15) << (4 * (r // 64))
        qh6[32 * h + r % 32] |= (q6[e] >> 4) << (2 * (r // 32))
    expect6 = np.array([np.float32(d) * np.float32(sc6[e // 16]) * np.float32(q6[e] - 32) for e in range(256)],
                       np.float32)
    raw6 = np.frombuffer(ql.tobytes() + qh6.tobytes() + sc6.tobytes() + f16_bytes(d), np.uint8)
    np.testing.assert_array_equal(dequantize(raw6, DType.Q6_K, (1, 256))[0], expect6)


@pytest.mark.parametrize("dtype", KEEP_ONLY, ids=lambda t: t.label)
def test_kquants_are_not_produced(dtype):
    with pytest.raises(ValueError, match="only copied"):
        quantize(np.zeros((2, 256), np.float32), dtype)


def test_bad_shapes():
    with pytest.raises(ValueError):
        quantize(np.zeros((2, 48), np.float32), DType.Q4_0)
    with pytest.raises(ValueError):
        dequantize(np.zeros(10, np.uint8), DType.Q4_0, (1, 32))
