"""Qwen3 (dense): the Llama block with an RMSNorm over each head of q and k before RoPE.

No Q/K/V biases (unless `attention_bias` says so); head_dim is its own config value and
need not be hidden_size / n_heads. Layers listed as "sliding_attention" in `layer_types`
(only with use_sliding_window, off in released checkpoints) get windowed attention.
"""

from __future__ import annotations

import re

from pocketlm.errors import UnsupportedModelError, shown
from pocketlm.models import llama
from pocketlm.models.qwen2 import qwen_layer_windows

ARCH = "qwen3"
GGUF_ARCHS = ("qwen3",)


def config_from_hf(d: dict) -> dict:
    if d.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"Qwen3 activation {shown(d.get('hidden_act'))} is not supported (silu is)")
    cfg = llama.config_from_hf({**d, "sliding_window": None})
    cfg["attn_bias"] = bool(d.get("attention_bias", False))
    cfg["qk_norm"] = True
    windows = qwen_layer_windows(d, cfg["n_layers"])
    if windows is not None:
        cfg["layer_windows"] = windows
    return cfg


def config_from_gguf(kv: dict) -> dict:
    cfg = llama.config_from_gguf(kv, arch="qwen3")
    cfg["qk_norm"] = True
    return cfg


_QK_NORM = re.compile(r"^model\.layers\.(\d+)\.self_attn\.([qk])_norm\.weight$")


def hf_weight_name(name: str) -> str | None:
    m = _QK_NORM.match(name)
    if m:
        return f"blk.{m.group(1)}.attn_{m.group(2)}_norm.weight"
    return llama.hf_weight_name(name)


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    from pocketlm.convert.source import expected_shapes

    shapes = expected_shapes(cfg, "llama")
    for i in range(cfg["n_layers"]):
        shapes[f"blk.{i}.attn_q_norm.weight"] = (cfg["head_dim"],)
        shapes[f"blk.{i}.attn_k_norm.weight"] = (cfg["head_dim"],)
    return shapes


build = llama.build
