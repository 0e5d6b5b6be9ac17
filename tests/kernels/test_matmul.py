"""Matmul: the scalar reference against numpy, then every SIMD variant against the reference.

Tolerances are relative to S = sum_k |W[n,k]| |x[t,k]| (per output), so they bound
float-summation-order effects independently of cancellation.
"""

from __future__ import annotations

import numpy as np
import pytest
from kernelutil import (
    check_row_ranges,
    FLOAT_MATMUL_SHAPES,
    MATMUL_SHAPES,
    REMOTE,
    kernels,
    make_matmul_case,
    matmul_shapes_for,
    quantize_act_np,
    simd_variants,
)

from pocketlm.dtypes import DType
from pocketlm.quant import quantize

SHAPES = MATMUL_SHAPES
FLOAT_SHAPES = FLOAT_MATMUL_SHAPES
make = make_matmul_case
shapes_for = matmul_shapes_for


@pytest.mark.parametrize("dtype", list(DType), ids=lambda t: t.label)
def test_ref_matches_numpy(dtype):
    for i, (T, K, N) in enumerate(shapes_for(dtype)):
        raw, wd, x = make(dtype, T, K, N, i)
        y = kernels.matmul("ref", int(dtype), raw, N, K, x)
        assert y.shape == (T, N) and y.dtype == np.float32
        if not dtype.quantized:
            scale = np.abs(x) @ np.abs(wd).T
            assert np.all(np.abs(y - x @ wd.T) <= 1e-5 * scale + 1e-30), (T, K, N)
            continue
        d, s, q = quantize_act_np(x)
        xd = (q.astype(np.float32) * d[..., None]).reshape(T, K)
        # 1) exact quantized arithmetic, up to float summation order
        scale = np.abs(xd).astype(np.float64) @ np.abs(wd).T.astype(np.float64)
        emul = xd.astype(np.float64) @ wd.T.astype(np.float64)
        assert np.all(np.abs(y - emul) <= 1e-5 * scale + 1e-30), (T, K, N)
        # 2) vs full-precision activations: the only extra error is activation rounding,
        #    at most d/2 per element of each 32-block
        step = np.repeat(d / 2, 32, axis=-1).reshape(T, K)
        bound = step @ np.abs(wd).T + 1e-5 * scale
        assert np.all(np.abs(y - x @ wd.T) <= bound * 1.001 + 1e-6), (T, K, N)


@pytest.mark.parametrize("variant", simd_variants())
@pytest.mark.parametrize("dtype", list(DType), ids=lambda t: t.label)
def test_variant_matches_ref(variant, dtype):
    for i, (T, K, N) in enumerate(shapes_for(dtype)):
        raw, wd, x = make(dtype, T, K, N, 100 + i)
        want = kernels.matmul("ref", int(dtype), raw, N, K, x)
        got = kernels.matmul(variant, int(dtype), raw, N, K, x)
        scale = np.abs(x) @ np.abs(wd).T
        assert np.all(np.abs(got - want) <= 1e-5 * scale + 1e-30), (variant, dtype.label, T, K, N)

@pytest.mark.parametrize("variant", simd_variants())
@pytest.mark.parametrize("dtype", [t for t in DType if t.quantized], ids=lambda t: t.label)
def test_row_range_matches_ref(variant, dtype):
    """Part of the output columns, as one thread computes them, in every token-count regime."""
    check_row_ranges("matmul", variant, dtype)


def test_activation_quantization_matches_emulation():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(32 * 40) * 3).astype(np.float32)
    x[:32] = 0
    x[32:64] = np.arange(32) - 15.5  # many exact .5 ties after scaling
    x[64] = 127.0
    d0, s0, q0 = quantize_act_np(x)
    for v in ["ref", *simd_variants()]:
        d, s, q = kernels.quantize_act(v, x)
        np.testing.assert_array_equal(d, d0)
        np.testing.assert_array_equal(q, q0)
        np.testing.assert_array_equal(s, s0)


