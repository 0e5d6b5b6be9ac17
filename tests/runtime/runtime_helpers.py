"""Helpers for the executor tests: a tiny program builder and numpy references of the ops."""

from __future__ import annotations

import numpy as np

from pocketlm import _core
from pocketlm.dtypes import DType

try:
    from pocketlm import quant
except ImportError:  # pragma: no cover - quant lands with the converter
    quant = None

ROWS_T = -1


def encode_weight(w: np.ndarray, dtype: DType) -> tuple[np.ndarray, np.ndarray]:
    """(stored bytes, the f32 values the kernels see) of a 2-D f32 weight."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if dtype == DType.F32:
        return w.reshape(-1).view(np.uint8).copy(), w.copy()
    if dtype == DType.F16:
        h = w.astype("<f2")
        return h.reshape(-1).view(np.uint8).copy(), h.astype(np.float32)
    assert quant is not None, "pocketlm.quant is needed for quantized weights"
    raw = quant.quantize(w, dtype)
    return raw, quant.dequantize(raw, dtype, w.shape)


class ProgramBuilder:
    """Builds the (tensors, ops) lists that _core.Program takes, with a bump allocator for
    the arena (64-byte aligned)."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.tensors: list[dict] = []
        self.ops: list[tuple] = []
        self.arena_bytes = 0
        self._tokens: int | None = None

    def _add(self, desc: dict) -> int:
        self.tensors.append(desc)
        return len(self.tensors) - 1

    def arena(self, cols: int, rows: int = ROWS_T) -> int:
        offset = self.arena_bytes
        n_rows = self.max_tokens if rows == ROWS_T else rows
        self.arena_bytes += (n_rows * cols * 4 + 63) // 64 * 64
        return self._add({"kind": "arena", "rows": rows, "cols": cols, "offset": offset})

    def weight(self, w: np.ndarray, dtype: DType = DType.F32) -> tuple[int, np.ndarray]:
        """Adds an inline weight; returns (tensor id, the dequantized values)."""
        w = np.atleast_2d(w)
        raw, seen = encode_weight(w, dtype)
        tid = self._add({"kind": "weight", "rows": w.shape[0], "cols": w.shape[1],
                         "dtype": int(dtype), "data": raw})
        return tid, seen

    def const(self, data: np.ndarray) -> int:
        data = np.atleast_2d(np.asarray(data, dtype=np.float32))
        return self._add({"kind": "const", "rows": data.shape[0], "cols": data.shape[1],
                          "data": np.ascontiguousarray(data)})

    def tokens(self) -> int:
        """The tokens tensor (there is one per program)."""
        if self._tokens is None:
            self._tokens = self._add({"kind": "tokens"})
        return self._tokens

    def op(self, name: str, inputs, outputs, iparams=(), fparams=()) -> None:
        self.ops.append((name, list(inputs), list(outputs), list(iparams), list(fparams)))

    def program(self, output: int, kv=(0, 0, 0), n_threads: int = 1, bundle=None, **kw):
        kw.setdefault("activations", ACTIVATIONS["mode"])
        return _core.Program(bundle, self.tensors, self.ops, self.arena_bytes, self.max_tokens,
                             kv, output, n_threads, **kw)


# ---- numpy references ----------------------------------------------------------------------


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    return (x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + eps) * w).astype(np.float32)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def rope_table(max_pos: int, rope_dim: int, theta: float = 10000.0) -> np.ndarray:
    inv = theta ** (-np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)
    ang = np.arange(max_pos, dtype=np.float64)[:, None] * inv[None, :]
    return np.concatenate([np.cos(ang), np.sin(ang)], axis=1).astype(np.float32)


def rope(x: np.ndarray, table: np.ndarray, pos0: int, n_heads: int, head_dim: int,
         rope_dim: int) -> np.ndarray:
    """NeoX / rotate_half pairing: dims i and i + rope_dim/2 rotate together."""
    t = x.shape[0]
    half = rope_dim // 2
    xh = x.reshape(t, n_heads, head_dim).astype(np.float64)
    cos = table[pos0:pos0 + t, :half][:, None, :]
    sin = table[pos0:pos0 + t, half:][:, None, :]
    out = xh.copy()
    a, b = xh[..., :half], xh[..., half:rope_dim]
    out[..., :half] = a * cos - b * sin
    out[..., half:rope_dim] = b * cos + a * sin
    return out.reshape(t, n_heads * head_dim).astype(np.float32)


