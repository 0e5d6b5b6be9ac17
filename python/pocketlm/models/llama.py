"""Llama family: Llama 2/3 (incl. rope scaling), SmolLM/SmolLM2, TinyLlama, Mistral.

Pre-norm decoder: RMSNorm -> attention (GQA, RoPE in HF rotate_half pairing) ->
residual -> RMSNorm -> SwiGLU MLP -> residual; final RMSNorm and output head,
tied to the embeddings when the checkpoint has no separate head.

Optional, from the config: per-head RMSNorm of q and k before RoPE (`qk_norm`, Qwen3) and
sliding-window attention (`sliding_window` for every layer, Mistral; or `layer_windows`,
one window per layer, 0 = full attention).
"""

from __future__ import annotations

import math
import re

from pocketlm.errors import UnsupportedModelError, shown
from pocketlm.ir.graph import Graph
from pocketlm.models import layers as L

ARCH = "llama"
GGUF_ARCHS = ("llama",)

SUPPORTED_ROPE = ("default", "linear", "llama3")


def _rope_from_hf(d: dict) -> tuple[float, dict | None]:
    # transformers >= 5 writes `rope_parameters`; older configs `rope_theta` + `rope_scaling`.
    params = d.get("rope_parameters") or {}
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    # a number becomes a float; anything else is left for the converter's range check, which names the key
    theta = float(theta) if isinstance(theta, (int, float)) and not isinstance(theta, bool) else theta
    scaling = d.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
    scaling = dict(scaling or {})
    rtype = scaling.pop("rope_type", scaling.pop("type", "default")) or "default"
    if rtype not in SUPPORTED_ROPE:
        raise UnsupportedModelError(f"rope scaling {shown(rtype)} is not supported ({', '.join(SUPPORTED_ROPE)} are)")
    if rtype == "default":
        return theta, None
    keep = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return theta, {"type": rtype, **{k: scaling[k] for k in keep if k in scaling}}


