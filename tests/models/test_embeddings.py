"""Engine.embed on decoder models vs transformers: the final hidden states (after the final norm:
`last_hidden_state`) pooled over the tokens (mean, or the last token's) and normalized."""

from __future__ import annotations

import numpy as np
import pytest

from pocketlm import Engine, InvalidInputError
from pocketlm.convert import convert
from testutil import make_hf_model

TEXTS = ["hello world", "the cat sat on the mat", "a"]


@pytest.fixture(scope="module", params=["llama", "gpt2", "gemma"])
def pair(request, tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp(f"embed-{request.param}")
    make_hf_model(d / "hf", request.param, seed=4)
    engine = Engine(convert(d / "hf", d / "m.plm", quant="f32", progress=False), threads=2, kv_type="f32")
    hf = transformers.AutoModel.from_pretrained(d / "hf", torch_dtype=torch.float32).eval()
    return engine, hf, torch


def reference(hf, torch, ids: list[int], pooling: str) -> np.ndarray:
    with torch.no_grad():
        h = hf(torch.tensor([ids])).last_hidden_state[0].double().numpy()
    v = h.mean(axis=0) if pooling == "mean" else h[-1]
    return v / np.linalg.norm(v)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_matches_transformers(pair, pooling):
    engine, hf, torch = pair
    got = engine.embed(TEXTS, pooling=pooling)
    assert got.shape == (len(TEXTS), engine.config["hidden_size"]) and got.dtype == np.float32
    for text, v in zip(TEXTS, got):
        ids = engine.tokenizer.encode(text, add_special_tokens=True)
        ref = reference(hf, torch, ids, pooling)
        assert float(np.dot(v, ref)) >= 0.9999
        assert abs(float(np.linalg.norm(v)) - 1) < 1e-5


def test_token_ids_long_texts_and_errors(pair):
    engine, hf, torch = pair
    long_ids = [int(x) for x in np.random.default_rng(0).integers(3, 300, 200)]
    chunked = Engine(engine.path, threads=2, kv_type="f32", prefill_chunk=64)  # 200 tokens in 4 executor calls
    for e in (engine, chunked):
        v = e.embed([long_ids])[0]
        assert float(np.dot(v, reference(hf, torch, long_ids, "mean"))) >= 0.9999
    assert np.array_equal(engine.embed("hello world"), engine.embed(["hello world"]))
    with pytest.raises(InvalidInputError, match="pooling"):
        engine.embed("x", pooling="max")
    with pytest.raises(InvalidInputError, match="nothing to embed"):
        engine.embed([])
    with pytest.raises(ValueError, match="cannot generate"):
        next(engine.create_session(logits="hidden").generate("x"))
