"""The Q8_0 KV cache (Engine(kv_type="q8_0")) in whole models: 34 bytes per 32 values (the first layer's
keys in f16), answers close to
the f32 cache's (the op-level check against float64 over the dequantized cache is
tests/runtime/test_ops.py::test_attention_q8_0_cache), sessions saved and loaded bit for bit, refused by
an engine of another KV type, shifted, cloned; rings included. Tiny models with head_dim 32 (Q8_0's block)."""

from __future__ import annotations

import numpy as np
import pytest

from pocketlm import Engine, SessionFileError, UnsupportedModelError
from testutil import make_f32_bundle, make_windowed_bundle

ARCHS = ("llama", "qwen2", "gemma", "mistral", "gemma3")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    made = {}
    for arch in ("llama", "qwen2", "gemma"):
        made[arch] = make_f32_bundle(tmp_path_factory.mktemp(arch), arch, seed=5, hidden_size=128,
                                     **({"head_dim": 32} if arch == "gemma" else {}))
    for arch in ("mistral", "gemma3"):  # rings of a few slots
        made[arch] = make_windowed_bundle(tmp_path_factory.mktemp(arch), arch, 8, hidden_size=64, head_dim=32)
    made["small"] = make_f32_bundle(tmp_path_factory.mktemp("small"), "llama", seed=5)  # head_dim 16
    return made


@pytest.mark.parametrize("arch", ARCHS)
def test_close_to_the_f32_cache_in_half_the_bytes(bundles, arch):
    rng = np.random.default_rng(1)
    prompt, more = rng.integers(3, 300, 40).tolist(), rng.integers(3, 300, 10).tolist()
    out = {}
    for kv in ("f32", "f16", "q8_0"):
        engine = Engine(bundles[arch], threads=2, kv_type=kv, max_context=64, prefill_chunk=16)
        s = engine.create_session()
        out[kv] = np.stack([s.prefill(prompt)] + [s.decode(t) for t in more])
        out[kv, "bytes"] = s.kv_bytes
        out["caps"], out["position"] = [int(c) for c in s._state.kv_capacities], s.position
    # Q8_0 rows of 34 bytes per 32 values, but the first layer's keys in f16
    dh, heads = 32, engine.config["n_kv_heads"]
    want = sum(min(out["position"], c) * heads * ((2 * dh if layer == 0 else 34) + 34)
               for layer, c in enumerate(out["caps"]))
    assert out["q8_0", "bytes"] == want and out["f16", "bytes"] == sum(
        min(out["position"], c) * heads * 4 * dh for c in out["caps"])
    err = {kv: np.abs(out[kv] - out["f32"]).max() for kv in ("f16", "q8_0")}
    assert 0 < err["q8_0"] < 0.05 * np.abs(out["f32"]).max(), err


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3"])
def test_saved_clone_and_shifted_sessions(bundles, arch, tmp_path):
    engine = Engine(bundles[arch], threads=2, kv_type="q8_0", max_context=48, prefill_chunk=8)
    rng = np.random.default_rng(2)
    s = engine.create_session(on_overflow="shift", keep=4, discard=9)
    s.prefill(rng.integers(3, 300, 44).tolist())
    for t in rng.integers(3, 300, 10).tolist():  # through a shift: keys re-rotated and re-quantized
        s.decode(t)
    assert s.evicted_tokens > 0
    s.save(tmp_path / "s.plms")
    b, c = engine.load_session(tmp_path / "s.plms"), s.clone()
    for t in rng.integers(3, 300, 12).tolist():
        want = s.decode(t)
        np.testing.assert_array_equal(b.decode(t), want)
        np.testing.assert_array_equal(c.decode(t), want)
    # the shifted q8_0 cache stays close to an f32 cache that lived the same (its first-layer keys
    # were rounded again after their rotation)
    f32 = Engine(bundles[arch], threads=2, kv_type="f32", max_context=48, prefill_chunk=8)
    r = f32.create_session(on_overflow="shift", keep=4, discard=9)
    rng = np.random.default_rng(2)
    r.prefill(rng.integers(3, 300, 44).tolist())
    for t in rng.integers(3, 300, 10).tolist() + rng.integers(3, 300, 12).tolist():
        want = r.decode(t)
    assert r.tokens == s.tokens and r.evicted_tokens == s.evicted_tokens
    assert np.abs(c.decode(7) - r.decode(7)).max() < 0.05 * np.abs(want).max()
    f16 = Engine(bundles[arch], threads=2, kv_type="f16", max_context=48, prefill_chunk=8)
    with pytest.raises(SessionFileError, match="q8_0"):
        f16.load_session(tmp_path / "s.plms")


def test_whole_blocks_needed(bundles):
    with pytest.raises(UnsupportedModelError, match="multiple of 32"):
        Engine(bundles["small"], kv_type="q8_0")
