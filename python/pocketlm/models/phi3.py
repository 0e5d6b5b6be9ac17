"""Phi-3 / Phi-3.5-mini: the Llama block with fused projections and LongRoPE.

Hugging Face fuses Q, K and V in `qkv_proj` and the MLP's gate and up in `gate_up_proj`
(gate first); llama.cpp's GGUF keeps them fused too (`attn_qkv`, `ffn_up` holding gate+up).
Both are split by rows into the canonical llama tensors at import, so `build` is llama's.

LongRoPE (rope type "longrope", formerly "su"): per-frequency divisors `short_factor` and
`long_factor`, and cos/sin scaled by an attention factor. See passes/fold.py for how the
one compiled table chooses between the two sets.
"""

from __future__ import annotations

import math
import re

from pocketlm.errors import UnsupportedModelError, shown
from pocketlm.models import llama

ARCH = "phi3"
GGUF_ARCHS = ("phi3",)


def _longrope(*, short, long, original_max: int, max_position: int, factor: float | None = None,
              attention_factor: float | None = None, rope_dim: int) -> dict:
    """The normalised LongRoPE scaling dict (passes/fold.py), attention factor as transformers sets it."""
    for name, f in (("short_factor", short), ("long_factor", long)):
        if f is None or len(f) != rope_dim // 2:
            raise UnsupportedModelError(f"LongRoPE {name} must have {rope_dim // 2} values (rope_dim {rope_dim})")
    if factor is None:  # Phi-3: the ratio of the extended to the pretrained context
        factor = max_position / original_max
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original_max))
    return {"type": "longrope", "short_factor": [float(v) for v in short], "long_factor": [float(v) for v in long],
            "original_max_position_embeddings": int(original_max), "attention_factor": float(attention_factor)}


def config_from_hf(d: dict) -> dict:
    if d.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"Phi-3 activation {shown(d.get('hidden_act'))} is not supported (silu is)")
    params = dict(d.get("rope_parameters") or {})
    scaling = dict(d.get("rope_scaling") or params)
    rtype = scaling.get("rope_type") or scaling.get("type") or "default"
    if rtype in ("su", "yarn"):  # what transformers' Phi3Config maps to longrope
        rtype = "longrope"
    if rtype not in ("default", "longrope"):
        raise UnsupportedModelError(f"Phi-3 rope scaling {shown(rtype)} is not supported (default, longrope are)")
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    partial = float(params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)))
    # the llama reader for everything but RoPE
    cfg = llama.config_from_hf({**{k: v for k, v in d.items() if k not in ("rope_scaling", "rope_parameters")},
                                "rope_theta": theta})
    if cfg["attn_bias"]:
        raise UnsupportedModelError("Phi-3 with attention biases is not supported")
    cfg["rope_dim"] = int(cfg["head_dim"] * partial)
    if cfg["rope_dim"] % 2:
        raise UnsupportedModelError(f"partial_rotary_factor {partial} gives an odd rope_dim {cfg['rope_dim']}")
    if rtype == "longrope":
        original = scaling.get("original_max_position_embeddings") or d.get("original_max_position_embeddings")
        if not original:
            raise UnsupportedModelError("LongRoPE without original_max_position_embeddings")
        cfg["rope_scaling"] = _longrope(short=scaling.get("short_factor"), long=scaling.get("long_factor"),
                                        original_max=int(original), max_position=cfg["max_position"],
                                        factor=scaling.get("factor"), attention_factor=scaling.get("attention_factor"),
                                        rope_dim=cfg["rope_dim"])
    return cfg


def config_from_gguf(kv: dict) -> dict:
    cfg = llama.config_from_gguf({k: v for k, v in kv.items() if not k.startswith("phi3.rope.scaling.")}, arch="phi3")
    cfg["sliding_window"] = int(kv.get("phi3.attention.sliding_window") or 0) or None
    original = kv.get("phi3.rope.scaling.original_context_length")
    if original and int(original) < cfg["max_position"]:
        # LongRoPE: the factors arrive as tensors (gguf_tensors fills them in)
        factor = cfg["max_position"] / int(original)
        attn = kv.get("phi3.rope.scaling.attn_factor")
        cfg["rope_scaling"] = {
            "type": "longrope", "original_max_position_embeddings": int(original),
            "attention_factor": float(attn) if attn is not None
            else math.sqrt(1 + math.log(factor) / math.log(int(original))),
        }
    return cfg


_FUSED_HF = re.compile(r"^model\.layers\.(\d+)\.(self_attn\.qkv_proj|mlp\.gate_up_proj)\.weight$")


def _pieces(cfg: dict, fused: str) -> list[tuple[str, slice]]:
    """Row ranges of the canonical tensors inside a fused one ("qkv" or "gate_up")."""
    if fused == "qkv":
        q, kv = cfg["n_heads"] * cfg["head_dim"], cfg["n_kv_heads"] * cfg["head_dim"]
        return [("attn_q", slice(0, q)), ("attn_k", slice(q, q + kv)), ("attn_v", slice(q + kv, q + 2 * kv))]
    f = cfg["ffn_dim"]
    return [("ffn_gate", slice(0, f)), ("ffn_up", slice(f, 2 * f))]


def hf_tensors(name: str, shape: tuple[int, ...], cfg: dict) -> list:
    """Canonical pieces of a HF tensor: [(name, shape, transform(array) -> array)] (see models/__init__)."""
    m = _FUSED_HF.match(name)
    if not m:
        canon = llama.hf_weight_name(name)
        return [] if canon is None else [(canon, tuple(shape), None)]
    fused = "qkv" if m.group(2).endswith("qkv_proj") else "gate_up"
    pieces = _pieces(cfg, fused)
    if shape[0] != pieces[-1][1].stop:
        raise UnsupportedModelError(f"{name} has {shape[0]} rows, the config implies {pieces[-1][1].stop}")
    return [(f"blk.{m.group(1)}.{canon}.weight", (rows.stop - rows.start, shape[1]), lambda a, rows=rows: a[rows])
            for canon, rows in pieces]


def gguf_tensors(name: str, shape: tuple[int, ...], cfg: dict, load_f32) -> list:
    """Splits attn_qkv and the gate+up ffn_up by rows; moves LongRoPE factors into the config."""
    if name in ("rope_factors_long.weight", "rope_factors_short.weight"):
        scaling = cfg.get("rope_scaling")
        if not scaling:
            raise UnsupportedModelError(f"{name} without phi3.rope.scaling.original_context_length")
        key = "long_factor" if "long" in name else "short_factor"
        scaling[key] = [float(v) for v in load_f32().reshape(-1)]
        return []
    m = re.match(r"^(blk\.\d+\.)(attn_qkv|ffn_up)\.weight$", name)
    if not m or (m.group(2) == "ffn_up" and shape[0] == cfg["ffn_dim"]):
        return [(name, None)]
    pieces = _pieces(cfg, "qkv" if m.group(2) == "attn_qkv" else "gate_up")
    if shape[0] != pieces[-1][1].stop:
        raise UnsupportedModelError(f"{name} has {shape[0]} rows, the config implies {pieces[-1][1].stop}")
    return [(f"{m.group(1)}{canon}.weight", rows) for canon, rows in pieces]


build = llama.build
