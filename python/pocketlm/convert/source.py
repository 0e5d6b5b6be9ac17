"""What a source reader hands to the converter: tensors under canonical names, plus everything
the bundle's metadata needs. Readers (hf.py, gguf_source.py) fill it; converter.py writes it.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from pocketlm import metadata
from pocketlm.dtypes import DType
from pocketlm.errors import BundleError, ConversionError, shown

# Sampling defaults for a source that gives none (bench/sampling_loops.py, docs/quant.md): with
# llama.cpp's temperature, top-k, top-p and min-p alone, a third of SmolLM2's answers loop; a mild
# repetition penalty over the last 64 tokens (Ollama's default) cuts that to under a tenth.
DEFAULT_GENERATION = {
    "temperature": 0.7,
    "top_k": 40,
    "top_p": 0.95,
    "min_p": 0.05,
    "repetition_penalty": 1.1,
    "max_tokens": 512,
}
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")

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


def check_config_ranges(cfg: dict, tensor_dims: list[tuple[int, ...]], origin: str,
                        names: Mapping[str, str] | None = None) -> None:
    """The canonical config a reader made is one a bundle may hold (pocketlm.metadata's schema: the
    loader's own types and ranges), and within the tensor table: at most one layer per tensor, and
    every size (vocabulary, widths, heads, head size) at most the largest tensor dimension, since
    each is some tensor's. Run before anything is sized by the config. `origin` names the file,
    `names` the source's key for each entry it read (else the message names config.<entry>)."""
    problem = metadata.config_problem(cfg, names)
    if problem:
        raise BundleError(f"{origin}: {problem}")
    names = names or {}
    if cfg.get("n_layers", 0) > len(tensor_dims):
        raise BundleError(f"{origin}: {names.get('n_layers', 'config.n_layers')} gives {cfg['n_layers']} layers; it "
                          f"must be 1..{len(tensor_dims)} (each layer has tensors)")
    largest = max((d for dims in tensor_dims for d in dims), default=0)
    for key in ("vocab_size", "hidden_size", "n_heads", "n_kv_heads", "head_dim", "ffn_dim"):
        if cfg.get(key, 0) > largest:
            raise BundleError(f"{origin}: {names.get(key, 'config.' + key)} is {cfg[key]}; it must be at most "
                              f"{largest} (the largest tensor dimension)")


def sha256_files(paths, cancelled=None) -> str | None:
    """The SHA-256 of the files' bytes one after another (a source's provenance hash); None if
    `cancelled` (a threading.Event) is set before the end."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                if cancelled is not None and cancelled.is_set():
                    return None
                h.update(chunk)
    return h.hexdigest()


def generation_defaults(found: Mapping[str, tuple[str, object]], origin: str) -> dict:
    """The bundle's sampling defaults: DEFAULT_GENERATION, with the values the source gives
    (canonical key -> (the source's key, value)). A value the sampler would refuse is left out
    with a one-line warning on stderr rather than refused: the model is usable without it, and
    llama.cpp ignores such values too. (The loader still refuses one in a bundle: the converter
    never writes it, so it would be tampering.)

    The repetition penalty: the source's, for sampled and greedy decoding alike (as transformers
    applies a generation_config's); none (1.0) for a source that gives other sampling settings
    but no penalty (its authors tuned sampling without one); for a source that gives no sampling
    settings, DEFAULT_GENERATION's, for sampling only: `greedy_repetition_penalty` 1.0 keeps
    temperature 0 the model's argmax (pocketlm.generation)."""
    out = dict(DEFAULT_GENERATION)
    given = {}
    for key, (source_key, value) in found.items():
        if value is None:
            continue
        problem = metadata.generation_problem(key, value, name=source_key)
        if problem:
            default = f"the default ({out[key]})" if key in out else "no default"
            print(f"pocketlm: warning: {origin}: {problem}; ignored, {default} is used", file=sys.stderr)
            continue
        given[key] = value
    if not any(k in given for k in SAMPLING_KEYS):
        out["greedy_repetition_penalty"] = 1.0
    elif "repetition_penalty" not in given:
        out["repetition_penalty"] = 1.0
    out.update(given)
    return out
