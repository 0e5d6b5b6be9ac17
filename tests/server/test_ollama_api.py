"""Ollama's API through the official `ollama` Python client: answers equal to a fresh in-process
session's, NDJSON streaming, `format` schemas validated, the model listings, errors."""

from __future__ import annotations

import json

import pytest

from live_server import API_KEY

ollama = pytest.importorskip("ollama")

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)


def fresh(engine, method, prompt, **kwargs):
    session = engine.create_session()
    return "".join(getattr(session, method)(prompt, **kwargs)), session.last_stats


def test_chat(client, reference):
    expected, stats = fresh(reference["smollm2"], "chat", QUESTION, max_tokens=40, temperature=0)
    r = client.chat(model="smollm2", messages=QUESTION, options={"temperature": 0, "num_predict": 40})
    assert r.message.role == "assistant" and r.message.content == expected
    assert r.done and r.done_reason == ("stop" if stats.finish_reason == "stop" else "length")
    assert r.prompt_eval_count == stats.prompt_tokens and r.eval_count == stats.generated_tokens
    assert r.total_duration > 0 and r.eval_duration > 0
    parts = list(client.chat(model="smollm2:latest", messages=QUESTION, stream=True,
                             options={"temperature": 0, "num_predict": 40}))
    assert "".join(p.message.content for p in parts) == expected
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]


def test_generate(client, reference):
    engine = reference["smollm2"]
    expected, _ = fresh(engine, "chat", [{"role": "system", "content": "Answer in one word."},
                                         {"role": "user", "content": "Name a color."}], max_tokens=20, temperature=0)
    r = client.generate(model="smollm2", prompt="Name a color.", system="Answer in one word.",
                        options={"temperature": 0, "num_predict": 20})
    assert r.response == expected
    raw, _ = fresh(engine, "generate", "Once upon a time", max_tokens=16, temperature=0)
    r = client.generate(model="smollm2", prompt="Once upon a time", raw=True, options={"temperature": 0, "num_predict": 16})
    assert r.response == raw and r.done_reason == "length"
    prompt_ids = engine.tokenizer.encode("Once upon a time", add_special_tokens=True)
    assert r.context[:len(prompt_ids)] == prompt_ids  # the context: prompt and answer tokens
    assert engine.tokenizer.decode(r.context[len(prompt_ids):]) == raw


def test_format_schema(client):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "legs": {"type": "integer", "minimum": 0, "maximum": 8}},
              "required": ["name", "legs"]}
    r = client.chat(model="smollm2", messages=[{"role": "user", "content": "An animal, as JSON."}], format=schema,
                    options={"temperature": 1.0, "seed": 3, "num_predict": 200})
    jsonschema.validate(json.loads(r.message.content), schema)
    r = client.generate(model="smollm2", prompt="A cat as a JSON object with a name and an age.", format="json",
                        options={"temperature": 0, "num_predict": 200})
    assert isinstance(json.loads(r.response), dict)


def test_embed(client, reference):
    import numpy as np

    texts = ["The cat sat on the mat.", "A dog barked."]
    r = client.embed(model="smollm2", input=texts)
    np.testing.assert_allclose(np.array(r.embeddings), reference["smollm2"].embed(texts), atol=1e-6)
    assert r.prompt_eval_count > 0
    long = "word " * 1500  # longer than the context: truncated (Ollama's default), or refused
    assert len(client.embed(model="smollm2", input=long).embeddings[0]) == reference["smollm2"].config["hidden_size"]
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model="smollm2", input=long, truncate=False)
    assert e.value.status_code == 400


def test_listings_and_errors(client):
    names = sorted(m.model for m in client.list().models)
    assert names == ["smollm2:latest", "tiny:latest"]
    show = client.show("smollm2")
    assert show.details.family == "llama" and show.details.quantization_level == "Q4_1"
    assert show.modelinfo["general.architecture"] == "llama" and "im_start" in show.template
    assert sorted(m.model for m in client.ps().models) == names
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="llama3:8b", messages=QUESTION)
    assert e.value.status_code == 404 and "llama3:8b" in e.value.error
    for options in ({"temperature": -1}, {"stop": ["a", "b", "c", "d", "e"]}):
        with pytest.raises(ollama.ResponseError) as e:
            client.chat(model="smollm2", messages=QUESTION, options=options)
        assert e.value.status_code == 400
