"""Model architectures, one file each, registered by architecture name.

Each model module provides:
  ARCH                 registry key, also stored in the bundle
  config_from_hf(d)    normalised config from a Hugging Face config.json dict
  config_from_gguf(kv) normalised config from GGUF metadata (key -> value)
  hf_weight_name(name) canonical (GGUF-style) tensor name for a HF tensor name, or None to drop
  build(g, cfg)        emits the forward pass into a Graph through models.layers

and, optionally, for checkpoints whose tensors are not one-to-one with the canonical ones
(fused Q/K/V, transposed Conv1D weights):
  hf_tensors(name, shape, cfg)  -> [(canonical name, shape, transform or None)]
                       replaces hf_weight_name: the canonical pieces of one HF tensor, each
                       computed lazily as transform(the HF tensor as f32); [] drops it
  gguf_tensors(name, shape, cfg, load_f32) -> [(canonical name, rows or None)]
                       the pieces of one GGUF tensor as row ranges (elements for 1-D), so
                       quantized blocks move unchanged; may move small tensors into cfg
                       (LongRoPE factors) and return []
  tensor_shapes(cfg)   canonical name -> shape, when it differs from the llama family's

Canonical tensor names follow GGUF (token_embd.weight, blk.N.attn_q.weight, ...),
so a GGUF file needs no renaming and a HF checkpoint needs one map per family.
"""

from __future__ import annotations

from types import ModuleType

from pocketlm.errors import UnsupportedModelError, shown
from pocketlm.models import bert, gemma, gemma2, gemma3, gpt2, llama, phi3, qwen2, qwen3

REGISTRY: dict[str, ModuleType] = {m.ARCH: m for m in (llama, qwen2, gpt2, phi3, qwen3, gemma, gemma2,
                                                        gemma3, bert)}

# Hugging Face `model_type` / `architectures` values -> registry key.
HF_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "gpt2": "gpt2",
    "phi3": "phi3",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "bert": "bert",
}


def get(arch: str) -> ModuleType:
    try:
        return REGISTRY[arch]
    except KeyError:
        raise UnsupportedModelError(
            f"architecture {shown(arch)} is not supported (supported: {', '.join(sorted(REGISTRY))})"
        ) from None


def hf_tensors(module: ModuleType, name: str, shape: tuple[int, ...], cfg: dict) -> list:
    """[(canonical name, shape, transform or None)] for one HF tensor, through whichever of
    hf_tensors / hf_weight_name the model module defines."""
    if hasattr(module, "hf_tensors"):
        return module.hf_tensors(name, tuple(shape), cfg)
    canon = module.hf_weight_name(name)
    return [] if canon is None else [(canon, tuple(shape), None)]


def arch_from_hf(config: dict) -> str:
    mt = config.get("model_type")
    if mt in HF_MODEL_TYPES:
        return HF_MODEL_TYPES[mt]
    raise UnsupportedModelError(
        f"Hugging Face model_type {shown(mt)} is not supported (supported: {', '.join(sorted(HF_MODEL_TYPES))})"
    )
