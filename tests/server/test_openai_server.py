"""`pocketlm serve` through the official `openai` client (and raw HTTP where the client cannot say
it): every answer is checked against a fresh in-process session of the same model, every error
against OpenAI's status and JSON shape."""

from __future__ import annotations

import json
import threading
import time

import httpx2 as httpx  # the HTTP client the openai package itself uses
import openai
import pytest

from live_server import API_KEY

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def fresh_chat(engine, messages, **kwargs) -> tuple[str, object]:
    session = engine.create_session()
    return "".join(session.chat(messages, **kwargs)), session.last_stats


def fresh_text(engine, prompt, **kwargs) -> tuple[str, object]:
    session = engine.create_session()
    return "".join(session.generate(prompt, **kwargs)), session.last_stats


def metric(server, name: str, **labels) -> float:
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{want} not in /metrics:\n{text}")


def test_models(server):
    client = server.client()
    assert sorted(m.id for m in client.models.list()) == ["smollm2", "tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat_answers_as_a_fresh_session(server, reference):
    expected, stats = fresh_chat(reference["smollm2"], QUESTION, max_tokens=40, temperature=0)
    r = server.client().chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=40, temperature=0)
    assert r.object == "chat.completion" and r.model == "smollm2" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == ("stop" if stats.finish_reason == "stop" else "length")
    assert r.usage.prompt_tokens == stats.prompt_tokens
    assert r.usage.completion_tokens == stats.generated_tokens
    assert r.usage.total_tokens == stats.prompt_tokens + stats.generated_tokens


