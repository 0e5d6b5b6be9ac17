"""BERT-family encoders (sentence-transformers embedding models such as all-MiniLM-L6-v2).

Post-norm encoder: token + learned position + token-type (type 0) embeddings -> LayerNorm; each
layer: bidirectional multi-head attention -> residual -> LayerNorm -> GELU (erf) MLP -> residual ->
LayerNorm. The output is every token's final hidden state (no head): `Engine.embed` pools them as
the checkpoint's sentence-transformers modules say (modules.json: Pooling, Normalize), read into
the config as `pooling` and `normalize`.

The token-type embedding of type 0 (every token of a single text) is stored as a table of
max_position rows, each that embedding, and added like the position table.
"""

from __future__ import annotations

import math
import re

import numpy as np

from pocketlm.errors import UnsupportedModelError, shown
from pocketlm.ir.graph import Graph
from pocketlm.models import layers as L

ARCH = "bert"
GGUF_ARCHS: tuple[str, ...] = ()

_GELUS = {"gelu": True, "gelu_new": False, "gelu_pytorch_tanh": False}  # name -> exact (erf)


def config_from_hf(d: dict) -> dict:
    act = d.get("hidden_act", "gelu")
    if act not in _GELUS:
        raise UnsupportedModelError(f"BERT activation {shown(act)} is not supported ({', '.join(_GELUS)} are)")
    if d.get("position_embedding_type", "absolute") != "absolute":
        raise UnsupportedModelError(f"BERT position embeddings {shown(d.get('position_embedding_type'))} are not "
                                    "supported (absolute are)")
    dim, n_heads = int(d["hidden_size"]), int(d["num_attention_heads"])
    if dim % n_heads:
        raise UnsupportedModelError(f"BERT hidden size {dim} is not a multiple of {n_heads} heads")
    return {
        "vocab_size": int(d["vocab_size"]),
        "hidden_size": dim,
        "n_layers": int(d["num_hidden_layers"]),
        "n_heads": n_heads,
        "n_kv_heads": n_heads,
        "head_dim": dim // n_heads,
        "ffn_dim": int(d["intermediate_size"]),
        "norm_eps": float(d.get("layer_norm_eps", 1e-12)),
        "max_position": int(d.get("max_position_embeddings", 512)),
        "gelu_exact": _GELUS[act],
        "encoder": True,
        "pooling": "mean",     # sentence-transformers' default; read_hf sets what modules.json says
        "normalize": False,
    }


def config_from_gguf(kv: dict) -> dict:
    raise UnsupportedModelError("BERT from GGUF is not supported: convert the Hugging Face folder")


_HF_GLOBAL = {
    "embeddings.word_embeddings.weight": "token_embd.weight",
    "embeddings.position_embeddings.weight": "position_embd.weight",
    "embeddings.LayerNorm.weight": "token_embd_norm.weight",
    "embeddings.LayerNorm.bias": "token_embd_norm.bias",
}
_HF_LAYER = {
    "attention.self.query": "attn_q",
    "attention.self.key": "attn_k",
    "attention.self.value": "attn_v",
    "attention.output.dense": "attn_output",
    "attention.output.LayerNorm": "attn_output_norm",
    "intermediate.dense": "ffn_up",
    "output.dense": "ffn_down",
    "output.LayerNorm": "layer_output_norm",
}
_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")


def hf_tensors(name: str, shape: tuple[int, ...], cfg: dict) -> list:
    short = name.removeprefix("bert.")
    if short in _HF_GLOBAL:
        return [(_HF_GLOBAL[short], tuple(shape), None)]
    if short == "embeddings.token_type_embeddings.weight":
        rows = cfg["max_position"]
        return [("token_types.weight", (rows, shape[1]),
                 lambda a: np.ascontiguousarray(np.broadcast_to(a[0], (rows, a.shape[1]))))]
    if short.startswith("pooler.") or short == "embeddings.position_ids" or short.startswith("cls."):
        return []  # the pooler and MLM heads: sentence embeddings do not use them
    m = _LAYER_RE.match(short)
    if m and m.group(2) in _HF_LAYER:
        return [(f"blk.{m.group(1)}.{_HF_LAYER[m.group(2)]}.{m.group(3)}", tuple(shape), None)]
    raise UnsupportedModelError(f"unexpected tensor {shown(name)} for a {ARCH} checkpoint")


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    return L.declared_shapes(build, cfg)


def build(g: Graph, cfg: dict, max_positions: int) -> None:
    dim, n_heads, hd = cfg["hidden_size"], cfg["n_heads"], cfg["head_dim"]
    ffn, eps, exact = cfg["ffn_dim"], cfg["norm_eps"], bool(cfg.get("gelu_exact", True))

    def norm(x: str, prefix: str) -> str:
        return L.layer_norm(g, x, g.weight(prefix + ".weight", (dim,)), g.weight(prefix + ".bias", (dim,)), eps)

    def linear(x: str, prefix: str, rows: int, cols: int, hint: str) -> str:
        return L.linear(g, x, g.weight(prefix + ".weight", (rows, cols)), g.weight(prefix + ".bias", (rows,)), hint)

    emb = g.weight("token_embd.weight", (cfg["vocab_size"], dim))
    x = L.pos_embed(g, L.embed(g, emb), g.weight("position_embd.weight", (cfg["max_position"], dim)))
    x = L.pos_embed(g, x, g.weight("token_types.weight", (cfg["max_position"], dim)))
    x = norm(x, "token_embd_norm")
    for i in range(cfg["n_layers"]):
        p = f"blk.{i}."
        q, k, v = (linear(x, p + name, dim, dim, name[-1]) for name in ("attn_q", "attn_k", "attn_v"))
        a = L.attention(g, q, k, v, layer=i, n_heads=n_heads, n_kv_heads=n_heads, head_dim=hd,
                        scale=1.0 / math.sqrt(hd), causal=False)
        x = norm(L.add(g, x, linear(a, p + "attn_output", dim, dim, "o")), p + "attn_output_norm")
        h = L.gelu(g, linear(x, p + "ffn_up", ffn, dim, "up"), exact=exact)
        x = norm(L.add(g, x, linear(h, p + "ffn_down", dim, ffn, "down")), p + "layer_output_norm")
    g.outputs = (x,)
