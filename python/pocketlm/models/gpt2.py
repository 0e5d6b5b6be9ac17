"""GPT-2: learned absolute positions, LayerNorm with bias, GELU (tanh), biases everywhere.

Pre-norm decoder: LayerNorm -> multi-head attention (no RoPE) -> residual -> LayerNorm ->
GELU MLP -> residual; final LayerNorm and the output head, tied to the token embeddings.

Hugging Face stores GPT-2's projections as Conv1D weights, (in, out), with Q, K and V fused
in one `c_attn`; llama.cpp's GGUF stores them (out, in) but keeps `attn_qkv` fused. Both are
split into the canonical attn_q / attn_k / attn_v at import (`hf_tensors`, `gguf_tensors`).
"""

from __future__ import annotations

import math
import re

import numpy as np

from pocketlm.errors import UnsupportedModelError, shown
from pocketlm.ir.graph import Graph
from pocketlm.models import layers as L

ARCH = "gpt2"
GGUF_ARCHS = ("gpt2",)

# Every spelling of the tanh approximation transformers has: 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3))).
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _config(*, vocab: int, dim: int, n_layers: int, n_heads: int, ffn: int, eps: float,
            max_position: int, tie: bool, scale_weights: bool = True, scale_by_layer: bool = False) -> dict:
    if dim % n_heads:
        raise UnsupportedModelError(f"GPT-2 hidden size {dim} is not a multiple of {n_heads} heads")
    return {
        "vocab_size": vocab,
        "hidden_size": dim,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": n_heads,
        "head_dim": dim // n_heads,
        "ffn_dim": ffn,
        "norm_eps": eps,
        "max_position": max_position,
        "tie_embeddings": tie,
        # attention scores are scaled by 1/sqrt(head_dim) (scale_attn_weights) and, in some
        # checkpoints, also by 1/(layer + 1) (scale_attn_by_inverse_layer_idx)
        "scale_attn_weights": scale_weights,
        "scale_attn_by_inverse_layer_idx": scale_by_layer,
    }


def config_from_hf(d: dict) -> dict:
    act = d.get("activation_function", "gelu_new")
    if act not in TANH_GELUS:
        raise UnsupportedModelError(f"GPT-2 activation {shown(act)} is not supported ({', '.join(TANH_GELUS)} are)")
    if d.get("add_cross_attention"):
        raise UnsupportedModelError("GPT-2 with cross-attention (encoder-decoder) is not supported")
    dim = int(d.get("n_embd") or d["hidden_size"])
    return _config(
        vocab=int(d["vocab_size"]), dim=dim, n_layers=int(d.get("n_layer") or d["num_hidden_layers"]),
        n_heads=int(d.get("n_head") or d["num_attention_heads"]), ffn=int(d.get("n_inner") or 4 * dim),
        eps=float(d.get("layer_norm_epsilon", 1e-5)),
        max_position=int(d.get("n_positions") or d.get("max_position_embeddings") or 1024),
        tie=bool(d.get("tie_word_embeddings", True)),
        scale_weights=bool(d.get("scale_attn_weights", True)),
        scale_by_layer=bool(d.get("scale_attn_by_inverse_layer_idx", False)),
    )


def config_from_gguf(kv: dict) -> dict:
    def get(key, default=None):
        v = kv.get(f"gpt2.{key}", default)
        if v is None:
            raise UnsupportedModelError(f"GGUF metadata lacks gpt2.{key}")
        return v

    dim = int(get("embedding_length"))
    vocab = kv.get("gpt2.vocab_size") or len(kv.get("tokenizer.ggml.tokens", []))
    return _config(vocab=int(vocab), dim=dim, n_layers=int(get("block_count")),
                   n_heads=int(get("attention.head_count")), ffn=int(kv.get("gpt2.feed_forward_length") or 4 * dim),
                   eps=float(get("attention.layer_norm_epsilon", 1e-5)), max_position=int(get("context_length")),
                   tie=False)  # decided by the reader: no output.weight tensor -> tied


# HF name (after "transformer.") -> (canonical name, Conv1D weight stored (in, out) to transpose)
_HF_LAYER = {
    "ln_1.weight": ("attn_norm.weight", False),
    "ln_1.bias": ("attn_norm.bias", False),
    "attn.c_proj.weight": ("attn_output.weight", True),
    "attn.c_proj.bias": ("attn_output.bias", False),
    "ln_2.weight": ("ffn_norm.weight", False),
    "ln_2.bias": ("ffn_norm.bias", False),
    "mlp.c_fc.weight": ("ffn_up.weight", True),
    "mlp.c_fc.bias": ("ffn_up.bias", False),
    "mlp.c_proj.weight": ("ffn_down.weight", True),
    "mlp.c_proj.bias": ("ffn_down.bias", False),
}
_HF_GLOBAL = {
    "wte.weight": "token_embd.weight",
    "wpe.weight": "position_embd.weight",
    "ln_f.weight": "output_norm.weight",
    "ln_f.bias": "output_norm.bias",
    "lm_head.weight": "output.weight",
}
_LAYER_RE = re.compile(r"^h\.(\d+)\.(.+)$")


def _split_rows(name: str, n_rows: int, parts: tuple[str, ...]) -> list[tuple[str, slice]]:
    if n_rows % len(parts):
        raise UnsupportedModelError(f"fused tensor {shown(name)} has {n_rows} rows, not {len(parts)} equal parts")
    n = n_rows // len(parts)
    return [(p, slice(i * n, (i + 1) * n)) for i, p in enumerate(parts)]


