"""Shared layer helpers. Model files build graphs only through these.

Every helper takes and returns value names of a ``Graph``; shapes are checked as
the graph is built, so a wrong weight map fails at compile time with a name.
"""

from __future__ import annotations

import math

from pocketlm.ir.graph import T, Graph


def embed(g: Graph, table: str, tokens: str = "tokens") -> str:
    _, dim = g.shape(table)
    return g.emit("embed", [table, tokens], [(T, dim)], "x")[0]


def rms_norm(g: Graph, x: str, weight: str, eps: float) -> str:
    rows, cols = g.shape(x)
    _expect(g, weight, cols)
    return g.emit("rms_norm", [x, weight], [(rows, cols)], "norm", eps=float(eps))[0]


def layer_norm(g: Graph, x: str, weight: str, bias: str, eps: float) -> str:
    """(x - mean) / sqrt(var + eps) * weight + bias, per row."""
    rows, cols = g.shape(x)
    _expect(g, weight, cols)
    _expect(g, bias, cols)
    return g.emit("layer_norm", [x, weight, bias], [(rows, cols)], "norm", eps=float(eps))[0]


def pos_embed(g: Graph, x: str, table: str) -> str:
    """x + table[position of each row]: learned absolute position embeddings."""
    rows, cols = g.shape(x)
    _, tcols = g.shape(table)
    if tcols != cols:
        raise ValueError(f"pos_embed: {table} has {tcols} columns, activation {x} has {cols}")
    return g.emit("pos_embed", [x, table], [(rows, cols)], "x")[0]


def gelu(g: Graph, x: str, exact: bool = False) -> str:
    """GELU: the tanh approximation (HF "gelu_new" / "gelu_pytorch_tanh"), or with exact=True the erf
    form (HF "gelu", BERT)."""
    return g.emit("gelu", [x], [g.shape(x)], "act", **({"exact": 1} if exact else {}))[0]


def linear(g: Graph, x: str, weight: str, bias: str | None = None, hint: str = "y") -> str:
    rows, k = g.shape(x)
    n, wk = g.shape(weight)
    if wk != k:
        raise ValueError(f"linear: {weight} has {wk} inputs, activation {x} has {k}")
    inputs = [x, weight]
    if bias is not None:
        _expect(g, bias, n)
        inputs.append(bias)
    return g.emit("matmul", inputs, [(rows, n)], hint)[0]


def add(g: Graph, a: str, b: str) -> str:
    if g.shape(a) != g.shape(b):
        raise ValueError(f"add: shapes {g.shape(a)} and {g.shape(b)} differ")
    return g.emit("add", [a, b], [g.shape(a)], "res")[0]


def swiglu(g: Graph, gate: str, up: str) -> str:
    """silu(gate) * up."""
    if g.shape(gate) != g.shape(up):
        raise ValueError("swiglu: gate and up shapes differ")
    return g.emit("swiglu", [gate, up], [g.shape(gate)], "act")[0]


def rope_table(g: Graph, *, head_dim: int, rope_dim: int, theta: float, max_positions: int,
               scaling: dict | None = None, freq_factors: str | None = None) -> str:
    """A (max_positions, rope_dim) table of cos | sin, computed by constant folding."""
    inputs = [freq_factors] if freq_factors else []
    return g.emit("rope_table", inputs, [(max_positions, rope_dim)], "rope_table",
                  head_dim=head_dim, rope_dim=rope_dim, theta=float(theta),
                  max_positions=max_positions, scaling=_frozen(scaling or {}))[0]


def rope(g: Graph, x: str, table: str, n_heads: int, head_dim: int, rope_dim: int) -> str:
    rows, cols = g.shape(x)
    if cols != n_heads * head_dim:
        raise ValueError(f"rope: {x} has {cols} columns, expected {n_heads}x{head_dim}")
    if rope_dim % 2 or not 2 <= rope_dim <= head_dim:  # rotates pairs within each head
        raise ValueError(f"rope: rope_dim {rope_dim} must be even and in 2..head_dim ({head_dim})")
    return g.emit("rope", [x, table], [(rows, cols)], "rope",
                  n_heads=n_heads, head_dim=head_dim, rope_dim=rope_dim)[0]