def test_i8_extreme_weights():
    # -128 never comes out of quantize, but a file may hold it: every variant must agree
    N, K = 5, 96
    q = np.full((N, K), -128, np.int8)
    q[1] = 127
    raw = np.frombuffer(q.tobytes() + np.ones(N, "<f4").tobytes(), np.uint8)
    # Q8_0 blocks of the same codes with d = 1
    q8 = np.concatenate([np.full((N * K // 32, 1), 1.0, "<f2").view(np.uint8),
                         q.reshape(-1, 32).view(np.uint8)], axis=1).reshape(-1)
    for T in (2, 5, 17):  # the per-row tiles, and the prefill GEMMs from 4 tokens on
        x = np.full((T, K), -1.0, np.float32)
        for dtype, data in ((DType.I8, raw), (DType.Q8_0, q8)):
            want = kernels.matmul("ref", int(dtype), data, N, K, x)
            assert want[0, 0] == 128 * K and want[0, 1] == -127 * K
            for v in simd_variants():
                np.testing.assert_array_equal(kernels.matmul(v, int(dtype), data, N, K, x), want, err_msg=(v, T))


def test_argument_validation():
    raw = quantize(np.ones((3, 64), np.float32), DType.Q4_0)
    x = np.ones((2, 64), np.float32)
    with pytest.raises(ValueError):
        kernels.matmul("ref", int(DType.Q4_0), raw[:-1], 3, 64, x)  # too few bytes
    with pytest.raises(ValueError):
        kernels.matmul("ref", int(DType.Q4_0), raw, 3, 64, np.ones((2, 32), np.float32))
    with pytest.raises(ValueError):
        kernels.matmul("ref", 99, raw, 3, 64, x)
    with pytest.raises(ValueError):
        kernels.matmul("nope", int(DType.Q4_0), raw, 3, 64, x)
    with pytest.raises(ValueError):
        kernels.quantize_act("ref", np.ones(33, np.float32))
    with pytest.raises(ValueError):
        kernels.dequant_row(int(DType.Q8_0), raw[:10], 64)


@pytest.mark.parametrize("variant", [*simd_variants(), "ref"])
@pytest.mark.parametrize("dtype", [t for t in DType if t.x16], ids=lambda t: t.label)
def test_x16_matches_row_major_base(variant, dtype):
    """An x16 matrix gives the products of the same weights in their row-major base type (the
    reference's row kernels), in both activation precisions and token-count regimes."""
    from pocketlm.quant import interleave

    for i, (T, K, N) in enumerate([(1, 576, 64), (3, 96, 16), (4, 1536, 48), (37, 320, 32), (2, 384, 16)]):
        if K % dtype.block_elems:
            continue
        raw, wd, x = make(dtype.base, T, K, N, 500 + i)
        packed = interleave(raw, dtype.base, (N, K))
        scale = np.abs(x) @ np.abs(wd).T
        for fn in ("matmul", "matmul2"):
            want = getattr(kernels, fn)("ref", int(dtype.base), raw, N, K, x)
            got = getattr(kernels, fn)(variant, int(dtype), packed, N, K, x)
            assert np.all(np.abs(got - want) <= 1e-5 * scale + 1e-30), (fn, variant, dtype.label, T, K, N)


def test_x16_needs_whole_row_groups():
    raw = quantize(np.ones((16, 64), np.float32), DType.Q4_0_X16)
    with pytest.raises(ValueError, match="16"):
        kernels.matmul("ref", int(DType.Q4_0_X16), raw[: raw.size // 2], 8, 64, np.ones((1, 64), np.float32))


def test_vnni_variants_where_the_cpu_has_them():
    """The AVX-VNNI kernels run wherever some VNNI does: natively (avxvnni) or, on AVX-512 VNNI
    CPUs, as their EVEX build (avxvnni-evex), so that the tests above cover that code."""
    if REMOTE:
        pytest.skip("this machine's x86 flags say nothing of the emulated ARM CPU (test_arm_dispatch.py)")
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags")
    have = kernels.available()
    if "avx2" in flags and "avx_vnni" in flags:
        assert "avxvnni" in have
    if "avx2" in flags and {"avx512f", "avx512vl", "avx512_vnni"} <= set(flags):
        assert "avxvnni-evex" in have
    if "avx_vnni" not in flags:
        assert "avxvnni" not in have
