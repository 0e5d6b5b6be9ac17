"""Tool calling: tools into the prompt, the model's calls out of its text.

Tools are OpenAI's `{"type": "function", "function": {"name", "description", "parameters"}}`.

Into the prompt: a chat template that knows tools (it reads `tools`, as Qwen2.5's, Hermes', Llama
3.1's and Mistral's do) gets them as HF's `apply_chat_template(..., tools=...)` passes them. A
template that does not (SmolLM2's) gets them described in the system message, with the Hermes call
syntax that Qwen, Hermes and SmolLM-style instruct models know; earlier calls and tool results are
then written in that syntax too (calls in the assistant's text, results as user turns in
<tool_response> tags), so that any template can render the conversation.

Out of the text (`parse_tool_calls`), whichever syntax the model used:
    Hermes / Qwen2.5     <tool_call>{"name": ..., "arguments": {...}}</tool_call>  (one or more)
    Llama 3.x            {"name": ..., "parameters": {...}}  (the whole reply, maybe after <|python_tag|>)
    Mistral              [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]
Only calls of the tools offered count; anything else stays text.

`tool_choice="required"` or a named function constrains the reply to one call in the model's syntax,
its arguments to the tool's JSON schema (`call_grammar`, a Lark grammar for pocketlm.constrain).
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from pocketlm.constrain import JSON_LAYOUT, bounded_numbers
from pocketlm.errors import InvalidInputError

HERMES, LLAMA3, MISTRAL = "hermes", "llama3", "mistral"

_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def check_tools(tools: Any) -> list[dict]:
    """The tools as a list of OpenAI function tools; InvalidInputError naming the first bad one."""
    if not isinstance(tools, list):
        raise InvalidInputError("tools must be a list")
    names = set()
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise InvalidInputError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise InvalidInputError(f"tools[{i}].function.name must be 1-64 letters, digits, _ . or -")
        if name in names:
            raise InvalidInputError(f"tools[{i}].function.name {name!r} is given twice")
        names.add(name)
        if not isinstance(fn.get("parameters", {}), dict):
            raise InvalidInputError(f"tools[{i}].function.parameters must be a JSON schema object")
    return tools


def template_syntax(template: str | None) -> str | None:
    """The call syntax a chat template renders tools in, or None when it does not read `tools`."""
    if not template or "tools" not in template:
        return None
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "<|python_tag|>" in template or "ipython" in template:
        return LLAMA3
    return HERMES


def _arguments_object(arguments: Any) -> Any:
    """OpenAI sends arguments as a JSON string; templates expect the object (as llama-server passes it)."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def prompt_messages(messages: list[dict], tools: list[dict] | None, template: str | None) -> tuple[list[dict], bool]:
    """The messages to render, and whether to pass `tools` to the template itself."""
    native = template_syntax(template) is not None
    if native:
        out = []
        for m in messages:
            if m.get("tool_calls"):
                m = {**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": _arguments_object(
                    c["function"].get("arguments"))}} for c in m["tool_calls"]]}
            out.append(m)
        return out, bool(tools)
    out = []
    for m in messages:
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = "\n".join(_hermes_text(c["function"]["name"], _arguments_object(c["function"].get("arguments")))
                              for c in m["tool_calls"])
            out.append({"role": "assistant", "content": ((m.get("content") or "") + "\n" + calls).strip()})
        elif m.get("role") == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"})
        else:
            out.append(m)
    if tools:
        described = _describe(tools)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{described}"}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out, False


def _hermes_text(name: str, arguments: Any) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n</tool_call>"


def _describe(tools: list[dict]) -> str:
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("You can call functions to answer the user. The functions, as JSON schemas:\n<tools>\n"
            f"{listed}\n</tools>\n"
            "To call one, reply with a JSON object with its name and arguments inside <tool_call></tool_call> "
            'tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def closed_objects(schema: Any) -> Any:
    """A copy of `schema` whose objects with `properties` and no `additionalProperties` of their own
    take no other keys (as OpenAI's strict mode): a function called with an argument it does not
    declare would fail."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (closed_objects(v) if k not in ("properties", "$defs", "definitions") else
               {name: closed_objects(sub) for name, sub in v.items()} if isinstance(v, dict) else v)
           for k, v in schema.items() if k not in ("enum", "const", "default", "examples")}
    out.update({k: schema[k] for k in ("enum", "const", "default", "examples") if k in schema})
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def call_grammar(tools: list[dict], syntax: str | None) -> str:
    """A Lark grammar (llguidance's) for exactly one call of one of `tools`, in `syntax` (None: the
    Hermes syntax the system message taught). Arguments follow each tool's parameters, objects closed
    (closed_objects) and numbers bounded (constrain.bounded_numbers)."""
    key = "parameters" if syntax == LLAMA3 else "arguments"
    one_of = [{"type": "object", "properties": {
        "name": {"const": t["function"]["name"]},
        key: bounded_numbers(closed_objects(t["function"].get("parameters") or {"type": "object"}))},
        "required": ["name", key], "additionalProperties": False} for t in tools]
    schema = json.dumps({"anyOf": one_of, "x-guidance": JSON_LAYOUT}, ensure_ascii=False)
    if syntax == LLAMA3:
        return f"start: call\ncall: %json {schema}"
    if syntax == MISTRAL:
        return f'start: "[TOOL_CALLS][" call "]"\ncall: %json {schema}'
    return f'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: %json {schema}'


def _as_call(obj: Any, names: set[str]) -> dict | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):
        arguments = _arguments_object(arguments)
    if not isinstance(arguments, dict):  # cut short, or not an object: no call a client could make
        return None
    return {"id": "call_" + secrets.token_hex(12), "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _json_prefix(text: str) -> tuple[Any, int] | None:
    try:
        return json.JSONDecoder().raw_decode(text)
    except ValueError:
        return None


def parse_tool_calls(text: str, tools: list[dict]) -> tuple[str | None, list[dict]]:
    """(content left, tool calls) from a reply; calls only of the tools offered, in OpenAI's shape
    (arguments as a JSON string)."""
    names = {t["function"]["name"] for t in tools}
    calls = []
    if "<tool_call>" in text:
        for body in _HERMES_CALL.findall(text):
            parsed = _json_prefix(body)
            call = _as_call(parsed[0], names) if parsed else None
            if call is not None:
                calls.append(call)
        if calls:
            content = _HERMES_CALL.sub("", text).strip()
            return content or None, calls
    stripped = text.strip()
    if stripped.startswith("[TOOL_CALLS]"):
        parsed = _json_prefix(stripped[len("[TOOL_CALLS]"):].lstrip())
        items = parsed[0] if parsed else None
        items = items if isinstance(items, list) else [items]
        calls = [c for c in (_as_call(i, names) for i in items) if c is not None]
        if calls:
            return None, calls
    if stripped.startswith("<|python_tag|>"):
        stripped = stripped[len("<|python_tag|>"):].lstrip()
    if stripped.startswith(("{", "[")):
        parsed = _json_prefix(stripped)
        if parsed and not stripped[parsed[1]:].strip(" \n;"):
            items = parsed[0] if isinstance(parsed[0], list) else [parsed[0]]
            calls = [c for c in (_as_call(i, names) for i in items) if c is not None]
            if calls and len(calls) == len(items):
                return None, calls
    return text, []