def config_from_hf(d: dict) -> dict:
    if d.get("mlp_bias"):
        raise UnsupportedModelError("Llama checkpoints with mlp_bias=True are not supported")
    n_heads = int(d["num_attention_heads"])
    hidden = int(d["hidden_size"])
    head_dim = int(d.get("head_dim") or hidden // n_heads)
    theta, scaling = _rope_from_hf(d)
    return {
        "vocab_size": int(d["vocab_size"]),
        "hidden_size": hidden,
        "n_layers": int(d["num_hidden_layers"]),
        "n_heads": n_heads,
        "n_kv_heads": int(d.get("num_key_value_heads") or n_heads),
        "head_dim": head_dim,
        "ffn_dim": int(d["intermediate_size"]),
        "rms_eps": float(d.get("rms_norm_eps", 1e-6)),
        "rope_theta": theta,
        "rope_dim": head_dim,
        "rope_scaling": scaling,
        "max_position": int(d.get("max_position_embeddings", 4096)),
        "tie_embeddings": bool(d.get("tie_word_embeddings", False)),
        "attn_bias": bool(d.get("attention_bias", False)),
        # Mistral: each position attends to the last `sliding_window` positions, itself included.
        "sliding_window": int(d["sliding_window"]) if d.get("sliding_window") else None,
    }


def config_from_gguf(kv: dict, arch: str = "llama") -> dict:
    def get(key, default=None):
        v = kv.get(f"{arch}.{key}", default)
        if v is None:
            raise UnsupportedModelError(f"GGUF metadata lacks {arch}.{key}")
        return v

    hidden = int(get("embedding_length"))
    n_heads = int(get("attention.head_count"))
    head_dim = int(kv.get(f"{arch}.attention.key_length") or hidden // n_heads)
    scaling = None
    stype = kv.get(f"{arch}.rope.scaling.type")
    if stype and stype != "none":
        if stype != "linear":
            raise UnsupportedModelError(f"GGUF rope scaling {shown(stype)} is not supported")
        scaling = {"type": "linear", "factor": float(get("rope.scaling.factor"))}
    vocab = kv.get(f"{arch}.vocab_size") or len(kv.get("tokenizer.ggml.tokens", []))
    return {
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "n_layers": int(get("block_count")),
        "n_heads": n_heads,
        "n_kv_heads": int(kv.get(f"{arch}.attention.head_count_kv") or n_heads),
        "head_dim": head_dim,
        "ffn_dim": int(get("feed_forward_length")),
        "rms_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(kv.get(f"{arch}.rope.freq_base", 10000.0)),
        "rope_dim": int(kv.get(f"{arch}.rope.dimension_count") or head_dim),
        "rope_scaling": scaling,
        "max_position": int(get("context_length", 4096)),
        "tie_embeddings": None,  # decided by the converter: no output.weight tensor -> tied
        "attn_bias": None,       # decided by the converter from the tensors present
    }


_HF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_HF_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def hf_weight_name(name: str) -> str | None:
    """Canonical name for a HF tensor name; None for tensors the runtime recomputes."""
    if name in _HF_GLOBAL:
        return _HF_GLOBAL[name]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _HF_LAYER:
        return f"blk.{m.group(1)}.{_HF_LAYER[m.group(2)]}"
    if name.endswith("rotary_emb.inv_freq"):
        return None
    raise UnsupportedModelError(f"unexpected tensor {shown(name)} for a {ARCH} checkpoint")


def build(g: Graph, cfg: dict, max_positions: int) -> None:
    dim, n_heads, n_kv = cfg["hidden_size"], cfg["n_heads"], cfg["n_kv_heads"]
    hd, ffn, eps = cfg["head_dim"], cfg["ffn_dim"], cfg["rms_eps"]
    has_bias = bool(cfg.get("attn_bias"))
    qk_norm = bool(cfg.get("qk_norm"))
    windows = cfg.get("layer_windows") or [cfg.get("sliding_window") or 0] * cfg["n_layers"]

    emb = g.weight("token_embd.weight", (cfg["vocab_size"], dim))  # (vocab, dim)
    x = L.embed(g, emb)
    freq_factors = None
    if cfg.get("rope_freq_factors"):  # Llama 3 GGUF ships precomputed divisors
        freq_factors = g.weight("rope_freqs.weight", (cfg["rope_dim"] // 2,))
    table = L.rope_table(g, head_dim=hd, rope_dim=cfg["rope_dim"], theta=cfg["rope_theta"],
                         max_positions=max_positions, scaling=cfg.get("rope_scaling"),
                         freq_factors=freq_factors)

    for i in range(cfg["n_layers"]):
        p = f"blk.{i}."
        h = L.rms_norm(g, x, g.weight(p + "attn_norm.weight", (dim,)), eps)
        wq = g.weight(p + "attn_q.weight", (n_heads * hd, dim))   # (n_heads*head_dim, dim)
        wk = g.weight(p + "attn_k.weight", (n_kv * hd, dim))      # (n_kv_heads*head_dim, dim)
        wv = g.weight(p + "attn_v.weight", (n_kv * hd, dim))      # (n_kv_heads*head_dim, dim)
        bq = g.weight(p + "attn_q.bias", (n_heads * hd,)) if has_bias else None
        bk = g.weight(p + "attn_k.bias", (n_kv * hd,)) if has_bias else None
        bv = g.weight(p + "attn_v.bias", (n_kv * hd,)) if has_bias else None
        q, k = L.linear(g, h, wq, bq, "q"), L.linear(g, h, wk, bk, "k")
        if qk_norm:  # Qwen3: RMSNorm over each head before RoPE
            q = L.head_rms_norm(g, q, g.weight(p + "attn_q_norm.weight", (hd,)), n_heads, hd, eps)  # (head_dim,)
            k = L.head_rms_norm(g, k, g.weight(p + "attn_k_norm.weight", (hd,)), n_kv, hd, eps)     # (head_dim,)
        q = L.rope(g, q, table, n_heads, hd, cfg["rope_dim"])
        k = L.rope(g, k, table, n_kv, hd, cfg["rope_dim"])
        v = L.linear(g, h, wv, bv, "v")
        a = L.attention(g, q, k, v, layer=i, n_heads=n_heads, n_kv_heads=n_kv, head_dim=hd,
                        scale=1.0 / math.sqrt(hd), window=windows[i])
        wo = g.weight(p + "attn_output.weight", (dim, n_heads * hd))  # (dim, n_heads*head_dim)
        x = L.add(g, x, L.linear(g, a, wo, hint="o"))

        h = L.rms_norm(g, x, g.weight(p + "ffn_norm.weight", (dim,)), eps)
        wg = g.weight(p + "ffn_gate.weight", (ffn, dim))   # (ffn_dim, dim)
        wu = g.weight(p + "ffn_up.weight", (ffn, dim))     # (ffn_dim, dim)
        wd = g.weight(p + "ffn_down.weight", (dim, ffn))   # (dim, ffn_dim)
        f = L.swiglu(g, L.linear(g, h, wg, hint="gate"), L.linear(g, h, wu, hint="up"))
        x = L.add(g, x, L.linear(g, f, wd, hint="down"))

    x = L.rms_norm(g, x, g.weight("output_norm.weight", (dim,)), eps)
    head = emb if cfg.get("tie_embeddings") else g.weight("output.weight", (cfg["vocab_size"], dim))
    g.outputs = (L.linear(g, x, head, hint="logits"),)