def attention(q: np.ndarray, k_all: np.ndarray, v_all: np.ndarray, pos0: int, n_heads: int,
              n_kv_heads: int, head_dim: int, scale: float) -> np.ndarray:
    """q: [T, Hq*Dh] at positions pos0..; k_all, v_all: [pos0+T, Hkv*Dh] (the whole cache)."""
    t = q.shape[0]
    group = n_heads // n_kv_heads
    qh = q.reshape(t, n_heads, head_dim).astype(np.float64)
    kh = k_all.reshape(-1, n_kv_heads, head_dim).astype(np.float64)
    vh = v_all.reshape(-1, n_kv_heads, head_dim).astype(np.float64)
    out = np.zeros((t, n_heads, head_dim))
    for h in range(n_heads):
        g = h // group
        s = qh[:, h, :] @ kh[:, g, :].T * scale  # [T, P]
        p_idx = np.arange(kh.shape[0])[None, :]
        s = np.where(p_idx <= pos0 + np.arange(t)[:, None], s, -np.inf)
        s = np.exp(s - s.max(axis=1, keepdims=True))
        s /= s.sum(axis=1, keepdims=True)
        out[:, h, :] = s @ vh[:, g, :]
    return out.reshape(t, n_heads * head_dim).astype(np.float32)


# Activation mode of the programs the tests build ("int8" or "int8x2"); tests/runtime/conftest.py
# runs every test under both.
ACTIVATIONS = {"mode": "int8x2"}


def _q8(xb: np.ndarray, d: np.ndarray | None = None) -> np.ndarray:
    """Each block of 32 quantized at the scale d (default its own, amax/127), dequantized."""
    if d is None:
        d = np.max(np.abs(xb), axis=1, keepdims=True) / np.float32(127.0)
    inv = np.divide(np.float32(1.0), d, out=np.zeros_like(d), where=d != 0)
    v = xb * inv
    q = np.clip(np.sign(v) * np.floor(np.abs(v) + np.float32(0.5)), -127, 127)
    return (q * d).astype(np.float32)


def quantize_act(x: np.ndarray) -> np.ndarray:
    """x as the integer matmuls see it: blocks of 32 with d = amax/127, q = round-half-away;
    in "int8x2" mode plus the residual quantized the same way at the scale d/256 (kernels.h BlockQ8A2)."""
    xb = np.asarray(x, np.float32).reshape(-1, 32)
    first = _q8(xb)
    if ACTIVATIONS["mode"] == "int8x2":
        d = np.max(np.abs(xb), axis=1, keepdims=True) / np.float32(127.0)
        first = first + _q8((xb.astype(np.float64) - first).astype(np.float32), d * np.float32(1 / 256))
    return first.reshape(x.shape)


def matmul(x: np.ndarray, w_seen: np.ndarray, dtype: DType = DType.F32) -> np.ndarray:
    """x @ W^T with W as dequantized and x quantized as the kernels do for dtype."""
    xs = quantize_act(x) if DType(dtype).quantized else x
    return (xs.astype(np.float64) @ w_seen.T.astype(np.float64)).astype(np.float32)


def max_rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def attention_program(q, k, v, n_heads, n_kv_heads, head_dim, max_tokens, iparams, fparams, n_threads,
                      n_layers=1):
    """q|k|v rows fed by token id (row i for token i), split with identity matmuls, into one attention op
    (iparams: its layer, heads, head_dim, ...)."""
    qkv = np.concatenate([q, k, v], axis=1)
    nq, nk = q.shape[1], k.shape[1]
    b = ProgramBuilder(max_tokens=max_tokens)
    e, _ = b.weight(qkv)
    rows = b.arena(qkv.shape[1])
    b.op("embed", [e, b.tokens()], [rows])
    eye = np.eye(qkv.shape[1], dtype=np.float32)
    qa, ka, va, o = b.arena(nq), b.arena(nk), b.arena(nk), b.arena(nq)
    wq, _ = b.weight(eye[:nq])
    wk, _ = b.weight(eye[nq:nq + nk])
    wv, _ = b.weight(eye[nq + nk:])
    b.op("matmul_multi", [rows, wq, -1, wk, -1, wv, -1], [qa, ka, va])
    b.op("attention", [qa, ka, va], [o], iparams=iparams, fparams=fparams)
    return b.program(o, kv=(n_layers, n_kv_heads, head_dim), n_threads=n_threads)