def attention(g: Graph, q: str, k: str, v: str, *, layer: int, n_heads: int, n_kv_heads: int,
              head_dim: int, scale: float, window: int | None = None,
              softcap: float | None = None, causal: bool = True) -> str:
    """Causal attention with a KV cache; grouped-query when n_kv_heads < n_heads.

    causal=False (encoders): every row sees every position of its sequence up to the step's last
    row, so a text must run in one step (Engine gives encoders a chunk of their whole context).
    window: each row sees only the last `window` positions, itself included (sliding-window
    layers; their KV cache keeps only those). softcap: scores become cap * tanh(scores / cap)
    before the softmax (Gemma 2).
    """
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}")
    # Config values (a bundle's): caught here with a name rather than by the executor's op check.
    if window is not None and window < 0:
        raise ValueError(f"attention: window {window} must be >= 0 (0 = full attention)")
    if softcap is not None and not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"attention: softcap {softcap} must be finite and >= 0")
    rows, _ = g.shape(q)
    extra = {}
    if window:
        extra["window"] = int(window)
    if softcap:
        extra["softcap"] = float(softcap)
    if not causal:
        extra["causal"] = 0
    return g.emit("attention", [q, k, v], [(rows, n_heads * head_dim)], "attn",
                  layer=layer, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
                  scale=float(scale), **extra)[0]


def head_rms_norm(g: Graph, x: str, weight: str, n_heads: int, head_dim: int, eps: float) -> str:
    """RMSNorm of every head_dim slice of x (Qwen3 / Gemma 3 q and k norms); weight (head_dim,)."""
    rows, cols = g.shape(x)
    if cols != n_heads * head_dim:
        raise ValueError(f"head_rms_norm: {x} has {cols} columns, expected {n_heads}x{head_dim}")
    _expect(g, weight, head_dim)
    return g.emit("head_rms_norm", [x, weight], [(rows, cols)], "qk_norm",
                  n_heads=n_heads, head_dim=head_dim, eps=float(eps))[0]


def geglu(g: Graph, gate: str, up: str) -> str:
    """gelu(gate) * up, GELU in its tanh approximation (Gemma's gelu_pytorch_tanh)."""
    if g.shape(gate) != g.shape(up):
        raise ValueError("geglu: gate and up shapes differ")
    return g.emit("geglu", [gate, up], [g.shape(gate)], "act")[0]


def scale(g: Graph, x: str, s: float) -> str:
    """x * s (Gemma's sqrt(hidden) embedding scale)."""
    return g.emit("scale", [x], [g.shape(x)], "x", s=float(s))[0]


def softcap(g: Graph, x: str, cap: float) -> str:
    """cap * tanh(x / cap) (Gemma 2 final logit soft-capping)."""
    if not (math.isfinite(cap) and cap > 0):
        raise ValueError(f"softcap: cap {cap} must be finite and > 0")
    return g.emit("softcap", [x], [g.shape(x)], "capped", cap=float(cap))[0]


def _frozen(d: dict) -> tuple:
    """A dict as a sorted tuple of pairs, lists (LongRoPE factors) as tuples: node attrs stay immutable."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))


def _expect(g: Graph, vec: str, n: int) -> None:
    _, cols = g.shape(vec)
    if cols != n:
        raise ValueError(f"{vec} has {cols} elements, expected {n}")


def declared_shapes(build, cfg: dict) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of exactly the weights a model's `build` declares (for the modules
    whose tensors are not the llama family's: their `tensor_shapes`)."""
    g = Graph()
    build(g, cfg, max_positions=1)
    return {name: w.shape for name, w in g.weights.items()}
