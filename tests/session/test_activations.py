"""Activation precision per matmul (pocketlm.passes.precision) and its calibration (pocketlm.calibration).

- Specs parse, and bad ones are refused naming the problem (API and CLI).
- Per-site levels reach the executor: a spec that names every site at one level gives exactly the
  logits of one level everywhere, and the same for two; a mixed spec lies between and differs from
  both; "auto" gives matmuls with 6-bit-or-wider weights two levels whatever the calibration says.
- Calibration: the chosen spec's KL divergence from two levels, computed here independently on the
  calibration text, is within the budget; the result is cached per bundle and reused; the choice
  algorithm against synthetic site costs.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from pocketlm import calibration
from pocketlm.dtypes import DType
from pocketlm.engine import Engine
from pocketlm.passes.precision import SITES, auto_spec, parse
from testutil import child_env, make_hf_model


@pytest.fixture(scope="module")
def int4_bundle(tmp_path_factory):
    from pocketlm.convert import convert

    folder = tmp_path_factory.mktemp("act")
    make_hf_model(folder / "hf", "llama", seed=3, hidden_size=64, intermediate_size=128)
    return convert(folder / "hf", folder / "int4.plm", quant="int4", progress=False)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POCKETLM_CALIBRATION_DIR", str(tmp_path / "calibration"))


def test_parse():
    assert parse("int8") == (1, {}) and parse("int8x2") == (2, {})
    assert parse("int8, ffn_down=int8x2 ,output=int8x2") == (1, {"ffn_down": 2, "output": 2})
    assert parse("auto") == (0, {})
    for bad, msg in (("int4", "default"), ("int8,ffn=int8x2", "SITE"), ("int8,ffn_down=int4", "SITE"),
                     ("int8,ffn_down=int8x2,ffn_down=int8", "twice"), ("", "expected")):
        with pytest.raises(ValueError, match=msg):
            parse(bad)
    assert auto_spec(["output", "attn_qkv"]) == "int8,attn_qkv=int8x2,output=int8x2"


def test_cli_refuses_a_bad_spec(int4_bundle):
    r = subprocess.run([sys.executable, "-m", "pocketlm", "run", str(int4_bundle), "-p", "hi", "--activations",
                        "int8,mlp=int8x2"], capture_output=True, text=True, env=child_env())
    assert r.returncode == 2 and "SITE=int8|int8x2" in r.stderr


def _logits(path, spec, ids):
    e = Engine(path, threads=2, max_context=64, kv_type="f32", activations=spec)
    return e.create_session().prefill(ids).astype(np.float64).reshape(-1)


def test_sites_reach_the_executor(int4_bundle):
    ids = [3, 17, 99, 4, 250, 31, 8, 77]
    one, two = _logits(int4_bundle, "int8", ids), _logits(int4_bundle, "int8x2", ids)
    assert np.abs(one - two).max() > 1e-4  # the two levels differ on this model
    every = ",".join(f"{s}={{}}" for s in SITES)
    np.testing.assert_array_equal(_logits(int4_bundle, "int8x2," + every.format(*["int8"] * 5), ids), one)
    np.testing.assert_array_equal(_logits(int4_bundle, "int8," + every.format(*["int8x2"] * 5), ids), two)
    mixed = _logits(int4_bundle, "int8,ffn_down=int8x2", ids)
    assert np.abs(mixed - one).max() > 0 and np.abs(mixed - two).max() > 0


def test_auto_keeps_two_levels_on_wide_weights(int4_bundle):
    e = Engine(int4_bundle, threads=2, max_context=64)
    assert e.activations == "auto" and e.activation_spec.startswith("auto:")
    types = {t.name: DType(t.dtype) for t in e.bundle.tensors}
    for n in e.compiled.graph.nodes:
        if n.op.startswith("matmul"):
            weights = [w for w in n.inputs[1:] if w in types]
            wide = any(types[w] in (DType.Q8_0, DType.Q8_0_X16) for w in weights)
            if wide:  # int4 bundles keep the head (and embeddings) at Q8_0
                assert n.attr("act_levels") == 2, n


def test_calibration_meets_its_budget_and_is_cached(int4_bundle, monkeypatch):
    e = Engine(int4_bundle, threads=2, max_context=256)
    entry = e.calibration
    assert entry["version"] == calibration.VERSION and set(entry["two_level"]) <= set(SITES)
    # independently: the chosen spec's KL divergence from two levels on the calibration text
    ids = e.tokenizer.encode(calibration.TEXT, add_special_tokens=True)[:calibration.MAX_TOKENS]
    spec = auto_spec(set(entry["two_level"]) | {"output"})  # the head is Q8_0: two levels by the rule

    def logprobs(spec):
        eng = Engine(int4_bundle, threads=2, max_context=256, kv_type="f32", activations=spec)
        s = eng.create_session(logits="all")
        x = s.forward(ids).astype(np.float64)
        return x - x.max(1, keepdims=True) - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True))

    ref, got = logprobs("int8x2"), logprobs(spec)
    kld = float((np.exp(ref) * (ref - got)).sum(1).mean())
    assert kld <= calibration.BUDGET * 1.01, (kld, entry)
    # cached: a second engine does not calibrate again
    files = list((calibration.cache_dir()).glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["two_level"] == entry["two_level"]
    monkeypatch.setattr(calibration, "calibrate", lambda *a: pytest.fail("calibrated twice"))
    assert Engine(int4_bundle, threads=2, max_context=64).activation_spec == e.activation_spec


def test_choice_against_synthetic_costs():
    """_choose with a fake model whose KL divergence is the sum of its one-level sites' costs."""
    cost = {"attn_qkv": 3e-4, "attn_output": 2e-5, "ffn_up": 1e-4, "ffn_down": 9e-5, "output": 0.0}
    ref = np.log(np.full((4, 8), 1 / 8))

    def run(spec):
        default, sites = parse(spec.removeprefix("auto:"))
        total = sum(c for s, c in cost.items() if sites.get(s, default) == 1)
        return ref - total  # KL(ref || ref - c) = c on a normalised ref

    assert calibration.BUDGET == 2e-4
    entry = calibration._choose(ref, run, 4)
    # costliest first: attn_qkv back to two levels leaves 2.1e-4 > 2e-4, then ffn_up leaves 1.1e-4
    assert entry["two_level"] == ["attn_qkv", "ffn_up"]
    assert entry["kld_chosen"] == pytest.approx(1.1e-4)
    cost.update(attn_qkv=1e-5, ffn_up=1e-5)  # 1.3e-4 in all: one level everywhere
    assert calibration._choose(ref, run, 4)["two_level"] == []
