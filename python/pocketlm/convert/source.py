"""What a source reader hands to the converter: tensors under canonical names, plus everything
the bundle's metadata needs. Readers (hf.py, gguf_source.py) fill it; converter.py writes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from pocketlm.dtypes import DType
from pocketlm.errors import BundleError, ConversionError, shown

# Sampling defaults when the source does not say (docs/quant.md, "Metadata").
DEFAULT_GENERATION = {
    "temperature": 0.7,
    "top_k": 40,
    "top_p": 0.95,
    "min_p": 0.05,
    "repetition_penalty": 1.0,
    "max_tokens": 512,
}

@dataclass
class SourceTensor:
    """One weight under its canonical name, readable on demand.

    `load_f32()` decodes it to float32 of `shape`. `native`, when set, is a pocketlm type the
    source already stores bit-exactly (GGUF F32/F16/Q8_0/Q4_0/Q4_1), with `load_native()`
    returning those bytes, so keeping the type costs no precision and no re-quantization.
    """

    name: str
    shape: tuple[int, ...]  # outermost first: a linear weight is (out, in)
    load_f32: Callable[[], np.ndarray]
    source_type: str  # e.g. "bf16", "Q4_K": for messages and provenance
    native: DType | None = None
    load_native: Callable[[], np.ndarray] | None = None


@dataclass
class SourceModel:
    architecture: str
    config: dict
    tensors: list[SourceTensor]
    tokenizer_json: str
    chat_template: str | None
    special_tokens: dict
    generation: dict
    source_format: str  # "hf" | "gguf"
    source_name: str
    source_sha256: str
    # GGUF types pocketlm cannot store, for quant=None: canonical name -> DType to requantize to.
    keep_fallback: dict[str, DType] = field(default_factory=dict)


def expected_shapes(cfg: dict, arch: str = "llama") -> dict[str, tuple[int, ...]]:
    """Canonical tensor name -> shape: the architecture's `tensor_shapes(cfg)` if it has one,
    else the llama family's (llama, qwen2, phi3 after splitting its fused tensors)."""
    from pocketlm import models

    module = models.get(arch)
    if hasattr(module, "tensor_shapes"):
        return module.tensor_shapes(cfg)
    dim, vocab, ffn = cfg["hidden_size"], cfg["vocab_size"], cfg["ffn_dim"]
    q_rows = cfg["n_heads"] * cfg["head_dim"]
    kv_rows = cfg["n_kv_heads"] * cfg["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (vocab, dim),
        "output_norm.weight": (dim,),
    }
    if not cfg["tie_embeddings"]:
        shapes["output.weight"] = (vocab, dim)
    if cfg.get("rope_freq_factors"):
        shapes["rope_freqs.weight"] = (cfg["rope_dim"] // 2,)
    for i in range(cfg["n_layers"]):
        p = f"blk.{i}."
        shapes[p + "attn_norm.weight"] = (dim,)
        shapes[p + "attn_q.weight"] = (q_rows, dim)
        shapes[p + "attn_k.weight"] = (kv_rows, dim)
        shapes[p + "attn_v.weight"] = (kv_rows, dim)
        if cfg["attn_bias"]:
            shapes[p + "attn_q.bias"] = (q_rows,)
            shapes[p + "attn_k.bias"] = (kv_rows,)
            shapes[p + "attn_v.bias"] = (kv_rows,)
        shapes[p + "attn_output.weight"] = (dim, q_rows)
        shapes[p + "ffn_norm.weight"] = (dim,)
        shapes[p + "ffn_gate.weight"] = (ffn, dim)
        shapes[p + "ffn_up.weight"] = (ffn, dim)
        shapes[p + "ffn_down.weight"] = (dim, ffn)
    return shapes


def check_tensors(tensors: list[SourceTensor], cfg: dict, origin: str, arch: str = "llama") -> None:
    """Every tensor the config implies is present with the right shape, and nothing else."""
    want = expected_shapes(cfg, arch)
    have = {t.name: t for t in tensors}
    if len(have) != len(tensors):
        raise ConversionError(f"{origin}: duplicate tensor names after renaming")
    for name, t in have.items():
        if name not in want:
            raise ConversionError(
                f"{origin}: unexpected tensor {shown(name)} for this {cfg.get('n_layers')}-layer config")
        if tuple(t.shape) != want[name]:
            raise ConversionError(
                f"{origin}: tensor {shown(name)} has shape {list(t.shape)}, the config implies {list(want[name])}"
            )
    missing = [n for n in want if n not in have]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ConversionError(f"{origin}: missing tensors {', '.join(missing[:3])}{more}")


def check_config_ranges(cfg: dict, tensor_dims: list[tuple[int, ...]], origin: str) -> None:
    """The values a model config gives, in range. Sizes against the tensor table, before any list,
    graph or buffer is sized by them: at most one layer per tensor, and every size (vocabulary,
    widths, heads, head size) between 1 and the largest tensor dimension, since each is some
    tensor's. Norm epsilons a positive normal float32 (the kernels' type), RoPE bases finite and
    >= 1. `origin` names the file in the message."""
    largest = max((d for dims in tensor_dims for d in dims), default=0)
    n_layers = cfg.get("n_layers")
    if not isinstance(n_layers, int) or not 1 <= n_layers <= len(tensor_dims):
        raise BundleError(f"{origin}: the config gives {n_layers!r} layers; it must be 1..{len(tensor_dims)} "
                          "(each layer has tensors)")
    for key in ("vocab_size", "hidden_size", "n_heads", "n_kv_heads", "head_dim", "ffn_dim"):
        v = cfg.get(key)
        if v is not None and (not isinstance(v, int) or not 1 <= v <= largest):
            raise BundleError(f"{origin}: the config gives {key} = {v!r}; it must be an integer in 1..{largest} "
                              "(the largest tensor dimension)")
    n_heads, n_kv_heads = cfg.get("n_heads"), cfg.get("n_kv_heads")
    if n_heads and n_kv_heads and n_heads % n_kv_heads:
        raise BundleError(f"{origin}: the config gives {n_kv_heads} KV heads for {n_heads} heads; they must divide it")
    rope_dim, head_dim = cfg.get("rope_dim"), cfg.get("head_dim")
    if rope_dim is not None and head_dim is not None and not (
            isinstance(rope_dim, int) and rope_dim % 2 == 0 and 2 <= rope_dim <= head_dim):
        raise BundleError(f"{origin}: the config gives a rotary dimension of {rope_dim!r}; it must be even and in "
                          f"2..{head_dim} (the head size)")
    tiny = float(np.finfo(np.float32).tiny)
    for key, ok, must in (("rms_eps", lambda v: tiny <= v <= 1, f"in [{tiny:.3g}, 1] (a normal float32)"),
                          ("norm_eps", lambda v: tiny <= v <= 1, f"in [{tiny:.3g}, 1] (a normal float32)"),
                          ("rope_theta", lambda v: v >= 1, "finite and >= 1"),
                          ("rope_local_theta", lambda v: v >= 1, "finite and >= 1")):
        v = cfg.get(key)
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and ok(v)):
            raise BundleError(f"{origin}: the config gives {key} = {v!r}; it must be {must}")
