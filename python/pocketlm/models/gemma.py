"""Gemma (1): the decoder Gemma 2 and Gemma 3 refine (models/gemma2.py, models/gemma3.py).

Pre-norm decoder like Llama, with:
  * embeddings scaled by sqrt(hidden_size) on the way in; output head tied to them;
  * RMSNorm weights applied as (1 + w): the bundle stores 1 + w (added at HF import; GGUF files
    already hold 1 + w, llama.cpp's converter adds it and transformers' GGUF loader subtracts it),
    so `build` uses plain rms_norm;
  * a GeGLU MLP: gelu_tanh(x Wg) * (x Wu);
  * head_dim a config value of its own (256 in released models), attention scale
    query_pre_attn_scalar ** -0.5 (head_dim for Gemma 1).
The build also serves Gemma 2 and 3 through optional config keys:
  post_norms      RMSNorm on the attention and MLP outputs before each residual add
  qk_norm         per-head RMSNorm of q and k before RoPE (Gemma 3)
  attn_softcap    attention scores -> cap * tanh(scores / cap) (Gemma 2)
  final_softcap   logits -> cap * tanh(logits / cap)
  layer_windows   per layer: sliding window size, 0 = global attention
  rope_local_theta / rope_local_scaling   RoPE of the sliding-window layers (Gemma 3)
"""

from __future__ import annotations

import math
import re

from pocketlm.errors import UnsupportedModelError, shown
from pocketlm.ir.graph import Graph
from pocketlm.models import layers as L
from pocketlm.models import llama

ARCH = "gemma"
GGUF_ARCHS = ("gemma",)

# Activations that are transformers' tanh-approximated GELU.
GELU_TANH = ("gelu_pytorch_tanh", "gelu_new")


def base_config_from_hf(d: dict, act: str) -> dict:
    """The keys every Gemma shares, from a HF config; `act` is the config's activation value."""
    if act not in GELU_TANH:
        raise UnsupportedModelError(f"Gemma activation {shown(act)} is not supported ({', '.join(GELU_TANH)} are)")
    if d.get("use_bidirectional_attention"):
        raise UnsupportedModelError("Gemma with bidirectional attention is not supported")
    cfg = llama.config_from_hf({**d, "sliding_window": None})
    cfg["tie_embeddings"] = bool(d.get("tie_word_embeddings", True))
    cfg["query_pre_attn_scalar"] = float(d.get("query_pre_attn_scalar") or cfg["head_dim"])
    return cfg


def config_from_hf(d: dict) -> dict:
    # transformers maps Gemma 1's legacy "gelu" to the tanh approximation the model was trained with
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    return base_config_from_hf(d, "gelu_pytorch_tanh" if act == "gelu" else act)


def base_config_from_gguf(kv: dict, arch: str) -> dict:
    cfg = llama.config_from_gguf(kv, arch=arch)
    cfg["rms_eps"] = float(kv.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6))
    cfg["query_pre_attn_scalar"] = float(cfg["head_dim"])
    return cfg


def config_from_gguf(kv: dict) -> dict:
    return base_config_from_gguf(kv, "gemma")


