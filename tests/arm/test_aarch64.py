"""pocketlm itself on aarch64, under qemu-aarch64 (scripts/test-arm.sh --e2e builds the extension for
aarch64 and an arm64 Debian Python to run it): tiny models of five weight formats, and the real
SmolLM2 answer, give token for token what this machine's own build gives, with every ARM kernel
variant forced in turn (the emulated CPU, -cpu max, has them all)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess

import numpy as np
import pytest

from pocketlm import Engine
from pocketlm.convert import convert
from testutil import make_hf_model

ARM_PYTHON = os.environ.get("PLM_ARM_PYTHON")  # the emulated python's command line
pytestmark = pytest.mark.skipif(not ARM_PYTHON, reason="runs under scripts/test-arm.sh --e2e (qemu-aarch64)")
HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ["ref", "neon", "dotprod", "i8mm"]


def on_arm(job: dict) -> dict:
    r = subprocess.run([*shlex.split(ARM_PYTHON), os.path.join(HERE, "arm_generate.py"), json.dumps(job)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("arm")
    make_hf_model(d / "hf", "qwen2", seed=5, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                  num_key_value_heads=2)
    out = {q: convert(d / "hf", d / f"{q}.plm", quant=q, progress=False) for q in ("f32", "int8", "int4")}
    for q in ("int8", "int4"):  # 2:4-sparse: read in place by dotprod and i8mm (below), expanded by neon and ref
        out[f"{q}-2:4"] = convert(d / "hf", d / f"{q}-24.plm", quant=q, prune="2:4", prune_method="magnitude",
                                  progress=False)
    return out


@pytest.mark.parametrize("quant", ["f32", "int8", "int4", "int8-2:4", "int4-2:4"])
@pytest.mark.parametrize("kv_type", ["f32", "f16"])
def test_tiny_model_same_tokens_as_here(tiny, quant, kv_type):
    engine = Engine(tiny[quant], threads=2, max_context=128, kv_type=kv_type)
    ids = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    s = engine.create_session()
    list(s.generate(ids, max_tokens=16, temperature=0))
    want = s.last_text_ids[-16:]
    for variant in VARIANTS:
        # sparse weights in place wherever a kernel reads them ("auto" expands them on ARM: its
        # in-place kernels are slower than dense, docs/performance.md)
        job = {"bundle": str(tiny[quant]), "ids": ids, "n": 16, "kv_type": kv_type, "kernels": variant,
               "sparse_layout": "in-place"}
        got = on_arm(job)
        assert got["kernels"] == variant
        assert got["ids"] == want, (quant, kv_type, variant)
        if "2:4" in quant:
            assert (got["expanded"] == 0) == (variant in ("dotprod", "i8mm")), (quant, variant, got["expanded"])


def test_smollm2_answers_as_here(smollm2_gguf):
    from pocketlm.convert.cache import convert_to_cache

    bundle = convert_to_cache(smollm2_gguf, progress=False)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    s = Engine(bundle, threads=2, max_context=128).create_session()
    text = "".join(s.chat(messages, temperature=0, max_tokens=12))
    assert "Paris" in text
    want = s.last_text_ids[-s.last_stats.generated_tokens:]
    for variant in ("neon", "i8mm"):
        got = on_arm({"bundle": str(bundle), "chat": messages, "n": 12, "kv_type": "f16", "kernels": variant})
        assert got["kernels"] == variant and got["ids"] == want, variant
