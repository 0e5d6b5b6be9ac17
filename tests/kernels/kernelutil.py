"""Shared helpers for the kernel tests: numpy emulation of activation quantization."""

from __future__ import annotations

import os

import numpy as np
import pytest

core = pytest.importorskip("pocketlm._core")
REMOTE = os.environ.get("PLM_TEST_KERNELS")  # the server's command line, if any
if REMOTE:  # another CPU's kernels, through a server (scripts/test-arm.sh)
    from remote import RemoteKernels

    kernels = RemoteKernels(os.environ["PLM_TEST_KERNELS"])
else:
    kernels = core.kernels


def round_away(v: np.ndarray) -> np.ndarray:
    """Round half away from zero (the kernels' rule, == std::round)."""
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def quantize_act_np(x: np.ndarray, scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy emulation of kernels.h BlockQ8A quantization of x[..., K] -> (d, s, q); with `scale`
    (one per 32-block) at that scale instead of the block's own max|x| / 127."""
    xb = x.astype(np.float32).reshape(*x.shape[:-1], -1, 32)
    amax = np.max(np.abs(xb), axis=-1)
    d = (amax / np.float32(127.0)).astype(np.float32) if scale is None else scale.astype(np.float32)
    inv = np.zeros_like(d)
    np.divide(np.float32(1.0), d, out=inv, where=d != 0)
    v = (xb * inv[..., None]).astype(np.float32)
    # floor(|v| + 0.5) in float64 is exact, so this is std::round of the f32 product
    q = np.clip(round_away(v.astype(np.float64)), -127, 127).astype(np.int8)
    s = (d * q.astype(np.int32).sum(-1).astype(np.float32)).astype(np.float32)
    return d, s, q


def quantize_act2_np(x: np.ndarray):
    """numpy emulation of kernels.h BlockQ8A2 quantization of x[..., K] -> (d, s, d2, s2, q, q2).

    The residual r = fma(-d, q, x) is one rounding of the exact x - d*q; in float64
    d*q (24+7 bits) and the difference (< 53 bits, x ~ d*q) are exact, so casting to
    float32 reproduces it.
    """
    x = x.astype(np.float32)
    d, s, q = quantize_act_np(x)
    xb = x.reshape(*x.shape[:-1], -1, 32).astype(np.float64)
    r = (xb - d[..., None].astype(np.float64) * q.astype(np.float64)).astype(np.float32)
    d2, s2, q2 = quantize_act_np(r.reshape(x.shape), d * np.float32(1 / 256))  # d2 = d / 256
    return d, s, d2, s2, q, q2


def _f16(values) -> np.ndarray:
    return np.asarray(values, dtype="<f2").view(np.uint8).reshape(-1, 2)


def random_blocks(dtype, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes of a GGUF block type with sane f16 scales (element values O(1)); every code,
    6-bit scale/min and int8 scale (Q6_K's -128 included) occurs. Row 0 starts with an all-zero
    block. For the K-quants, which quantize() does not produce."""
    from pocketlm.dtypes import DType

    n = rows * cols // dtype.block_elems
    blocks = rng.integers(0, 256, size=(n, dtype.block_bytes), dtype=np.uint8)
    scale = rng.uniform(0.5, 2.0, n)
    if dtype in (DType.Q4_K, DType.Q5_K):  # d, dmin first; values d*sc*q - dmin*mn, sc, mn < 64
        blocks[:, 0:2] = _f16(scale * (0.002 if dtype == DType.Q4_K else 0.001))
        blocks[:, 2:4] = _f16(rng.uniform(0.5, 2.0, n) * 0.004)
    elif dtype == DType.Q6_K:  # d last; values d*sc*(q-32), |sc| <= 128
        blocks[:, -2:] = _f16(scale * 3e-4)
    else:
        raise ValueError(f"no random block generator for {dtype.label}")
    blocks[0] = 0  # zero block: d = dmin = 0
    return blocks.reshape(-1)


def make_matmul_case(dtype, T, K, N, seed):
    """Random weights (with a zero block) and activations (with a large-scale block):
    returns (raw weight bytes, dequantized weights [N, K], x [T, K])."""
    from pocketlm.quant import KEEP_ONLY, dequantize, quantize

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((N, K)).astype(np.float32)
    w[0, : min(K, 32)] = 0  # a zero block
    x = rng.standard_normal((T, K)).astype(np.float32)
    x[-1, : min(K, 32)] *= 100  # a block with a large scale
    if dtype.sparse:  # 2:4: the two smallest of every four go, and some groups keep fewer
        g = w.reshape(N, K // 4, 4)
        drop = np.argsort(np.abs(g), axis=-1)[..., :2]
        np.put_along_axis(g, drop, 0.0, axis=-1)
        g[rng.random(g.shape[:2]) < 0.1] = 0.0
        w = g.reshape(N, K)
    if dtype.bitmask:  # unstructured: about 60 % zeros, some rows and blocks empty or full
        w[rng.random(w.shape) < 0.6] = 0.0
        w[N // 2] = 0.0
        w[-1, -64:] = rng.standard_normal(64)
    raw = random_blocks(dtype, N, K, rng) if dtype in KEEP_ONLY else quantize(w, dtype)
    return raw, dequantize(raw, dtype, (N, K)), x


MATMUL_SHAPES = [  # (T, K, N): covers T in {1,2,3,5,17,64}, K in {32..1536}, odd N
    (1, 32, 1), (2, 64, 3), (3, 96, 7), (5, 576, 67), (17, 1536, 7), (64, 576, 67),
    (64, 1536, 3), (3, 1536, 67), (1, 1536, 67), (17, 96, 1), (1, 128, 7), (5, 256, 3),
    (2, 640, 67), (64, 384, 7), (3, 128, 1),
]
# (T, K, N, n0, n1): output columns [n0, n1) only, as the executor's thread split asks for.
# T >= 16 takes AVX-512's prefill GEMM (groups of 16 rows, tiles of 8 tokens): ranges that
# start and end off the 16-row grid, single rows, token counts with short last tiles.
MATMUL_RANGE_CASES = [
    (16, 64, 16, 0, 16), (37, 320, 35, 3, 35), (24, 128, 50, 17, 49), (64, 256, 40, 0, 33),
    (19, 1536, 21, 5, 6), (23, 512, 67, 16, 64), (15, 256, 40, 1, 39), (2, 256, 40, 7, 30),
]
FLOAT_MATMUL_SHAPES = [(1, 1, 1), (3, 7, 5), (2, 33, 67), (5, 100, 3), (17, 17, 7), (64, 200, 3), (1, 1000, 67)]


def x16_rows(n: int) -> int:
    """A row count the x16 types take (a multiple of 16) near n: n rounded up."""
    return -(-n // 16) * 16


def matmul_shapes_for(dtype):
    if not dtype.quantized:
        return MATMUL_SHAPES + FLOAT_MATMUL_SHAPES
    if dtype.x16 or dtype.sparse:  # groups of 16 rows: the same T and K with N rounded up (16, 32, 80 rows)
        return [(T, K, x16_rows(N)) for T, K, N in MATMUL_SHAPES if K % dtype.block_elems == 0]
    return [s for s in MATMUL_SHAPES if s[1] % dtype.block_elems == 0]  # K-quants: K % 256 == 0


def variants() -> list[str]:
    return list(kernels.available())


def simd_variants() -> list[str]:
    return [v for v in kernels.available() if v != "ref"]


def check_row_ranges(fn: str, variant: str, dtype) -> None:
    """kernels.<fn> (matmul or matmul2) of `variant` on output-column ranges (MATMUL_RANGE_CASES)
    against the full reference: the columns outside the range stay 0, those inside agree up to
    float summation order."""
    for i, (T, K, N, n0, n1) in enumerate(MATMUL_RANGE_CASES):
        if K % dtype.block_elems:
            continue
        if dtype.x16 or dtype.sparse:  # same ranges, in a matrix of whole 16-row groups
            N = x16_rows(N)
        raw, wd, x = make_matmul_case(dtype, T, K, N, 300 + i)
        want = getattr(kernels, fn)("ref", int(dtype), raw, N, K, x)
        got = getattr(kernels, fn)(variant, int(dtype), raw, N, K, x, n0, n1)
        case = (fn, variant, dtype.label, T, K, N, n0, n1)
        assert not got[:, :n0].any() and not got[:, n1:].any(), case
        scale = offset_scale(x, wd)[:, n0:n1]
        assert np.all(np.abs(got[:, n0:n1] - want[:, n0:n1]) <= 1e-5 * scale + 1e-30), case


def offset_scale(x: np.ndarray, wd: np.ndarray) -> np.ndarray:
    """sum_k (|W[n,k]| + max|W| of k's 32-block) |x[t,k]|: the float rounding of SIMD kernels that
    sum unsigned codes and take the code offset out per block (Q4_0's -8: y = d (d_a idot - 8 s))
    scales with the codes' size, not with |W|: two large terms cancel. Float summation order and
    that one cancellation stay within 1e-5 of it."""
    n, k = wd.shape
    wabs = np.abs(wd)
    if k % 32 == 0:
        wabs = wabs + np.repeat(wabs.reshape(n, k // 32, 32).max(-1), 32, axis=-1)
    return np.abs(x) @ wabs.T
