"""pocketlm.quant: byte layout, round-trip error, GGUF compatibility."""

from __future__ import annotations

import numpy as np
import pytest

from pocketlm.dtypes import DType, tensor_nbytes
from pocketlm.quant import dequantize, quantize

Q4_0_FAMILY = (DType.Q4_0, DType.Q4_0_G64, DType.Q4_0_G128)
Q4_1_FAMILY = (DType.Q4_1, DType.Q4_1_G64, DType.Q4_1_G128)


def f16_bytes(v: float) -> bytes:
    return np.array([v], dtype="<f2").tobytes()


@pytest.mark.parametrize("dtype", list(DType))
def test_size_and_zero_groups(dtype):
    x = np.zeros((3, 256), np.float32)
    x[1] = np.linspace(-2, 3, 256)
    raw = quantize(x, dtype)
    assert raw.dtype == np.uint8 and raw.size == tensor_nbytes(dtype, x.shape)
    y = dequantize(raw, dtype, x.shape)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.all(y[0] == 0) and np.all(y[2] == 0)  # all-zero groups are exact


@pytest.mark.parametrize("dtype", list(DType))
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


@pytest.mark.parametrize("dtype", [DType.Q8_0, DType.Q4_0, DType.Q4_1])
def test_matches_gguf_dequantizer(dtype):
    gguf = pytest.importorskip("gguf")
    from gguf import quants

    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 256)).astype(np.float32)
    x[0, :32] = 0  # zero block
    raw = quantize(x, dtype)
    theirs = quants.dequantize(raw.reshape(8, -1), gguf.GGMLQuantizationType[dtype.name])
    np.testing.assert_array_equal(dequantize(raw, dtype, x.shape), theirs)


def test_bad_shapes():
    with pytest.raises(ValueError):
        quantize(np.zeros((2, 48), np.float32), DType.Q4_0)
    with pytest.raises(ValueError):
        dequantize(np.zeros(10, np.uint8), DType.Q4_0, (1, 32))
