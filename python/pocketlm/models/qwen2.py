"""Qwen2 / Qwen2.5: the Llama block with biases on the Q, K and V projections."""

from __future__ import annotations

from pocketlm.models import llama

ARCH = "qwen2"
GGUF_ARCHS = ("qwen2",)


def config_from_hf(d: dict) -> dict:
    if d.get("use_sliding_window") and d.get("sliding_window", 0) < d.get("max_position_embeddings", 0):
        # Released Qwen2/2.5 configs set use_sliding_window=false; honour the flag if someone sets it.
        from pocketlm.errors import UnsupportedModelError

        raise UnsupportedModelError("Qwen2 sliding-window attention is not supported yet")
    cfg = llama.config_from_hf({**d, "attention_bias": True})
    return cfg


def config_from_gguf(kv: dict) -> dict:
    cfg = llama.config_from_gguf(kv, arch="qwen2")
    cfg["attn_bias"] = True
    return cfg


hf_weight_name = llama.hf_weight_name
build = llama.build
