"""Constant folding: ops whose inputs are all known at compile time become constants.

Today that is the RoPE table: cos/sin for every position and frequency, with the
model's rope scaling applied, computed once instead of per token.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from pocketlm.ir.graph import Graph

WeightReader = Callable[[str], np.ndarray]


def rope_inv_freq(rope_dim: int, theta: float, scaling: dict | None,
                  freq_factors: np.ndarray | None = None) -> np.ndarray:
    """Inverse frequencies (rope_dim/2,) in float64, following the HF definitions."""
    inv = 1.0 / theta ** (np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)
    scaling = scaling or {}
    kind = scaling.get("type")
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wl, high_wl = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wl) & (wavelen <= low_wl)
        inv = np.where(is_mid, mid, scaled)
    elif kind is not None:
        raise ValueError(f"unknown rope scaling {kind!r}")
    if freq_factors is not None:
        inv = inv / freq_factors.astype(np.float64)
    return inv


def rope_table(max_positions: int, rope_dim: int, theta: float, scaling: dict | None,
               freq_factors: np.ndarray | None = None) -> np.ndarray:
    inv = rope_inv_freq(rope_dim, theta, scaling, freq_factors)
    ang = np.arange(max_positions, dtype=np.float64)[:, None] * inv[None, :]
    return np.concatenate([np.cos(ang), np.sin(ang)], axis=1).astype(np.float32)


def make_fold_constants(read_weight: WeightReader | None = None) -> Callable[[Graph], Graph]:
    def fold_constants(g: Graph) -> Graph:
        out = g.copy()
        out.nodes = []
        for n in g.nodes:
            if n.op != "rope_table":
                out.nodes.append(n)
                continue
            factors = None
            if n.inputs:
                if read_weight is None:
                    raise ValueError("rope_table with frequency factors needs a weight reader")
                factors = read_weight(n.inputs[0])
            scaling = dict(n.attr("scaling") or ())
            name = n.outputs[0]
            out.consts[name] = rope_table(n.attr("max_positions"), n.attr("rope_dim"), n.attr("theta"),
                                          scaling or None, factors)
            del out.values[name]
        return out

    fold_constants.__name__ = "fold_constants"
    return fold_constants


fold_constants = make_fold_constants()
