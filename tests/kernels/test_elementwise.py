"""dot, axpy, scale, add, rms_norm, silu_mul, weighted_sum, dequant_row: every variant vs the reference / numpy."""

from __future__ import annotations

import numpy as np
import pytest
from kernelutil import kernels, random_blocks, variants

from pocketlm.dtypes import DType
from pocketlm.quant import KEEP_ONLY, dequantize, quantize

SIZES = [1, 7, 16, 33, 100, 896, 4865]


def vecs(n, seed):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) * 4).astype(np.float32), rng.standard_normal(n).astype(np.float32)


@pytest.mark.parametrize("variant", variants())
def test_elementwise(variant):
    for n in SIZES:
        a, b = vecs(n, n)
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        scale = np.abs(a64) @ np.abs(b64)
        assert abs(kernels.dot(variant, a, b) - a64 @ b64) <= 1e-5 * scale
        np.testing.assert_allclose(kernels.axpy(variant, 0.75, a, b), b + np.float32(0.75) * a, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(kernels.scale(variant, -1.5, a), a * np.float32(-1.5), rtol=1e-7)
        np.testing.assert_array_equal(kernels.add(variant, a, b), a + b)
        rms = 1.0 / np.sqrt(np.mean(a64 * a64) + 1e-6)
        np.testing.assert_allclose(kernels.rms_norm(variant, a, b, 1e-6), a64 * rms * b64, rtol=2e-6, atol=1e-7)
        silu = a64 / (1 + np.exp(-a64)) * b64
        np.testing.assert_allclose(kernels.silu_mul(variant, a, b), silu, rtol=2e-6, atol=1e-30)


@pytest.mark.parametrize("variant", variants())
def test_weighted_sum(variant):
    """Attention's P.V: out + w @ rows, for group sizes around the AVX-512 block of 6 weight rows
    and head sizes around its 64-float slices."""
    rng = np.random.default_rng(11)
    for G, n, dh in [(1, 1, 1), (3, 5, 64), (6, 17, 64), (7, 33, 128), (14, 9, 80), (2, 100, 16), (13, 3, 7)]:
        w = rng.random((G, n), dtype=np.float32)
        rows = rng.standard_normal((n, dh)).astype(np.float32)
        out = rng.standard_normal((G, dh)).astype(np.float32)
        got = kernels.weighted_sum(variant, w, rows, out)
        want = out.astype(np.float64) + w.astype(np.float64) @ rows.astype(np.float64)
        scale = np.abs(out) + np.abs(w) @ np.abs(rows)
        assert np.all(np.abs(got - want) <= 1e-6 * scale), (variant, G, n, dh)


@pytest.mark.parametrize("variant", variants())
def test_silu_extremes(variant):
    g = np.array([-200, -100, -88.5, -87.5, -20, -1e-8, 0, 1e-8, 20, 87.5, 88.5, 100, 200] * 2, np.float32)
    u = np.ones_like(g)
    want = kernels.silu_mul("ref", g, u)
    got = kernels.silu_mul(variant, g, u)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-30 if variant == "ref" else 1e-35)


@pytest.mark.parametrize("variant", variants())
@pytest.mark.parametrize("dtype", [t for t in DType if not t.x16 and not t.sparse and not t.bitmask],
                         ids=lambda t: t.label)
def test_dequant_row(variant, dtype):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((2, 256)).astype(np.float32)
    raw = random_blocks(dtype, 2, 256, rng) if dtype in KEEP_ONLY else quantize(w, dtype)
    row_bytes = (raw.size - (8 if dtype == DType.I8 else 0)) // 2
    got = kernels.dequant_row(int(dtype), raw[row_bytes:], 256, variant)
    want = dequantize(raw, dtype, w.shape)[1]
    if dtype == DType.I8:  # dequant_row leaves the row scale to the caller
        want = want / raw[-4:].view("<f4")[0]
        np.testing.assert_allclose(got, want, rtol=1e-6)
    else:
        np.testing.assert_array_equal(got, want)


def test_length_mismatch():
    with pytest.raises(ValueError):
        kernels.add("ref", np.ones(3, np.float32), np.ones(4, np.float32))
    with pytest.raises(ValueError):
        kernels.rms_norm("ref", np.ones(3, np.float32), np.ones(4, np.float32), 1e-6)


def test_dispatch():
    avail = kernels.available()
    assert avail[0] == "ref"
    assert kernels.best() in avail


@pytest.mark.parametrize("dtype", [t for t in DType if t.x16 or t.sparse or t.bitmask], ids=lambda t: t.label)
def test_dequant_row_refuses_x16(dtype):
    """x16, 2:4 and bitmask matrices have no row-major rows to point at (the executor gathers
    them, tested end to end through tied embeddings)."""
    w = np.ones((16, 128), np.float32)
    if dtype.sparse or dtype.bitmask:
        w[:, 1::2] = 0  # 2:4
    raw = quantize(w, dtype)
    with pytest.raises(ValueError, match="x16"):
        kernels.dequant_row(int(dtype), raw, 128, "ref")


