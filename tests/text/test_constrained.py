"""Constrained decoding (pocketlm.constrain): whatever the model prefers, the output matches the JSON
schema, regular expression or grammar. Checked with the references for each: `jsonschema` validates
every output against its schema (random schemas from a generator: nested objects, enums, arrays,
numbers with bounds), Python's `re` matches the regex outputs, and unconstrained sequences batched
with constrained ones answer as fresh sessions alone."""

from __future__ import annotations

import json
import random
import re

import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

from pocketlm import ConstraintError, Engine  # noqa: E402

NAMES = ["id", "name", "size", "tags", "kind", "ok", "items", "score", "meta", "when"]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    kinds = ["integer", "number", "string", "enum", "boolean"] + (["object", "array"] * 2 if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "object" or depth == 0:
        names = rng.sample(NAMES, rng.randint(1, 4))
        return {"type": "object", "properties": {n: random_schema(rng, depth + 1) for n in names},
                "required": rng.sample(names, rng.randint(1, len(names))), "additionalProperties": False}
    if kind == "array":
        low = rng.randint(0, 2)
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": low,
                "maxItems": low + rng.randint(0, 2)}
    if kind == "integer":
        low = rng.randint(-1000, 1000)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 5000)}
    if kind == "number":
        low = rng.uniform(-100, 100)
        return {"type": "number", "minimum": round(low, 2), "maximum": round(low + rng.uniform(0.5, 500), 2)}
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(3, 16)}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "a b", "x\"y", "1", "café"], rng.randint(2, 4))}
    return {"type": "boolean"}


@pytest.fixture(scope="module")
def engine(smollm2_gguf):
    return Engine("smollm2", threads=2, max_context=1024)


def test_random_schemas_always_validate(engine):
    """24 random schemas, sampled at temperature 1 (the model's worst guesses get through the mask too),
    all submitted at once so that the constrained sequences share steps."""
    rng = random.Random(2024)
    schemas = [random_schema(rng) for _ in range(24)]
    prompt = engine.tokenizer.encode(engine.apply_chat_template(
        [{"role": "user", "content": "Reply with a JSON object."}]), add_special_tokens=False)
    requests = [engine.submit(prompt, max_tokens=400, temperature=1.0, seed=i,
                              response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": s}})
                for i, s in enumerate(schemas)]
    for schema, request in zip(schemas, requests):
        text = request.result(timeout=300)
        assert request.finish_reason == "stop", (schema, text)
        jsonschema.validate(json.loads(text), schema)


def test_json_object_regex_and_grammars(engine):
    s = engine.create_session()
    text = "".join(s.chat([{"role": "user", "content": "Describe a cat."}], max_tokens=200, temperature=0.9, seed=3,
                          response_format={"type": "json_object"}))
    assert isinstance(json.loads(text), dict) and s.last_stats.finish_reason == "stop"
    for pattern in (r"\d{3}-\d{4}", r"(yes|no|maybe)", r"[A-Z][a-z]{2,8}( [A-Z][a-z]{2,8})?"):
        for seed in range(3):
            out = "".join(engine.create_session().generate("Answer: ", regex=pattern, temperature=1.0, seed=seed,
                                                           max_tokens=40))
            assert re.fullmatch(pattern, out), (pattern, out)
    gbnf = 'root ::= "The answer is " ("yes" | "no") "."'
    lark = 'start: "The answer is " ANSWER "."\nANSWER: "yes" | "no"'
    for grammar in (gbnf, lark):
        out = "".join(engine.create_session().generate("Is water wet? ", grammar=grammar, temperature=1.0, seed=5))
        assert out in ("The answer is yes.", "The answer is no.")


def test_unconstrained_neighbours_are_unaffected(engine):
    """Plain generations batched with constrained ones give what they give alone."""
    prompts = [f"Tell me about the number {i}." for i in range(3)]
    alone = ["".join(engine.create_session().generate(p, max_tokens=24, temperature=0)) for p in prompts]
    mixed = []
    for i, p in enumerate(prompts):
        mixed.append(engine.submit(p, max_tokens=24, temperature=0))
        mixed.append(engine.submit(p, max_tokens=40, temperature=1.0, seed=i, regex=r"[a-z ]{5,30}\."))
    assert [r.result(timeout=120) for r in mixed[0::2]] == alone
    assert all(re.fullmatch(r"[a-z ]{5,30}\.", r.result(timeout=120)) for r in mixed[1::2])


def test_with_speculative_decoding(smollm2_gguf):
    """An engine that speculates leaves constrained generations to plain steps (the output still matches)."""
    engine = Engine("smollm2", threads=2, max_context=512, lookup=True)
    out = "".join(engine.create_session().generate("List: 1, 2, 3, 4, 5, 6", regex=r"(, \d){3}", temperature=0))
    assert re.fullmatch(r"(, \d){3}", out)


def test_bad_constraints(engine):
    s = engine.create_session()
    cases = [(dict(regex="("), "unclosed group"),
             (dict(grammar='root ::= "a" missing'), "Rule 'missing' not found"),
             (dict(grammar="start: foo"), "foo"),
             (dict(response_format={"type": "json_schema", "json_schema": {"schema": {"$ref": "#/nope"}}}), "nope"),
             (dict(regex="a", grammar='start: "a"'), "give one of"),
             (dict(response_format={"type": "yaml"}), "response_format.type must be"),
             (dict(response_format={"type": "json_schema", "json_schema": {"schema": []}}), "must be an object")]
    for kwargs, message in cases:
        with pytest.raises(ConstraintError, match=re.escape(message)):
            "".join(s.generate("x", max_tokens=4, **kwargs))
    assert "".join(s.generate("x", max_tokens=2, temperature=0))  # the session still works
