"""Two-level activations (BlockQ8A2: x ~= d*q + d2*q2) and matmul2.

quantize_act2 must be bit-identical across variants and to the numpy emulation;
matmul2 is checked like matmul (ref vs numpy emulation of the exact arithmetic,
every SIMD variant vs ref), plus its accuracy gain over the int8 path.
"""

from __future__ import annotations

import numpy as np
import pytest
from kernelutil import (
    check_row_ranges,
    kernels,
    make_matmul_case,
    matmul_shapes_for,
    quantize_act2_np,
    simd_variants,
    variants,
)

from pocketlm.dtypes import DType
from pocketlm.quant import dequantize, quantize


def activations(seed=5, nblocks=48):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(32 * nblocks) * 3).astype(np.float32)
    x[:32] = 0  # zero block: d = d2 = 0
    x[32:64] = np.arange(32) - 15.5  # many exact .5 ties after scaling
    x[64] = 127.0
    x[96:128] = 127.0  # d = 1, q = 127: zero residual, d2 = 0
    x[128:160] *= 1e-3
    x[140] = 32 * np.mean(np.abs(x[128:160]))  # one outlier (max/mean ~ 32, as in ffn_down inputs)
    x[160:192] = rng.standard_normal(32).astype(np.float32) * 1e-30  # tiny (subnormal-range) codes
    x[192:224] = np.float32(1e30) * np.sign(rng.standard_normal(32)).astype(np.float32)
    for b in range(8, nblocks, 3):  # scattered outliers
        x[32 * b + (b % 32)] *= 40
    return x


def test_struct_fields_match_emulation():
    x = activations()
    want = quantize_act2_np(x)
    for v in variants():
        got = kernels.quantize_act2(v, x)
        assert len(got) == 6
        for name, g, w in zip(("d", "s", "d2", "s2", "q", "q2"), got, want):
            np.testing.assert_array_equal(g, w, err_msg=f"{v}: {name}")


def test_first_level_is_quantize_act():
    x = activations(7)
    for v in variants():
        d, s, _, _, q, _ = kernels.quantize_act2(v, x)
        d1, s1, q1 = kernels.quantize_act(v, x)
        np.testing.assert_array_equal(d, d1)
        np.testing.assert_array_equal(s, s1)
        np.testing.assert_array_equal(q, q1)


@pytest.mark.parametrize("seed", range(6))
def test_bit_identical_across_variants(seed):
    rng = np.random.default_rng(100 + seed)
    x = (rng.standard_normal(32 * 200) * rng.uniform(1e-3, 1e3)).astype(np.float32)
    heavy = rng.random(x.size) < 0.02
    x[heavy] *= rng.uniform(10, 100, heavy.sum()).astype(np.float32)
    want = kernels.quantize_act2("ref", x)
    emul = quantize_act2_np(x)
    for a, b in zip(want, emul):
        np.testing.assert_array_equal(a, b)
    for v in simd_variants():
        for a, b in zip(kernels.quantize_act2(v, x), want):
            np.testing.assert_array_equal(a, b, err_msg=v)


def test_reconstruction_error():
    x = np.concatenate([activations(s) for s in range(4)])
    d, _, d2, _, q, q2 = kernels.quantize_act2("ref", x)
    xb = x.reshape(-1, 32).astype(np.float64)
    rec = d[:, None].astype(np.float64) * q + d2[:, None].astype(np.float64) * q2
    err = np.abs(rec - xb)
    amax = np.abs(xb).max(1, keepdims=True)
    np.testing.assert_array_equal(d2, d / 256)  # exactly: a power of two
    assert np.all(err <= amax / 127 / 256 * 1.01)  # at most one step of the second level
    # half a step, but where the residual (at most d/2 = 128 steps) was clamped to 127 steps
    r = xb - d[:, None].astype(np.float64) * q
    unclamped = np.abs(r) <= 127.5 * d2[:, None]
    assert unclamped.mean() > 0.99
    assert np.all(err[unclamped] <= (d2[:, None] / 2 * (1 + 1e-6) + 1e-45).repeat(32, 1)[unclamped])
    # far below int8's error: |x - d*q| reaches ~d/2
    err1 = np.abs(d[:, None].astype(np.float64) * q - xb)
    scale = np.maximum(amax, 1e-300)  # relative to each block's scale
    assert (err / scale).max() < (err1 / scale).max() / 100


@pytest.mark.parametrize("dtype", list(DType), ids=lambda t: t.label)
def test_ref_matches_numpy(dtype):
    for i, (T, K, N) in enumerate(matmul_shapes_for(dtype)):
        raw, wd, x = make_matmul_case(dtype, T, K, N, i)
        y = kernels.matmul2("ref", int(dtype), raw, N, K, x)
        assert y.shape == (T, N) and y.dtype == np.float32
        if not dtype.quantized:  # float weights: matmul2 is matmul
            np.testing.assert_array_equal(y, kernels.matmul("ref", int(dtype), raw, N, K, x))
            continue
        d, _, d2, _, q, q2 = quantize_act2_np(x)
        xd = (q * d[..., None].astype(np.float64) + q2 * d2[..., None].astype(np.float64)).reshape(T, K)
        wd64 = wd.astype(np.float64)
        # 1) exact two-level arithmetic, up to float summation order
        scale = np.abs(xd) @ np.abs(wd64).T
        emul = xd @ wd64.T
        assert np.all(np.abs(y - emul) <= 1e-5 * scale + 1e-30), (T, K, N)