def test_chat_stream_equals_the_whole_answer(server, reference):
    expected, stats = fresh_chat(reference["smollm2"], QUESTION, max_tokens=40, temperature=0)
    chunks = list(server.client().chat.completions.create(
        model="smollm2", messages=QUESTION, max_tokens=40, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == expected
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop" if stats.finish_reason == "stop" else "length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == stats.generated_tokens
    assert chunks[-1].usage.prompt_tokens == stats.prompt_tokens


def test_completions_on_the_second_model(server, reference):
    tiny = reference["tiny"]
    client = server.client()
    expected, stats = fresh_text(tiny, "hello world", max_tokens=12, temperature=0)
    r = client.completions.create(model="tiny", prompt="hello world", max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == expected
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens == stats.prompt_tokens
    # echo, two prompts (their choices in order), token ids as the prompt
    r = client.completions.create(model="tiny", prompt=["hello world", "the cat"], max_tokens=12, temperature=0,
                                  echo=True)
    second, _ = fresh_text(tiny, "the cat", max_tokens=12, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == ["hello world" + expected, "the cat" + second]
    ids = tiny.tokenizer.encode("hello world", add_special_tokens=True)
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0)
    assert r.choices[0].text == expected
    chunks = list(client.completions.create(model="tiny", prompt="hello world", max_tokens=12, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected


def test_logprobs(server, reference):
    """logprobs / top_logprobs (chat) and logprobs=k (completions) against numpy's log-softmax of the
    logits a fresh session gives for the same tokens."""
    import numpy as np

    engine = reference["smollm2"]
    client = server.client()
    r = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    ids = engine.tokenizer.encode(engine.apply_chat_template(QUESTION), add_special_tokens=False)
    session = engine.create_session()
    logits = session.prefill(ids)
    text = ""
    for entry in content:
        x = logits.astype(np.float64)
        ref = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
        best = np.argsort(-ref, kind="stable")[:3]
        assert [t.token for t in entry.top_logprobs] == [engine.tokenizer.decode([int(i)]) for i in best]
        np.testing.assert_allclose([t.logprob for t in entry.top_logprobs], ref[best], atol=2e-3)
        assert entry.token == entry.top_logprobs[0].token and entry.logprob == entry.top_logprobs[0].logprob
        assert bytes(entry.bytes).decode() == entry.token
        text += entry.token
        logits = session.decode(int(best[0]))
    assert r.choices[0].message.content.startswith(text) or text.startswith(r.choices[0].message.content)
    chunks = list(client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=8, temperature=0,
                                                 logprobs=True, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    r = client.completions.create(model="tiny", prompt="hello world", max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 6 and len(lp.top_logprobs[0]) == 2
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:k]) for k in range(6)]
    assert "".join(lp.tokens) == r.choices[0].text


def test_stop_and_max_tokens(server, reference):
    expected, _ = fresh_chat(reference["smollm2"], QUESTION, max_tokens=40, temperature=0)
    stop = expected.split()[3]  # a word inside the answer
    client = server.client()
    r = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=40, temperature=0, stop=[stop])
    assert r.choices[0].message.content == expected[:expected.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="smollm2", messages=QUESTION, max_completion_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    assert expected.startswith(r.choices[0].message.content)


def test_an_answer_longer_than_the_context_shifts_it(server, reference):
    """max_tokens past the context (the tiny model's is 256 tokens): the server shifts it (the system prompt
    kept) rather than stop, and answers as an in-process session that shifts alike."""
    tiny = reference["tiny"]
    for question in ("count to a thousand", "go on", "tell me more", "and then?", "write a long story"):
        # (the first question whose greedy answer does not end before: the model is random)
        messages = [{"role": "system", "content": "you are terse"}, {"role": "user", "content": question}]
        keep = tiny.chat_keep(messages)
        ids = tiny.tokenizer.encode(tiny.apply_chat_template(messages), add_special_tokens=False)
        assert keep > 4 and ids[:keep] == tiny.tokenizer.encode(
            tiny.apply_chat_template(messages[:1] + [{"role": "user", "content": "x"}]), add_special_tokens=False)[:keep]
        s = tiny.create_session(on_overflow="shift", keep=keep)
        expected = "".join(s.generate(ids, max_tokens=1000, temperature=0))
        if s.last_stats.generated_tokens == 1000:
            break
    assert s.last_stats.generated_tokens == 1000 and s.evicted_tokens > 0  # it went past the context
    r = server.client().chat.completions.create(model="tiny", messages=messages, max_tokens=1000, temperature=0)
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 1000
    # without max_tokens an answer stops at the end of the context, as OpenAI's and llama-server's
    r = server.client().chat.completions.create(model="tiny", messages=messages, temperature=0)
    assert r.usage.prompt_tokens + r.usage.completion_tokens == tiny.max_context
    assert expected.startswith(r.choices[0].message.content)


def test_seed_temperature_and_penalties(server, reference):
    client = server.client()
    ask = dict(model="smollm2", messages=[{"role": "user", "content": "Write a sentence about the sea."}],
               max_tokens=24)
    a = client.chat.completions.create(**ask, temperature=1.0, seed=1234, n=3)
    b = client.chat.completions.create(**ask, temperature=1.0, seed=1234, n=3)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1  # choice i samples with seed + i
    expected, _ = fresh_chat(reference["smollm2"], ask["messages"], max_tokens=24, temperature=1.0, seed=1235)
    assert a.choices[1].message.content == expected
    # frequency and presence penalties, greedy: as a fresh session with them
    expected, _ = fresh_chat(reference["smollm2"], ask["messages"], max_tokens=24, temperature=0,
                             frequency_penalty=1.5, presence_penalty=0.5)
    r = client.chat.completions.create(**ask, temperature=0, frequency_penalty=1.5, presence_penalty=0.5)
    assert r.choices[0].message.content == expected


def test_structured_outputs_validate(server):
    """response_format json_schema (strict) and json_object: every answer parses, and validates."""
    jsonschema = pytest.importorskip("jsonschema")
    schemas = [
        {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                          "population": {"type": "integer", "minimum": 0, "maximum": 10**8},
                                          "country": {"enum": ["France", "Germany", "Spain"]}},
         "required": ["city", "population", "country"], "additionalProperties": False},
        {"type": "object", "properties": {"people": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                             "height_m": {"type": "number", "minimum": 0.5, "maximum": 2.5},
                                             "address": {"type": "object", "properties": {
                                                 "street": {"type": "string", "maxLength": 20},
                                                 "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                                                 "required": ["street", "zip"], "additionalProperties": False}},
            "required": ["name", "height_m", "address"], "additionalProperties": False}}},
         "required": ["people"], "additionalProperties": False},
    ]
    client = server.client()
    for i, schema in enumerate(schemas):
        r = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "Answer in JSON."}], max_tokens=300,
            temperature=1.0, seed=i, n=2,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}})
        for choice in r.choices:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), schema)
    ask = [{"role": "user", "content": "Describe a cat as a JSON object with a name and an age."}]
    chunks = client.chat.completions.create(model="smollm2", messages=ask, max_tokens=200, temperature=0, stream=True,
                                            response_format={"type": "json_object"})
    assert isinstance(json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)), dict)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}


