"""logprobs=k: each generated token's log-probability and the k most likely alternatives, against
numpy's log-softmax of the logits a plain prefill/decode loop gives for the same tokens."""

from __future__ import annotations

import numpy as np
import pytest

from pocketlm import Engine, InvalidInputError
from pocketlm.convert import convert
from testutil import make_hf_model


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    d = tmp_path_factory.mktemp("logprobs")
    make_hf_model(d / "hf", "llama", seed=9)
    return Engine(convert(d / "hf", d / "m.plm", quant="f32", progress=False), threads=2, kv_type="f32")


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - (x.max() + np.log(np.exp(x - x.max()).sum()))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_against_a_plain_loop(engine, temperature):
    prompt = [5, 17, 42, 99, 7]
    r = engine.submit(prompt, max_tokens=12, temperature=temperature, seed=3, logprobs=4)
    r.result(timeout=60)
    entries = r.logprobs
    assert [t for t, _, _ in entries] == r.token_ids and len(entries) == 12
    s = engine.create_session()
    logits = s.prefill(prompt)
    for token, lp, top in entries:
        ref = log_softmax(logits)
        assert lp == pytest.approx(ref[token], abs=1e-4)
        best = np.argsort(-ref, kind="stable")[:4]
        assert [i for i, _ in top] == best.tolist()
        np.testing.assert_allclose([v for _, v in top], ref[best], atol=1e-4)
        if temperature == 0:
            assert token == top[0][0]
        logits = s.decode(token)


def test_off_by_default_and_checked(engine):
    r = engine.submit([1, 2, 3], max_tokens=4, temperature=0)
    r.result(timeout=60)
    assert r.logprobs == []
    r = engine.submit([1, 2, 3], max_tokens=4, temperature=0, logprobs=0)
    r.result(timeout=60)
    assert len(r.logprobs) == 4 and all(top == [] for _, _, top in r.logprobs)
    for bad in (-1, 21, 2.5, True):
        with pytest.raises(InvalidInputError, match="logprobs must be"):
            engine.submit([1, 2, 3], max_tokens=4, logprobs=bad)
