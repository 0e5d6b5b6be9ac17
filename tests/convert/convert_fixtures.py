"""Fixtures for the converter tests: tiny transformers checkpoints (f32, bf16, sharded, tied,
odd sizes) and the real SmolLM2 GGUF, each converted once per session.

Test modules import the fixtures from here (a second conftest.py would shadow tests/conftest.py,
whose helpers are imported as `conftest`); the work is memoised at module level so that several
test modules share it.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import numpy as np
import pytest

from testutil import make_hf_model
from pocketlm.bundle import read_bundle
from pocketlm.convert import convert
from pocketlm.quant import dequantize


def hf_state(model) -> dict[str, np.ndarray]:
    """transformers state dict under pocketlm's canonical names, as float32 numpy."""
    from pocketlm.models import llama

    out = {}
    for name, t in model.state_dict().items():
        canon = llama.hf_weight_name(name)
        if canon is not None:
            out[canon] = t.float().numpy()
    return out


def bundle_f32(bundle, name: str) -> np.ndarray:
    info = bundle.info(name)
    return dequantize(np.asarray(bundle.tensor(name)), info.dtype, info.shape)


# Tiny checkpoints: name -> (arch, transformers overrides, how it is saved).
HF_CASES = {
    # 64-wide: every 2-D weight takes the quantized types
    "llama": ("llama", dict(hidden_size=64, intermediate_size=96, vocab_size=256), {}),
    # 48-wide, tied: nothing is a multiple of 32, so quantized modes fall back to F16
    "llama-odd-tied": ("llama", dict(hidden_size=48, intermediate_size=80, vocab_size=256,
                                     tie_word_embeddings=True), {}),
    # bf16 weights in three shards, biases, the chat template in chat_template.jinja
    "qwen2-bf16-sharded": ("qwen2", dict(hidden_size=64, intermediate_size=128, vocab_size=256),
                           {"bf16": True, "shard": "40KB", "jinja": True}),
}


def _save_hf(folder: Path, arch: str, overrides: dict, how: dict):
    import torch

    model = make_hf_model(folder, arch, **overrides)
    if how.get("bf16") or how.get("shard"):
        for f in folder.glob("model*.safetensors*"):
            f.unlink()
        if how.get("bf16"):
            model = model.to(torch.bfloat16)
        model.save_pretrained(folder, safe_serialization=True, max_shard_size=how.get("shard", "5GB"))
    if how.get("jinja"):
        tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "chat_template.jinja").write_text("JINJA:" + tok_cfg.pop("chat_template"))
        (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return model


@functools.cache
def _hf_models(root: Path) -> dict:
    return {name: (root / name, _save_hf(root / name, arch, ov, how)) for name, (arch, ov, how) in HF_CASES.items()}


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """name -> (folder, transformers model)."""
    return _hf_models(tmp_path_factory.getbasetemp() / "hf")


_BUNDLES: dict = {}


@pytest.fixture(scope="session")
def hf_bundles(hf_models, tmp_path_factory):
    """get(case, quant, **options) -> opened bundle, converted on first use and kept."""
    root = tmp_path_factory.getbasetemp() / "hf_plm"
    root.mkdir(exist_ok=True)
    cache = _BUNDLES

    def get(case: str, quant: str | None, **kw):
        key = (case, quant, tuple(sorted(kw.items())))
        if key not in cache:
            suffix = "-".join(f"{k}{v}" for k, v in sorted(kw.items()))
            out = root / f"{case}-{quant}{suffix}.plm"
            convert(hf_models[case][0], out, quant=quant, progress=False, **kw)
            cache[key] = read_bundle(out)
        return cache[key]

    return get


@functools.cache
def _smollm2_bundles(smollm2_gguf: Path, root: Path) -> dict:
    root.mkdir(exist_ok=True)
    out = {}
    for quant in (None, "int8"):
        t0 = time.perf_counter()
        path = convert(smollm2_gguf, root / f"smollm2-{quant}.plm", quant=quant, progress=False)
        out[quant] = read_bundle(path)
        out[f"{quant}-seconds"] = time.perf_counter() - t0
    return out


@pytest.fixture(scope="session")
def smollm2_bundles(smollm2_gguf, tmp_path_factory):
    """The SmolLM2 GGUF converted with quant=None and int8, with timings (key "<quant>-seconds")."""
    return _smollm2_bundles(smollm2_gguf, tmp_path_factory.getbasetemp() / "smollm2")


@functools.cache
def _tiny_gguf(root: Path) -> Path:
    from gguf_craft import write_gguf

    model = make_hf_model(root / "hf", "llama", num_hidden_layers=1)
    path = root / "tiny.gguf"
    write_gguf(path, model, root / "hf", "llama", {"attn_v.weight": "Q8_0", "ffn_up.weight": "Q4_0"})
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    """A 1-layer llama GGUF (F32, Q8_0, Q4_0 tensors; gpt2 tokenizer), written with gguf's writer."""
    return _tiny_gguf(tmp_path_factory.getbasetemp() / "tiny_gguf")