def test_tool_calls(server):
    """tool_choice "required" and a named function give calls whose arguments validate against the
    tool's schema (stream and not); the call and the tool's result go back through the template."""
    from pocketlm.tools import closed_objects

    jsonschema = pytest.importorskip("jsonschema")
    client = server.client()
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model="smollm2", messages=ask, tools=[WEATHER, ADD], tool_choice="required",
                                       temperature=1.0, seed=4, max_tokens=200)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    schema = {"get_weather": WEATHER, "add": ADD}[call.function.name]["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), closed_objects(schema))
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=ask, tools=[WEATHER, ADD], tool_choice={"type": "function", "function": {"name": "add"}},
        temperature=1.0, seed=5, max_tokens=200, stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [tc.function.name for tc in calls] == ["add"] and chunks[-1].choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(calls[0].function.arguments), closed_objects(ADD["function"]["parameters"]))
    # the round trip: the call and the result are in the next prompt, and the model answers
    history = ask + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": "clear"}'}]
    auth = {"Authorization": f"Bearer {API_KEY}"}
    prompt = httpx.post(server.url + "/apply-template", headers=auth,
                        json={"model": "smollm2", "messages": history, "tools": [WEATHER, ADD]}).json()["prompt"]
    assert '<tool_response>\n{"temperature": 18, "sky": "clear"}\n</tool_response>' in prompt
    assert f'"name": "{call.function.name}", "arguments": {call.function.arguments}' in prompt
    assert '"name": "get_weather", "description": "The current weather in a city"' in prompt  # the tools, described
    r = client.chat.completions.create(model="smollm2", messages=history, tools=[WEATHER, ADD], temperature=0,
                                       max_tokens=30)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # bad tool requests
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=ask, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert _status(e.value)[1]["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=ask, tools=[{"type": "function", "function": {}}])
    assert _status(e.value)[1]["param"] == "tools"


def test_embeddings(server, reference):
    """Both encodings (the client asks for base64 unless told otherwise) against Engine.embed in this process."""
    import numpy as np

    client = server.client()
    texts = ["The cat sat on the mat.", "A dog barked.", "Paris is the capital of France."]
    expected = reference["smollm2"].embed(texts)
    import base64

    for encoding in (None, "float", "base64"):  # None: the client asks for base64 and decodes it itself
        kwargs = {"encoding_format": encoding} if encoding else {}
        r = client.embeddings.create(model="smollm2", input=texts, **kwargs)
        got = np.array([np.frombuffer(base64.b64decode(d.embedding), "<f4") if encoding == "base64" else d.embedding
                        for d in r.data], dtype=np.float32)
        assert [d.index for d in r.data] == [0, 1, 2] and got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-6)
        ids = [reference["smollm2"].tokenizer.encode(t, add_special_tokens=True) for t in texts]
        assert r.usage.prompt_tokens == sum(map(len, ids))
    r = client.embeddings.create(model="smollm2", input=ids[0])  # token ids
    np.testing.assert_allclose(r.data[0].embedding, expected[0], atol=1e-6)
    # similar texts are closer than unrelated ones
    r = client.embeddings.create(model="smollm2", input=["I love cats.", "I adore cats.", "Stock prices fell."])
    a, b, c = (np.array(d.embedding) for d in r.data)
    assert a @ b > a @ c
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="smollm2", input="x", dimensions=7)
    assert _status(e.value)[1]["param"] == "dimensions"
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="smollm2", input="word " * 1500)
    assert _status(e.value)[1]["code"] == "context_length_exceeded"


def _status(e: openai.APIStatusError) -> tuple[int, dict]:
    return e.status_code, e.response.json()["error"]


