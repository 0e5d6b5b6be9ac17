"""Model architectures, one file each, registered by architecture name.

Each model module provides:
  ARCH                 registry key, also stored in the bundle
  config_from_hf(d)    normalised config from a Hugging Face config.json dict
  config_from_gguf(kv) normalised config from GGUF metadata (key -> value)
  hf_weight_name(name) canonical (GGUF-style) tensor name for a HF tensor name, or None to drop
  build(g, cfg)        emits the forward pass into a Graph through models.layers

Canonical tensor names follow GGUF (token_embd.weight, blk.N.attn_q.weight, ...),
so a GGUF file needs no renaming and a HF checkpoint needs one map per family.
"""

from __future__ import annotations

from types import ModuleType

from pocketlm.errors import UnsupportedModelError
from pocketlm.models import llama, qwen2

REGISTRY: dict[str, ModuleType] = {m.ARCH: m for m in (llama, qwen2)}

# Hugging Face `model_type` / `architectures` values -> registry key.
HF_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
}


def get(arch: str) -> ModuleType:
    try:
        return REGISTRY[arch]
    except KeyError:
        raise UnsupportedModelError(
            f"architecture {arch!r} is not supported (supported: {', '.join(sorted(REGISTRY))})"
        ) from None


def arch_from_hf(config: dict) -> str:
    mt = config.get("model_type")
    if mt in HF_MODEL_TYPES:
        return HF_MODEL_TYPES[mt]
    raise UnsupportedModelError(
        f"Hugging Face model_type {mt!r} is not supported (supported: {', '.join(sorted(HF_MODEL_TYPES))})"
    )
