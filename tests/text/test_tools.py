"""Tool calls out of a model's text in each family's documented syntax (Qwen2.5 / Hermes, Llama 3.1,
Mistral), the forced-call grammar (its outputs validate against the tool's schema), and tools into
prompts of templates with and without tool support."""

from __future__ import annotations

import json

import pytest

from pocketlm.tools import (HERMES, LLAMA3, MISTRAL, closed_objects, parse_tool_calls, prompt_messages,
                            template_syntax)

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}}]


def calls(text):
    content, found = parse_tool_calls(text, TOOLS)
    return content, [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in found]


def test_hermes_and_qwen():
    # Qwen2.5's template: "<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>"
    assert calls('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>') == \
        (None, [("get_weather", {"city": "Paris"})])
    text = ('Let me check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2.5}}\n</tool_call>')
    assert calls(text) == ("Let me check both.", [("get_weather", {"city": "Oslo"}), ("add", {"a": 1, "b": 2.5})])
    # cut before its closing tag (max_tokens): still a call if its JSON is whole
    assert calls('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}')[1] == [("add", {"a": 1, "b": 2})]
    # arguments given as a JSON string, as some fine-tunes write them
    assert calls('<tool_call>{"name": "add", "arguments": "{\\"a\\": 3}"}</tool_call>')[1] == [("add", {"a": 3})]


def test_llama3_and_mistral():
    # Llama 3.1: {"name": function name, "parameters": dictionary of argument name and its value}
    assert calls('{"name": "get_weather", "parameters": {"city": "Rome"}}') == (None, [("get_weather", {"city": "Rome"})])
    assert calls('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 1}}')[1] == [("add", {"a": 1, "b": 1})]
    assert calls('[TOOL_CALLS] [{"name": "add", "arguments": {"a": 2, "b": 2}}, '
                 '{"name": "get_weather", "arguments": {"city": "Lima"}}]')[1] == \
        [("add", {"a": 2, "b": 2}), ("get_weather", {"city": "Lima"})]


@pytest.mark.parametrize("text", [
    "The weather is fine.",
    '{"name": "delete_everything", "arguments": {}}',        # not a tool that was offered
    '<tool_call>{"name": "rm", "arguments": {}}</tool_call>',
    '{"name": "add", "parameters": {"a": 1}} and more text',  # JSON then prose: an answer
    '{"city": "Paris", "temperature": 20}',                   # a JSON answer, not a call
    "<tool_call>{not json}</tool_call>",
    '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1"}</tool_call>',  # arguments cut short
    '{"name": "add", "arguments": [1, 2]}',                  # arguments that are no object
])
def test_text_that_is_no_call_stays_text(text):
    assert parse_tool_calls(text, TOOLS) == (text, [])


def test_template_syntax():
    assert template_syntax(None) is None
    assert template_syntax("{{ messages }}") is None
    assert template_syntax("{% if tools %}<tool_call>{% endif %}") == HERMES
    assert template_syntax("{% if tools %}<|python_tag|>{% endif %}") == LLAMA3
    assert template_syntax("{% if tools %}[TOOL_CALLS]{% endif %}") == MISTRAL


def test_messages_for_templates_with_and_without_tools():
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 18}'}]
    # a template that reads tools: the messages as they are, arguments as an object, tools passed on
    native, pass_tools = prompt_messages(history, TOOLS, "{% if tools %}<tool_call>{% endif %}")
    assert pass_tools and native[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert native[2] == history[2]
    # one that does not: a system message describes them; calls and results in the Hermes syntax
    plain, pass_tools = prompt_messages(history, TOOLS, "{{ messages }}")
    assert not pass_tools and plain[0]["role"] == "system" and '"name": "get_weather"' in plain[0]["content"]
    assert plain[2] == {"role": "assistant",
                        "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'}
    assert plain[3] == {"role": "user", "content": '<tool_response>\n{"temp": 18}\n</tool_response>'}
    assert parse_tool_calls(plain[2]["content"], TOOLS)[1][0]["function"]["name"] == "get_weather"


def test_closed_objects():
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"x": {"type": "integer"}}},
                                               "b": {"type": "array", "items": {"type": "object", "properties": {}}},
                                               "c": {"type": "object", "properties": {}, "additionalProperties": True},
                                               "d": {"enum": [{"properties": 1}]}}}
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["b"]["items"]["additionalProperties"] is False
    assert closed["properties"]["c"]["additionalProperties"] is True
    assert closed["properties"]["d"] == {"enum": [{"properties": 1}]}  # values are not schemas
    assert "additionalProperties" not in schema  # the caller's schema is untouched


def test_forced_calls_validate(smollm2_gguf):
    """The call grammar in each syntax: SmolLM2 at temperature 1, every call parses and its arguments
    validate against the tool's schema (closed)."""
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    from pocketlm import Engine
    from pocketlm.tools import call_grammar

    engine = Engine("smollm2", threads=2, max_context=512)
    for syntax in (None, LLAMA3, MISTRAL):
        for seed in range(4):
            text = "".join(engine.create_session().generate("Call a function: ", grammar=call_grammar(TOOLS, syntax),
                                                            temperature=1.0, seed=seed, max_tokens=200))
            _, found = parse_tool_calls(text, TOOLS)
            assert len(found) == 1, (syntax, text)
            fn = found[0]["function"]
            schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == fn["name"])
            jsonschema.validate(json.loads(fn["arguments"]), closed_objects(schema))
