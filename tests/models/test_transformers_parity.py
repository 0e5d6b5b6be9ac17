"""pocketlm vs transformers on tiny random models: logits and greedy tokens.

f32 bundles must match transformers' float32 forward pass within 1e-4 (max abs) on
the last-position logits, whole or in chunks, and give the same 32 greedy tokens.
Quantized bundles must stay within the bounds documented in docs/quant.md.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_hf_model
from pocketlm.convert import convert
from pocketlm.engine import Engine

CASES = {
    "llama": dict(arch="llama"),
    "llama-tied-odd": dict(arch="llama", hidden_size=40, num_attention_heads=5, num_key_value_heads=1,
                           intermediate_size=72, tie_word_embeddings=True, vocab_size=301),
    "llama-rope-scaled": dict(arch="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0,
                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 64}, rope_theta=500000.0),
    "qwen2": dict(arch="qwen2"),
    "qwen2-odd": dict(arch="qwen2", hidden_size=56, num_attention_heads=7, num_key_value_heads=7,
                      intermediate_size=100, vocab_size=333),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    spec = dict(CASES[request.param])
    arch = spec.pop("arch")
    folder = tmp_path_factory.mktemp(request.param)
    model = make_hf_model(folder / "hf", arch, seed=len(request.param), **spec)
    bundle = convert(folder / "hf", folder / "f32.plm", quant="f32", progress=False)
    return request.param, folder, model, bundle


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def prompt(n, vocab, seed=1):
    return np.random.default_rng(seed + n).integers(0, vocab, size=n).tolist()


@pytest.mark.parametrize("n", [1, 5, 37, 100])
def test_f32_last_logits_match(case, n):
    _, _, model, bundle = case
    engine = Engine(bundle, threads=2, max_context=256)
    ids = prompt(n, engine.vocab_size)
    ref = hf_logits(model, ids)[-1]
    got = engine.create_session().prefill(ids)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-4, np.abs(got - ref).max()


def test_f32_chunked_prefill_and_decode_match(case):
    _, _, model, bundle = case
    engine = Engine(bundle, threads=2, max_context=256, prefill_chunk=16)  # 100 tokens -> 7 chunks
    ids = prompt(100, engine.vocab_size, seed=7)
    ref = hf_logits(model, ids)
    s = engine.create_session()
    got = s.prefill(ids[:60])
    assert np.abs(got - ref[59]).max() < 1e-4
    for i in range(60, 100):  # token-by-token decode
        got = s.decode(ids[i])
        assert np.abs(got - ref[i]).max() < 1e-4, i
    assert s.position == 100


def test_greedy_32_tokens_identical(case):
    _, _, model, bundle = case
    engine = Engine(bundle, threads=2, max_context=256)
    ids = prompt(12, engine.vocab_size, seed=3)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    ref = out[0, len(ids):].tolist()
    s = engine.create_session()
    logits = s.prefill(ids)
    got = []
    for _ in range(32):
        t = int(np.argmax(logits))
        got.append(t)
        logits = s.decode(t)
    assert got == ref


def test_threads_one_and_two_agree(case):
    _, _, _, bundle = case
    ids = prompt(33, 300, seed=11)
    a = Engine(bundle, threads=1, max_context=64).create_session().prefill(ids)
    b = Engine(bundle, threads=2, max_context=64).create_session().prefill(ids)
    assert np.abs(a - b).max() < 1e-5


# Documented in docs/quant.md: max |logit error| relative to the f32 logits' spread (std),
# measured on these tiny random models (weights ~N(0, 0.15)).
QUANT_BOUNDS = {"f16": 0.01, "int8": 0.05, "int4": 0.35}


@pytest.mark.parametrize("quant", sorted(QUANT_BOUNDS))
def test_quantized_within_documented_bound(case, quant):
    name, folder, model, bundle = case
    qb = convert(folder / "hf", folder / f"{quant}.plm", quant=quant, progress=False)
    ids = prompt(24, 300, seed=5)
    ref = Engine(bundle, threads=2, max_context=64).create_session().prefill(ids)
    got = Engine(qb, threads=2, max_context=64).create_session().prefill(ids)
    rel = np.abs(got - ref).max() / ref.std()
    assert rel < QUANT_BOUNDS[quant], (quant, rel)
