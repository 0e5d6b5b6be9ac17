"""Qwen2 / Qwen2.5: the Llama block with biases on the Q, K and V projections.

With `use_sliding_window` (off in the released checkpoints), the layers from `max_window_layers` on (or
those `layer_types` lists as "sliding_attention") attend to the last `sliding_window` positions only.
"""

from __future__ import annotations

from pocketlm.models import llama

ARCH = "qwen2"
GGUF_ARCHS = ("qwen2",)


def qwen_layer_windows(d: dict, n_layers: int) -> list[int] | None:
    """Per-layer sliding windows of a Qwen2/Qwen3 config with use_sliding_window (None without):
    `layer_types` when given, else layers from `max_window_layers` on slide (as transformers)."""
    if not (d.get("use_sliding_window") and d.get("sliding_window")):
        return None
    types = d.get("layer_types") or [
        "sliding_attention" if i >= int(d.get("max_window_layers") or 0) else "full_attention"
        for i in range(n_layers)]
    return [int(d["sliding_window"]) if t == "sliding_attention" else 0 for t in types]


def config_from_hf(d: dict) -> dict:
    # Released Qwen2/2.5 configs set use_sliding_window=false (and a sliding_window value that is then
    # unused): the Llama block sees no window unless the flag asks for one, per layer.
    cfg = llama.config_from_hf({**d, "attention_bias": True, "sliding_window": None})
    windows = qwen_layer_windows(d, cfg["n_layers"])
    if windows is not None:
        cfg["layer_windows"] = windows
    return cfg


def config_from_gguf(kv: dict) -> dict:
    cfg = llama.config_from_gguf(kv, arch="qwen2")
    cfg["attn_bias"] = True
    return cfg


hf_weight_name = llama.hf_weight_name
build = llama.build