def hf_tensors(name: str, shape: tuple[int, ...], cfg: dict) -> list:
    """Canonical pieces of a HF tensor: [(name, shape, transform(array) -> array)] (see models/__init__)."""
    short = name.removeprefix("transformer.")
    if short in _HF_GLOBAL:
        return [(_HF_GLOBAL[short], tuple(shape), None)]
    m = _LAYER_RE.match(short)
    if not m:
        raise UnsupportedModelError(f"unexpected tensor {shown(name)} for a {ARCH} checkpoint")
    p, rest = f"blk.{m.group(1)}.", m.group(2)
    if rest in ("attn.bias", "attn.masked_bias"):  # causal-mask buffers of old checkpoints
        return []
    if rest in _HF_LAYER:
        canon, conv1d = _HF_LAYER[rest]
        if conv1d:  # Conv1D (in, out) -> linear (out, in)
            return [(p + canon, (shape[1], shape[0]), lambda a: np.ascontiguousarray(a.T))]
        return [(p + canon, tuple(shape), None)]
    if rest in ("attn.c_attn.weight", "attn.c_attn.bias"):
        kind = rest.rsplit(".", 1)[1]
        out_rows = shape[-1]  # (in, 3*dim) weight or (3*dim,) bias
        pieces = []
        for canon, rows in _split_rows(name, out_rows, ("attn_q", "attn_k", "attn_v")):
            if kind == "weight":
                pieces.append((f"{p}{canon}.weight", (rows.stop - rows.start, shape[0]),
                               lambda a, rows=rows: np.ascontiguousarray(a[:, rows].T)))
            else:
                pieces.append((f"{p}{canon}.bias", (rows.stop - rows.start,),
                               lambda a, rows=rows: np.ascontiguousarray(a[rows])))
        return pieces
    raise UnsupportedModelError(f"unexpected tensor {shown(name)} for a {ARCH} checkpoint")


def gguf_tensors(name: str, shape: tuple[int, ...], cfg: dict, load_f32) -> list:
    """llama.cpp keeps Q, K, V fused in attn_qkv ((3*dim, dim), already (out, in)): split by rows."""
    m = re.match(r"^(blk\.\d+\.)attn_qkv\.(weight|bias)$", name)
    if not m:
        return [(name, None)]
    return [(f"{m.group(1)}{canon}.{m.group(2)}", rows)
            for canon, rows in _split_rows(name, shape[0], ("attn_q", "attn_k", "attn_v"))]


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    return L.declared_shapes(build, cfg)


def build(g: Graph, cfg: dict, max_positions: int) -> None:
    dim, n_heads, hd = cfg["hidden_size"], cfg["n_heads"], cfg["head_dim"]
    ffn, eps = cfg["ffn_dim"], cfg["norm_eps"]

    def norm(x: str, prefix: str) -> str:
        w = g.weight(prefix + ".weight", (dim,))  # (dim,)
        b = g.weight(prefix + ".bias", (dim,))    # (dim,)
        return L.layer_norm(g, x, w, b, eps)

    emb = g.weight("token_embd.weight", (cfg["vocab_size"], dim))  # (vocab, dim)
    pos = g.weight("position_embd.weight", (cfg["max_position"], dim))  # (max_position, dim)
    x = L.pos_embed(g, L.embed(g, emb), pos)

    for i in range(cfg["n_layers"]):
        p = f"blk.{i}."
        h = norm(x, p + "attn_norm")
        qkv = []
        for name in ("attn_q", "attn_k", "attn_v"):
            w = g.weight(p + name + ".weight", (dim, dim))  # (n_heads*head_dim, dim)
            b = g.weight(p + name + ".bias", (dim,))        # (n_heads*head_dim,)
            qkv.append(L.linear(g, h, w, b, name[-1]))
        scale = 1.0 / math.sqrt(hd) if cfg.get("scale_attn_weights", True) else 1.0
        if cfg.get("scale_attn_by_inverse_layer_idx"):
            scale /= i + 1
        a = L.attention(g, *qkv, layer=i, n_heads=n_heads, n_kv_heads=n_heads, head_dim=hd, scale=scale)
        wo = g.weight(p + "attn_output.weight", (dim, dim))  # (dim, n_heads*head_dim)
        bo = g.weight(p + "attn_output.bias", (dim,))        # (dim,)
        x = L.add(g, x, L.linear(g, a, wo, bo, "o"))

        h = norm(x, p + "ffn_norm")
        wu = g.weight(p + "ffn_up.weight", (ffn, dim))    # (ffn_dim, dim)
        bu = g.weight(p + "ffn_up.bias", (ffn,))          # (ffn_dim,)
        wd = g.weight(p + "ffn_down.weight", (dim, ffn))  # (dim, ffn_dim)
        bd = g.weight(p + "ffn_down.bias", (dim,))        # (dim,)
        f = L.gelu(g, L.linear(g, h, wu, bu, "up"))
        x = L.add(g, x, L.linear(g, f, wd, bd, "down"))

    x = norm(x, "output_norm")
    head = emb if cfg.get("tie_embeddings") else g.weight("output.weight", (cfg["vocab_size"], dim))
    g.outputs = (L.linear(g, x, head, hint="logits"),)
