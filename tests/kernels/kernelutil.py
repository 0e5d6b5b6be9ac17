"""Shared helpers for the kernel tests: numpy emulation of activation quantization."""

from __future__ import annotations

import numpy as np
import pytest

core = pytest.importorskip("pocketlm._core")
kernels = core.kernels


def round_away(v: np.ndarray) -> np.ndarray:
    """Round half away from zero (the kernels' rule, == std::round)."""
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def quantize_act_np(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy emulation of kernels.h BlockQ8A quantization of x[..., K] -> (d, s, q)."""
    xb = x.astype(np.float32).reshape(*x.shape[:-1], -1, 32)
    amax = np.max(np.abs(xb), axis=-1)
    d = (amax / np.float32(127.0)).astype(np.float32)
    inv = np.zeros_like(d)
    np.divide(np.float32(1.0), d, out=inv, where=d != 0)
    v = (xb * inv[..., None]).astype(np.float32)
    # floor(|v| + 0.5) in float64 is exact, so this is std::round of the f32 product
    q = np.clip(round_away(v.astype(np.float64)), -127, 127).astype(np.int8)
    s = (d * q.astype(np.int32).sum(-1).astype(np.float32)).astype(np.float32)
    return d, s, q


def variants() -> list[str]:
    return list(kernels.available())


def simd_variants() -> list[str]:
    return [v for v in kernels.available() if v != "ref"]
