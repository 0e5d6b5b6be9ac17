"""The answer limit (serve --max-tokens-limit): answers past the context shift it, so without a bound
one request could hold a sequence for 2^32 tokens (found by the server fuzzer: a /v1/completions
request with max_tokens 4294967296 ran past its 30 s timeout). Asked in process through the ASGI app,
against the limit's definition."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def client(tiny_bundle):
    from starlette.testclient import TestClient

    from pocketlm.engine import Engine
    from pocketlm.server.app import create_app
    from pocketlm.server.models import ModelRegistry, ServedModel

    engine = Engine(tiny_bundle, threads=1, max_context=64)
    return TestClient(create_app(ModelRegistry([ServedModel("tiny", engine),
                                                ServedModel("capped", engine, max_tokens_limit=5)])))


@pytest.mark.parametrize("route, body", [
    ("/v1/completions", {"prompt": "a b", "max_tokens": 2**32}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 257}),
    ("/api/generate", {"prompt": "a b", "stream": False, "options": {"num_predict": 2**31}}),
])
def test_beyond_four_contexts_is_refused(client, route, body):
    r = client.post(route, json={"model": "tiny", **body})
    assert r.status_code == 400, r.text
    assert "at most 256 tokens" in r.text  # 4 x the 64-token context


def test_an_operator_limit(client):
    ok = client.post("/v1/completions", json={"model": "capped", "prompt": "a b", "max_tokens": 5, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 5
    r = client.post("/v1/completions", json={"model": "capped", "prompt": "a b", "max_tokens": 6})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert client.post("/v1/completions", json={"model": "tiny", "prompt": "a b", "max_tokens": 256,
                                                "temperature": 0}).status_code == 200


@pytest.mark.parametrize("route, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}),
    ("/apply-template", {"messages": [{"role": "user", "content": "a\udfff"}]}),
    ("/api/chat", {"messages": [{"role": "user", "content": "\ud800"}], "stream": False}),
    ("/v1/completions", {"prompt": "\ud800"}),
    ("/v1/embeddings", {"input": "\ud800"}),
])
def test_lone_surrogates_are_the_requests_fault(client, route, body):
    """A JSON \\ud800 escape decodes to a lone surrogate, which no tokenizer or UTF-8 answer can carry:
    400, not the 500 the server fuzzer found (/v1/chat/completions and /apply-template gave 500)."""
    import json

    r = client.post(route, content=json.dumps({"model": "tiny", **body}), headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]  # OpenAI's {"error": {"message": ...}}, Ollama's {"error": "..."}
    assert "Unicode" in (error["message"] if isinstance(error, dict) else error)
