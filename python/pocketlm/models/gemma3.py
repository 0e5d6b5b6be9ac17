"""Gemma 3 text models (HF model_type "gemma3_text", Gemma3ForCausalLM).

Gemma 2's block (models/gemma.py) with per-head q/k RMSNorms (also 1 + w) and no attention
soft-capping; five sliding-window layers per global one by default (`layer_types`, or the
older `sliding_window_pattern`), each kind with its own RoPE: sliding layers use the local
base (10k) unscaled, global layers rope_theta (1M) and the model's rope scaling, if any.
"""

from __future__ import annotations

from pocketlm.errors import UnsupportedModelError
from pocketlm.models import gemma, llama
from pocketlm.models.gemma2 import layer_windows

ARCH = "gemma3"
GGUF_ARCHS = ("gemma3",)

DEFAULT_PATTERN = 6          # transformers' and llama.cpp's: layer i is global iff (i + 1) % 6 == 0
DEFAULT_GLOBAL_THETA = 1_000_000.0
DEFAULT_LOCAL_THETA = 10_000.0


def _pattern_types(n_layers: int, pattern: int) -> list[str]:
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]


def _rope(params: dict | None, theta_default: float) -> tuple[float, dict | None]:
    params = dict(params or {})
    params.setdefault("rope_theta", theta_default)
    return llama._rope_from_hf({"rope_parameters": params})


def config_from_hf(d: dict) -> dict:
    cfg = gemma.base_config_from_hf(
        {k: v for k, v in d.items() if k not in ("rope_parameters", "rope_scaling")},
        d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh")
    params = d.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:  # transformers >= 5
        glob, local = params.get("full_attention"), params.get("sliding_attention")
    else:  # older configs: rope_theta, rope_scaling (global layers), rope_local_base_freq
        glob = {**(d.get("rope_scaling") or {}), "rope_theta": d.get("rope_theta", DEFAULT_GLOBAL_THETA)}
        local = {"rope_theta": d.get("rope_local_base_freq", DEFAULT_LOCAL_THETA)}
    cfg["rope_theta"], cfg["rope_scaling"] = _rope(glob, DEFAULT_GLOBAL_THETA)
    cfg["rope_local_theta"], cfg["rope_local_scaling"] = _rope(local, DEFAULT_LOCAL_THETA)
    n = cfg["n_layers"]
    types = d.get("layer_types") or _pattern_types(n, int(d.get("sliding_window_pattern") or DEFAULT_PATTERN))
    if len(types) != n:
        raise UnsupportedModelError(f"layer_types lists {len(types)} layers, the model has {n}")
    cfg.update(post_norms=True, qk_norm=True, attn_softcap=None,
               final_softcap=float(d["final_logit_softcapping"]) if d.get("final_logit_softcapping") else None,
               layer_windows=layer_windows(types, d.get("sliding_window")))
    return cfg


def config_from_gguf(kv: dict) -> dict:
    cfg = gemma.base_config_from_gguf(kv, "gemma3")
    n = cfg["n_layers"]
    if n == 62:  # Gemma 3 27B: llama.cpp scales attention by hidden/heads
        cfg["query_pre_attn_scalar"] = float(cfg["hidden_size"] // cfg["n_heads"])
    cfg["rope_theta"] = float(kv.get("gemma3.rope.freq_base", DEFAULT_GLOBAL_THETA))
    cfg["rope_local_theta"] = float(kv.get("gemma3.rope.freq_base_swa", DEFAULT_LOCAL_THETA))
    cfg["rope_local_scaling"] = None
    pattern = kv.get("gemma3.attention.sliding_window_pattern")
    if isinstance(pattern, (list, tuple)):  # one flag per layer: true = sliding window
        types = ["sliding_attention" if p else "full_attention" for p in pattern]
    else:
        types = _pattern_types(n, int(pattern or DEFAULT_PATTERN))
    final = kv.get("gemma3.final_logit_softcapping")
    cfg.update(post_norms=True, qk_norm=True, attn_softcap=None, final_softcap=float(final) if final else None,
               layer_windows=layer_windows(types, kv.get("gemma3.attention.sliding_window")))
    return cfg


hf_tensors = gemma.hf_tensors
tensor_shapes = gemma.tensor_shapes
build = gemma.build


def hf_weight_name(name: str) -> str | None:
    return gemma.hf_weight_name(name, post_norms=True)
