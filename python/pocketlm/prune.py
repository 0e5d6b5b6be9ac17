"""Pruning at conversion: which weights of a dense model become zero (docs/quant.md, "Pruning").

`pocketlm convert SRC --prune 2:4|50%|... --prune-method wanda|magnitude [--calibration FILE]`.

What is pruned: the linear weights of the transformer blocks (`blk.N.attn_q/attn_k/attn_v/
attn_output/ffn_gate/ffn_up/ffn_down.weight`, and the fused `attn_qkv`/`ffn_up` of the
architectures that store them so), never the token embeddings, the output head, norms or biases:
the embeddings and head are read a row at a time or carry every logit, and pruning them costs far
more than the blocks (Wanda and SparseGPT leave them dense too).

Patterns:
  N:M  (2:4, 4:8, ...)  in every run of M consecutive weights of a row (along the input, K), the N
                        with the highest scores are kept: semi-structured sparsity, what sparse
                        kernels can skip in fixed steps. Needs K % M == 0.
  P%   (50%, 60%, ...)  in each row (one output channel), the round(P/100 * K) weights with the
                        lowest scores become zero: unstructured, per output as Wanda compares.

Scores (ties: the lower input index is kept first, so a mask is deterministic):
  magnitude  |W[n, k]|
  wanda      |W[n, k]| * ||X[:, k]||_2 (Sun et al. 2023, "A Simple and Effective Pruning Approach
             for Large Language Models"): X is the layer's input over the calibration tokens, so an
             input channel that carries large activations protects its weights. The norms are
             collected by running pocketlm itself (the dense model, before pruning) over the
             calibration text: `input_norms`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# The block linear weights pruning applies to (canonical GGUF-style names).
PRUNABLE = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_v|attn_qkv|attn_output|ffn_gate|ffn_up|ffn_down)\.weight")
METHODS = ("wanda", "magnitude")
CALIBRATION_TOKENS = 2048   # default tokens of calibration text Wanda runs (the paper: 128 x 2048)
CALIBRATION_CHUNK = 512     # tokens per forward pass (a fresh context each)


@dataclass(frozen=True)
class PruneSpec:
    n: int = 0            # N:M: keep n of every m
    m: int = 0
    fraction: float = 0.0  # unstructured: the share of each row set to zero
    method: str = "wanda"

    @property
    def label(self) -> str:
        return f"{self.n}:{self.m}" if self.m else f"{self.fraction * 100:g}%"

    @property
    def sparsity(self) -> float:
        return 1 - self.n / self.m if self.m else self.fraction

    def describe(self) -> dict:
        return {"pattern": self.label, "method": self.method, "sparsity": self.sparsity}


def parse_prune(text: str, method: str = "wanda") -> PruneSpec:
    """'2:4' (N:M, 0 < N < M <= 64) or '50%' (1..99 %); method wanda or magnitude. ValueError else."""
    if method not in METHODS:
        raise ValueError(f"prune method must be one of {', '.join(METHODS)}, got {method!r}")
    s = str(text).strip()
    m = re.fullmatch(r"(\d+):(\d+)", s)
    if m:
        n, mm = int(m.group(1)), int(m.group(2))
        if not 0 < n < mm <= 64:
            raise ValueError(f"--prune {s}: N:M needs 0 < N < M <= 64 (2:4 keeps two weights of every four)")
        return PruneSpec(n=n, m=mm, method=method)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)%", s)
    if m:
        pct = float(m.group(1))
        if not 1 <= pct <= 99:
            raise ValueError(f"--prune {s}: a percentage of weights to remove, 1% to 99%")
        return PruneSpec(fraction=pct / 100, method=method)
    raise ValueError(f"--prune {s!r}: expected N:M (2:4) or a percentage (50%)")


def prunable(name: str) -> bool:
    return PRUNABLE.fullmatch(name) is not None


def keep_mask(scores: np.ndarray, spec: PruneSpec) -> np.ndarray:
    """Boolean [rows, K]: True where a weight is kept. Highest scores are kept; on equal scores the
    lower input index wins (a stable sort), so the mask is reproducible."""
    rows, k = scores.shape
    if spec.m:
        if k % spec.m:
            raise ValueError(f"an {spec.label} pattern needs rows whose length is a multiple of {spec.m}, got {k}")
        g = scores.reshape(rows, k // spec.m, spec.m)
        # rank within each group: order by descending score, ties by index (stable on -score)
        order = np.argsort(-g, axis=2, kind="stable")
        keep = np.zeros_like(g, dtype=bool)
        np.put_along_axis(keep, order[:, :, :spec.n], True, axis=2)
        return keep.reshape(rows, k)
    drop = int(round(spec.fraction * k))
    # ascending scores, the first `drop` go; on ties the higher index goes first (the lower one is
    # kept, as in the N:M case): a stable sort of the reversed row
    order = k - 1 - np.argsort(scores[:, ::-1], axis=1, kind="stable")
    keep = np.ones((rows, k), dtype=bool)
    np.put_along_axis(keep, order[:, :drop], False, axis=1)
    return keep


def prune(w: np.ndarray, spec: PruneSpec, norms: np.ndarray | None = None) -> np.ndarray:
    """w [rows, K] float32 with the pruned weights set to zero. `norms` [K]: the input channels'
    L2 norms over the calibration tokens (wanda); ignored for magnitude."""
    w = np.asarray(w, dtype=np.float32)
    scores = np.abs(w)
    if spec.method == "wanda":
        if norms is None or norms.shape != (w.shape[1],):
            raise ValueError(f"wanda needs the {w.shape[1]} input norms of this weight")
        scores = scores * norms.astype(np.float32)[None, :]
    return np.where(keep_mask(scores, spec), w, np.float32(0))


def zero_fraction(w: np.ndarray) -> float:
    return float(np.mean(w == 0)) if w.size else 0.0


def input_norms(bundle_path, tokens: np.ndarray, names: list[str], threads: int = 2,
                progress=None) -> dict[str, np.ndarray]:
    """For each weight name in `names`: the L2 norm of each of its matmul's input columns over
    `tokens`, run through the bundle by pocketlm in windows of CALIBRATION_CHUNK tokens (each a
    fresh context). Weights that read the same input (q, k and v; gate and up) share one run: the
    graph is cut at that input (its output made the matmul's input, the rest removed as dead code)."""
    from pocketlm import _core
    from pocketlm.bundle import read_bundle
    from pocketlm.engine import CompiledModel
    from pocketlm.passes.dce import matmul_input_output

    bundle = read_bundle(bundle_path)
    trained = int(bundle.metadata.get("config", {}).get("max_position") or CALIBRATION_CHUNK)
    chunk = max(1, min(CALIBRATION_CHUNK, int(len(tokens)), trained))
    windows = [tokens[i:i + chunk] for i in range(0, len(tokens), chunk)]  # the last one may be shorter
    out: dict[str, np.ndarray] = {}
    wanted = set(names)
    done = 0
    for name in names:
        if name in out:
            continue
        cm = CompiledModel(bundle, max_context=chunk, prefill_chunk=chunk, threads=threads,
                           all_logits=True, activations="int8x2", tap=name)
        shared = cm.tap_weights
        sq = None
        for w in windows:
            state = _core.State(cm.program, chunk, "f32")
            x = np.asarray(state.run(np.ascontiguousarray(w, dtype=np.int32), 0), dtype=np.float64)
            if x.shape[0] != len(w):
                raise RuntimeError(f"tap of {name}: {x.shape[0]} rows for {len(w)} tokens")
            sq = (x * x).sum(axis=0) if sq is None else sq + (x * x).sum(axis=0)
        norms = np.sqrt(sq).astype(np.float32)
        for s in shared:
            if s in wanted:
                out[s] = norms
        done += 1
        if progress is not None:
            progress(done, name)
    return out
