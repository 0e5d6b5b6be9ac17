"""Gemma 2: Gemma with norms after attention and MLP too, soft-capped attention scores and
logits, and sliding-window attention on every other layer (even layers local, odd global).

See models/gemma.py for the shared block; this file only reads the config.
"""

from __future__ import annotations

from pocketlm.models import gemma

ARCH = "gemma2"
GGUF_ARCHS = ("gemma2",)


def layer_windows(types: list[str], window: int | None) -> list[int]:
    """HF layer_types -> one window per layer (0 = global attention)."""
    return [int(window) if t == "sliding_attention" and window else 0 for t in types]


def config_from_hf(d: dict) -> dict:
    cfg = gemma.base_config_from_hf(d, d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh")
    n = cfg["n_layers"]
    types = d.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    cfg.update(post_norms=True,
               attn_softcap=float(d["attn_logit_softcapping"]) if d.get("attn_logit_softcapping") else None,
               final_softcap=float(d["final_logit_softcapping"]) if d.get("final_logit_softcapping") else None,
               layer_windows=layer_windows(types, d.get("sliding_window")))
    return cfg


def config_from_gguf(kv: dict) -> dict:
    cfg = gemma.base_config_from_gguf(kv, "gemma2")
    if int(cfg["n_layers"]) == 46:
        # Gemma 2 27B: llama.cpp (which writes no query_pre_attn_scalar) scales by hidden/heads
        cfg["query_pre_attn_scalar"] = float(cfg["hidden_size"] // cfg["n_heads"])
    window = kv.get("gemma2.attention.sliding_window")
    attn_cap, final_cap = kv.get("gemma2.attn_logit_softcapping"), kv.get("gemma2.final_logit_softcapping")
    cfg.update(post_norms=True,
               attn_softcap=float(attn_cap) if attn_cap else None,
               final_softcap=float(final_cap) if final_cap else None,
               layer_windows=[int(window) if window and i % 2 == 0 else 0 for i in range(cfg["n_layers"])])
    return cfg


hf_tensors = gemma.hf_tensors
tensor_shapes = gemma.tensor_shapes
build = gemma.build


def hf_weight_name(name: str) -> str | None:
    return gemma.hf_weight_name(name, post_norms=True)