_HF_LAYER = {
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def hf_weight_name(name: str, post_norms: bool = False) -> str | None:
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _HF_LAYER:
        return f"blk.{m.group(1)}.{_HF_LAYER[m.group(2)]}"
    if m and post_norms and m.group(2) == "post_attention_layernorm.weight":
        # Gemma 2/3: a norm on the attention output; Gemma 1: the pre-MLP norm (llama's ffn_norm)
        return f"blk.{m.group(1)}.post_attention_norm.weight"
    return llama.hf_weight_name(name)


def hf_tensors(name: str, shape: tuple[int, ...], cfg: dict) -> list:
    """HF tensor -> [(canonical name, shape, transform)]: every RMSNorm weight becomes 1 + w."""
    canon = hf_weight_name(name, bool(cfg.get("post_norms")))
    if canon is None:
        return []
    return [(canon, tuple(shape), (lambda a: a + 1.0) if canon.endswith("norm.weight") else None)]


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    from pocketlm.convert.source import expected_shapes

    shapes = expected_shapes(cfg, "llama")
    dim, hd = cfg["hidden_size"], cfg["head_dim"]
    for i in range(cfg["n_layers"]):
        p = f"blk.{i}."
        if cfg.get("post_norms"):
            shapes[p + "post_attention_norm.weight"] = (dim,)
            shapes[p + "post_ffw_norm.weight"] = (dim,)
        if cfg.get("qk_norm"):
            shapes[p + "attn_q_norm.weight"] = (hd,)
            shapes[p + "attn_k_norm.weight"] = (hd,)
    return shapes


def build(g: Graph, cfg: dict, max_positions: int) -> None:
    dim, n_heads, n_kv = cfg["hidden_size"], cfg["n_heads"], cfg["n_kv_heads"]
    hd, ffn, eps = cfg["head_dim"], cfg["ffn_dim"], cfg["rms_eps"]
    n_layers, rope_dim = cfg["n_layers"], cfg["rope_dim"]
    windows = cfg.get("layer_windows") or [0] * n_layers
    post_norms, qk_norm = bool(cfg.get("post_norms")), bool(cfg.get("qk_norm"))
    scale = float(cfg["query_pre_attn_scalar"]) ** -0.5

    emb = g.weight("token_embd.weight", (cfg["vocab_size"], dim))  # (vocab, dim)
    x = L.scale(g, L.embed(g, emb), math.sqrt(dim))
    table = L.rope_table(g, head_dim=hd, rope_dim=rope_dim, theta=cfg["rope_theta"],
                         max_positions=max_positions, scaling=cfg.get("rope_scaling"))
    local_table = table
    if cfg.get("rope_local_theta") is not None:  # Gemma 3: sliding-window layers rotate by their own base
        local_table = L.rope_table(g, head_dim=hd, rope_dim=rope_dim, theta=cfg["rope_local_theta"],
                                   max_positions=max_positions, scaling=cfg.get("rope_local_scaling"))

    for i in range(n_layers):
        p = f"blk.{i}."
        tab = local_table if windows[i] else table
        h = L.rms_norm(g, x, g.weight(p + "attn_norm.weight", (dim,)), eps)  # (dim,), 1 + w
        wq = g.weight(p + "attn_q.weight", (n_heads * hd, dim))   # (n_heads*head_dim, dim)
        wk = g.weight(p + "attn_k.weight", (n_kv * hd, dim))      # (n_kv_heads*head_dim, dim)
        wv = g.weight(p + "attn_v.weight", (n_kv * hd, dim))      # (n_kv_heads*head_dim, dim)
        q, k, v = L.linear(g, h, wq, hint="q"), L.linear(g, h, wk, hint="k"), L.linear(g, h, wv, hint="v")
        if qk_norm:
            q = L.head_rms_norm(g, q, g.weight(p + "attn_q_norm.weight", (hd,)), n_heads, hd, eps)  # (head_dim,)
            k = L.head_rms_norm(g, k, g.weight(p + "attn_k_norm.weight", (hd,)), n_kv, hd, eps)     # (head_dim,)
        q = L.rope(g, q, tab, n_heads, hd, rope_dim)
        k = L.rope(g, k, tab, n_kv, hd, rope_dim)
        a = L.attention(g, q, k, v, layer=i, n_heads=n_heads, n_kv_heads=n_kv, head_dim=hd, scale=scale,
                        window=windows[i], softcap=cfg.get("attn_softcap"))
        wo = g.weight(p + "attn_output.weight", (dim, n_heads * hd))  # (dim, n_heads*head_dim)
        o = L.linear(g, a, wo, hint="o")
        if post_norms:
            o = L.rms_norm(g, o, g.weight(p + "post_attention_norm.weight", (dim,)), eps)  # (dim,)
        x = L.add(g, x, o)

        h = L.rms_norm(g, x, g.weight(p + "ffn_norm.weight", (dim,)), eps)  # (dim,)
        wg = g.weight(p + "ffn_gate.weight", (ffn, dim))   # (ffn_dim, dim)
        wu = g.weight(p + "ffn_up.weight", (ffn, dim))     # (ffn_dim, dim)
        wd = g.weight(p + "ffn_down.weight", (dim, ffn))   # (dim, ffn_dim)
        f = L.linear(g, L.geglu(g, L.linear(g, h, wg, hint="gate"), L.linear(g, h, wu, hint="up")), wd,
                     hint="down")
        if post_norms:
            f = L.rms_norm(g, f, g.weight(p + "post_ffw_norm.weight", (dim,)), eps)  # (dim,)
        x = L.add(g, x, f)

    x = L.rms_norm(g, x, g.weight("output_norm.weight", (dim,)), eps)
    head = emb if cfg.get("tie_embeddings") else g.weight("output.weight", (cfg["vocab_size"], dim))
    logits = L.linear(g, x, head, hint="logits")
    if cfg.get("final_softcap"):
        logits = L.softcap(g, logits, cfg["final_softcap"])
    g.outputs = (logits,)