def test_errors(server):
    client = server.client()
    # 401: a wrong key, no key; /health needs none
    with pytest.raises(openai.AuthenticationError) as e:
        server.client(api_key="wrong").models.list()
    assert _status(e.value)[1]["code"] == "invalid_api_key"
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    # 404: an unknown model, an unknown route
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert _status(e.value)[1] == {"message": e.value.response.json()["error"]["message"],
                                   "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
    auth = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.get(server.url + "/v1/nothing", headers=auth)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    # 400 with the field named
    cases = [(dict(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
             (dict(messages=QUESTION, temperature=3), "temperature"),
             (dict(messages=QUESTION, max_tokens=0), "max_tokens"),
             (dict(messages=QUESTION, stop=["a", "b", "c", "d", "e"]), "stop"),
             (dict(messages=[]), "messages"),
             (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
              "messages[0].content[0].type"),
             (dict(messages=QUESTION, response_format={"type": "json_schema",
                                                       "json_schema": {"name": "x", "schema": {"$ref": "#/nope"}}}),
              "response_format"),
             (dict(messages=QUESTION, response_format={"type": "yaml"}), "response_format"),
             (dict(messages=QUESTION, top_logprobs=2), "top_logprobs"),
             (dict(messages=QUESTION, stop=["x" * 1001]), "stop"),
             (dict(messages=QUESTION + [{"role": "assistant", "content": None, "tool_calls": [{"id": "x"}]}]),
              "messages[1].tool_calls[0]"),
             (dict(messages=QUESTION, logprobs=True, top_logprobs=21), "top_logprobs")]
    for fields, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="smollm2", **fields)
        assert _status(e.value)[1]["param"] == param, fields
    for content_type in ({"Content-Type": "application/json"}, {}):  # curl -d sends no JSON type
        r = httpx.post(server.url + "/v1/chat/completions", headers={**auth, **content_type}, content=b"{not json")
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", headers=auth, json={"messages": QUESTION})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    # 400: a prompt longer than the context (named by the field that holds it); too many generations
    long = [{"role": "user", "content": "word " * 1500}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=long)
    assert _status(e.value)[1]["code"] == "context_length_exceeded" and _status(e.value)[1]["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smollm2", prompt="word " * 1500)
    assert _status(e.value)[1]["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=["a"] * 17, max_tokens=2)
    assert _status(e.value)[1]["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="tiny", input=[[1]] * 2049)
    assert _status(e.value)[1]["param"] == "input"
    # 413: a body over 16 MiB, with a Content-Length and chunked
    big = b'{"model": "smollm2", "messages": [], "x": "' + b"x" * (17 << 20) + b'"}'
    r = httpx.post(server.url + "/v1/chat/completions", headers=auth, content=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(server.url + "/v1/chat/completions", headers=auth,
                   content=iter([big[i:i + (1 << 20)] for i in range(0, len(big), 1 << 20)]))
    assert r.status_code == 413
    # every response names its request id; a client's own is echoed
    r = httpx.get(server.url + "/v1/models", headers={**auth, "X-Request-Id": "my-id-1"})
    assert r.headers["x-request-id"] == "my-id-1"
    assert httpx.get(server.url + "/health").headers["x-request-id"].startswith("req-")


def test_concurrent_clients_with_cancellations(server, reference):
    """16 clients at once, 4 of them hanging up after two chunks: the others get what one fresh
    session answers alone, and nothing is left running."""
    questions = [f"Name one fact about the number {i}." for i in range(16)]
    expected = [fresh_chat(reference["smollm2"], [{"role": "user", "content": q}], max_tokens=24,
                           temperature=0)[0] for q in questions]
    got: list[str | None] = [None] * 16
    errors: list[BaseException] = []
    client = server.client()

    def ask(i: int) -> None:
        try:
            stream = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": questions[i]}],
                                                    max_tokens=24 if i < 12 else 2000, temperature=0, stream=True)
            text = ""
            for n, chunk in enumerate(stream):
                text += chunk.choices[0].delta.content or "" if chunk.choices else ""
                if i >= 12 and n == 2:
                    stream.close()
                    break
            got[i] = text
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert got[:12] == expected[:12]
    assert all(expected[i].startswith(got[i]) for i in range(12, 16))
    deadline = time.monotonic() + 10  # a cancelled generation leaves at its next step
    while metric(server, "pocketlm_running_sequences", model="smollm2") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, "pocketlm_running_sequences", model="smollm2") == 0
    assert metric(server, "pocketlm_kv_cache_bytes", model="smollm2") == 0


def test_disconnect_cancels_a_non_streamed_request(server):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    # a frequency penalty of -2 and no repetition penalty (the model's default 1.1 would fight it):
    # an answer that repeats itself rather than ends before the client gives up
    body = {"model": "smollm2", "messages": QUESTION, "max_tokens": 1000, "temperature": 1.0,
            "frequency_penalty": -2, "repeat_penalty": 1.0}
    # sampled, an answer may still end within the client's second (it did once in CI): then ask again
    for _ in range(4):
        before = metric(server, "pocketlm_generated_tokens_total", model="smollm2")
        try:
            httpx.post(server.url + "/v1/chat/completions", headers=auth, json=body, timeout=1.0)
        except httpx.ReadTimeout:
            break
    else:
        pytest.fail("four sampled answers in a row ended within a second: nothing to cancel")
    deadline = time.monotonic() + 10
    while metric(server, "pocketlm_running_sequences", model="smollm2") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, "pocketlm_running_sequences", model="smollm2") == 0
    # it stopped early: far fewer than the 1000 tokens it asked for
    assert metric(server, "pocketlm_generated_tokens_total", model="smollm2") - before < 600


def test_metrics_format(server):
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    for family in ("pocketlm_requests_total", "pocketlm_queue_depth", "pocketlm_running_sequences",
                   "pocketlm_kv_cache_bytes", "pocketlm_prompt_tokens_total", "pocketlm_generated_tokens_total",
                   "pocketlm_time_to_first_token_seconds", "pocketlm_decode_tokens_per_second"):
        assert f"# TYPE {family} " in text
    assert metric(server, "pocketlm_requests_total", route="/v1/chat/completions", status="200") >= 1
    assert metric(server, "pocketlm_time_to_first_token_seconds_count", model="smollm2") >= 1
    count = metric(server, "pocketlm_time_to_first_token_seconds_count", model="smollm2")
    assert metric(server, 'pocketlm_time_to_first_token_seconds_bucket', model="smollm2", le="+Inf") == count