@pytest.mark.parametrize("variant", variants())
@pytest.mark.parametrize("dtype", [t for t in DType if t.quantized], ids=lambda t: t.label)
def test_vs_float(variant, dtype):
    # vs full-precision activations: the activation error is at most amax/127/254 per
    # element (the int8 path's bound is amax/127/2: 127x looser)
    for i, (T, K, N) in enumerate(matmul_shapes_for(dtype)):
        raw, wd, x = make_matmul_case(dtype, T, K, N, 200 + i)
        y = kernels.matmul2(variant, int(dtype), raw, N, K, x).astype(np.float64)
        x64, wd64 = x.astype(np.float64), wd.astype(np.float64)
        exact = x64 @ wd64.T
        scale = np.abs(x64) @ np.abs(wd64).T
        amax = np.abs(x64.reshape(T, -1, 32)).max(-1)
        step1 = np.repeat(amax / 127 / 2, 32, axis=-1)  # int8 path, per element
        bound1 = step1 @ np.abs(wd64).T
        bound2 = (step1 / 127 * 1.01) @ np.abs(wd64).T + 1e-5 * scale
        assert np.all(np.abs(y - exact) <= bound2), (variant, T, K, N)
        # and it is actually ~100x tighter than the int8 bound
        assert np.all(bound2 <= bound1 / 20), (T, K, N)


@pytest.mark.parametrize("variant", simd_variants())
@pytest.mark.parametrize("dtype", list(DType), ids=lambda t: t.label)
def test_variant_matches_ref(variant, dtype):
    for i, (T, K, N) in enumerate(matmul_shapes_for(dtype)):
        raw, wd, x = make_matmul_case(dtype, T, K, N, 100 + i)
        want = kernels.matmul2("ref", int(dtype), raw, N, K, x)
        got = kernels.matmul2(variant, int(dtype), raw, N, K, x)
        scale = np.abs(x) @ np.abs(wd).T
        assert np.all(np.abs(got - want) <= 1e-5 * scale + 1e-30), (variant, dtype.label, T, K, N)

@pytest.mark.parametrize("variant", simd_variants())
@pytest.mark.parametrize("dtype", [t for t in DType if t.quantized], ids=lambda t: t.label)
def test_row_range_matches_ref(variant, dtype):
    """Part of the output columns, as one thread computes them, in every token-count regime."""
    check_row_ranges("matmul2", variant, dtype)


@pytest.mark.parametrize("variant", variants())
@pytest.mark.parametrize("dtype", [DType.Q4_0, DType.Q4_1, DType.Q8_0, DType.I8], ids=lambda t: t.label)
def test_outlier_blocks(variant, dtype):
    # one huge value per block (max/mean ~ 32): int8 rounds the rest to ~0, matmul2 does not
    rng = np.random.default_rng(11)
    T, K, N = 3, 896, 37
    x = rng.standard_normal((T, K)).astype(np.float32) * 0.05
    xb = x.reshape(T, -1, 32)
    xb[:, :, 7] = 32 * np.abs(xb).mean(-1) * 32
    w = rng.standard_normal((N, K)).astype(np.float32)
    raw = quantize(w, dtype)
    wd = dequantize(raw, dtype, (N, K)).astype(np.float64)
    exact = x.astype(np.float64) @ wd.T
    e1 = np.abs(kernels.matmul(variant, int(dtype), raw, N, K, x) - exact).max()
    e2 = np.abs(kernels.matmul2(variant, int(dtype), raw, N, K, x) - exact).max()
    assert e2 < e1 / 30, (e1, e2)


def test_i8_extreme_weights():
    N, K = 5, 96
    q = np.full((N, K), -128, np.int8)
    q[1] = 127
    raw = np.frombuffer(q.tobytes() + np.ones(N, "<f4").tobytes(), np.uint8)
    x = np.full((2, K), -1.0, np.float32)
    x[1, ::7] = 0.37
    want = kernels.matmul2("ref", int(DType.I8), raw, N, K, x)
    assert want[0, 0] == 128 * K
    for v in simd_variants():
        np.testing.assert_array_equal(kernels.matmul2(v, int(DType.I8), raw, N, K, x), want)
    # The prefill GEMMs (from 4 tokens on) sum in another order: equal up to float rounding
    x = np.tile(x, (9, 1))
    want = kernels.matmul2("ref", int(DType.I8), raw, N, K, x)
    for v in simd_variants():
        np.testing.assert_allclose(kernels.matmul2(v, int(DType.I8), raw, N, K, x), want, rtol=1e-5, err_msg=v)


def test_argument_validation():
    raw = quantize(np.ones((3, 64), np.float32), DType.Q4_0)
    x = np.ones((2, 64), np.float32)
    with pytest.raises(ValueError):
        kernels.matmul2("ref", int(DType.Q4_0), raw[:-1], 3, 64, x)  # too few bytes
    with pytest.raises(ValueError):
        kernels.matmul2("ref", int(DType.Q4_0), raw, 3, 64, np.ones((2, 32), np.float32))
    with pytest.raises(ValueError):
        kernels.matmul2("ref", int(DType.Q4_0), raw, 3, 64, np.ones((0, 64), np.float32))
    with pytest.raises(ValueError):
        kernels.matmul2("ref", 99, raw, 3, 64, x)
    with pytest.raises(ValueError):
        kernels.matmul2("nope", int(DType.Q4_0), raw, 3, 64, x)
    with pytest.raises(ValueError):
        kernels.quantize_act2("ref", np.ones(33, np.float32))
    with pytest.raises(ValueError):
        kernels.quantize_act2("ref", np.ones(0, np.float32))
