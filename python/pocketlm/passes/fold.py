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
                  freq_factors: np.ndarray | None = None, max_positions: int | None = None) -> np.ndarray:
    """Inverse frequencies (rope_dim/2,) in float64, following the HF definitions.

    scaling["type"]:
      "linear"    inv / factor
      "llama3"    factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
      "longrope"  short_factor, long_factor (rope_dim/2 divisors each),
                  original_max_position_embeddings (and attention_factor, see rope_table).
                  The table is compiled once for `max_positions` (the session's max_context):
                  long factors when it exceeds original_max_position_embeddings, else short.
                  transformers picks per forward call by the largest position in it, so the two
                  agree on any call whose positions cover the same side of the boundary
                  (llama.cpp picks by context size, as here).
    """
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
    elif kind == "longrope":
        if max_positions is None:
            raise ValueError("longrope needs max_positions to choose between short and long factors")
        long = max_positions > int(scaling["original_max_position_embeddings"])
        factors = np.asarray(scaling["long_factor" if long else "short_factor"], dtype=np.float64)
        if factors.shape != inv.shape:
            raise ValueError(f"longrope factors have {factors.size} values, rope_dim {rope_dim} needs {inv.size}")
        inv = inv / factors
    elif kind is not None:
        raise ValueError(f"unknown rope scaling {kind!r}")
    if freq_factors is not None:
        inv = inv / freq_factors.astype(np.float64)
    return inv


def rope_table(max_positions: int, rope_dim: int, theta: float, scaling: dict | None,
               freq_factors: np.ndarray | None = None) -> np.ndarray:
    """(max_positions, rope_dim): cos | sin of position * inv_freq, times scaling's
    "attention_factor" (LongRoPE: sqrt(1 + ln(factor) / ln(original_max)); default 1)."""
    inv = rope_inv_freq(rope_dim, theta, scaling, freq_factors, max_positions)
    ang = np.arange(max_positions, dtype=np.float64)[:, None] * inv[None, :]
    mscale = float((scaling or {}).get("attention_factor", 1.0))
    return (np.concatenate([np.cos(ang), np.sin(ang)], axis=1) * mscale).astype(np.float32)


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