@pytest.mark.parametrize("variant", variants())
def test_softmax_steps(variant):
    """Attention's softmax: max, then exp((s - max) * scale) and its sum, against numpy in float64,
    for lengths around the SIMD widths, scales of real heads and scores far below the max."""
    rng = np.random.default_rng(5)
    for n in [0, 1, 7, 8, 15, 16, 17, 100, 4865]:
        for spread in (1.0, 30.0):
            s = (rng.standard_normal(n) * spread).astype(np.float32)
            m = kernels.max(variant, s)
            assert m == (s.max() if n else -np.inf)
            for scale in (0.125, 1.0):
                got, total = kernels.exp_sum(variant, s, m, scale)
                arg = (s - np.float32(m)) * np.float32(scale)  # in float32, as the kernels compute it
                want = np.exp(arg.astype(np.float64))
                np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-38)
                assert abs(total - want.sum()) <= 1e-5 * max(want.sum(), 1e-30), (variant, n, spread, scale)
    far = np.array([0.0, -50.0, -87.0, -90.0, -200.0, -1e4] * 3, np.float32)  # exponents near and past underflow
    got, total = kernels.exp_sum(variant, far, 0.0, 1.0)
    np.testing.assert_allclose(got, np.exp(far.astype(np.float64)), rtol=2e-6, atol=2e-38)
    assert total == pytest.approx(3.0, rel=1e-6)


@pytest.mark.parametrize("variant", variants())
def test_f16_kv_helpers(variant):
    """to_f16 rounds as numpy's float16 (to nearest even, subnormals, overflow to inf);
    weighted_sum_f16 is weighted_sum over the half values."""
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal(1000) * 10.0 ** rng.integers(-9, 6, 1000),
                        [0.0, -0.0, 65504.0, 65520.0, 1e6, -1e6, 6e-8, 3e-8, 2.9e-8, 1e-9, np.inf, -np.inf]])
    x = x.astype(np.float32)
    for n in (len(x), 7, 16, 17):
        got = kernels.to_f16(variant, x[:n])
        with np.errstate(over="ignore"):  # 65520 and 1e6 round to inf, as they should
            want = x[:n].astype(np.float16)
        np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    for G, n, dh in [(1, 1, 1), (3, 5, 64), (7, 33, 128), (6, 17, 64), (2, 9, 13)]:
        w = rng.random((G, n), dtype=np.float32)
        rows = rng.standard_normal((n, dh)).astype(np.float16)
        out = rng.standard_normal((G, dh)).astype(np.float32)
        got = kernels.weighted_sum_f16(variant, w, rows.view(np.uint16), out)
        want = out.astype(np.float64) + w.astype(np.float64) @ rows.astype(np.float64)
        scale = np.abs(out) + np.abs(w) @ np.abs(rows.astype(np.float32))
        assert np.all(np.abs(got - want) <= 1e-6 * scale), (variant, G, n, dh)


@pytest.mark.parametrize("variant", variants())
def test_q8_0_kv_helpers(variant):
    """The Q8_0 KV cache's attention kernels against float64 numpy over the dequantized rows (pocketlm.quant's
    Q8_0, the layout the cache stores): scores for a range of positions, and P.V."""
    rng = np.random.default_rng(4)
    for G, n, dh in [(1, 1, 32), (3, 5, 64), (7, 33, 128), (6, 17, 64), (2, 9, 96), (14, 70, 64), (1, 3, 256),
                     (2, 5, 288)]:
        x = (rng.standard_normal((n, dh)) * rng.choice([0.01, 1.0, 30.0], (n, 1))).astype(np.float32)
        x[0, :32] = 0.0  # an all-zero block
        rows = quantize(x, DType.Q8_0).reshape(n, dh // 32 * 34)
        deq = dequantize(rows.reshape(-1), DType.Q8_0, (n, dh)).astype(np.float64)
        q = rng.standard_normal((G, dh)).astype(np.float32)
        p0, p1 = n // 3, n
        got = kernels.scores_q8_0(variant, rows, q, p0, p1)
        want = q.astype(np.float64) @ deq.T
        scale = np.abs(q.astype(np.float64)) @ np.abs(deq.T)
        assert np.all(got[:, :p0] == 0), variant
        assert np.all(np.abs(got[:, p0:p1] - want[:, p0:p1]) <= 1e-5 * scale[:, p0:p1] + 1e-30), (variant, G, n, dh)
        w = rng.random((G, n), dtype=np.float32)
        out = rng.standard_normal((G, dh)).astype(np.float32)
        got = kernels.weighted_sum_q8_0(variant, w, rows, out)
        want = out.astype(np.float64) + w.astype(np.float64) @ deq
        scale = np.abs(out) + np.abs(w.astype(np.float64)) @ np.abs(deq)
        assert np.all(np.abs(got - want) <= 1e-6 * scale + 1e-30), (variant, G, n, dh)
