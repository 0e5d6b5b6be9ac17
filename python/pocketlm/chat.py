"""Chat messages -> prompt text, with the model's Jinja chat template.

Templates come with the model (tokenizer_config.json or GGUF metadata) and are untrusted, so they run in
a jinja2 sandbox: jinja2's immutable one, extended in chat_sandbox.py to bound rendering time, the size
of every value and of the output (a hostile template fails with ChatTemplateError naming the limit).
The environment mirrors transformers' `apply_chat_template`, so a template renders here exactly as it
does there: trim_blocks and lstrip_blocks, the loopcontrols extension,
`raise_exception(msg)`, a `tojson` filter that keeps non-ASCII as is and takes indent/separators/sort_keys,
`strftime_now(fmt)`, and the `{% generation %}` block tag (rendered as its plain content).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from pocketlm.errors import ChatTemplateError, InvalidInputError, shown

# Characters of a template's own message (raise_exception, an error it caused) quoted in ours: they may
# quote template values, which may be huge.
MESSAGE_CHARS = 500

# ChatML, for bundles whose model has no template of its own.
default_chat_template = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True, bos_token: str = "",
                eos_token: str = "", tools: list[dict] | None = None, **extra: Any) -> str:
    """The prompt text for `messages` (dicts with string "role" and "content").

    Raises InvalidInputError (a ValueError) for malformed messages or tools, ChatTemplateError when
    the template does not compile, fails, or goes over a limit of chat_sandbox.py.

    add_generation_prompt appends the header of an assistant turn, so that the model answers next.
    bos_token/eos_token are the strings templates may write themselves; tools are JSON schemas for
    templates that support tool calling; `extra` is passed to the template as further variables.
    """
    _check_messages(messages)
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise InvalidInputError("tools must be a list of dicts (JSON schemas)")
    compiled = _compile(template)
    try:
        return _environment().render(compiled, messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=bos_token, eos_token=eos_token, tools=tools, **extra)
    except ChatTemplateError:
        raise
    except Exception as e:  # jinja2 errors, and Python errors raised inside the sandbox
        raise ChatTemplateError(f"chat template failed: {_describe(e)}") from e


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise InvalidInputError(f"messages must be a list of dicts, not {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidInputError(f"messages[{i}] must be a dict, not {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise InvalidInputError(f"messages[{i}] needs a non-empty string 'role', got {shown(role)}")
        # An assistant turn that only calls tools may carry no text.
        if content is None and role == "assistant" and m.get("tool_calls"):
            continue
        if not isinstance(content, str):
            raise InvalidInputError(f"messages[{i}] ({shown(role)}) needs a string 'content', "
                                    f"got {type(content).__name__}")


def _describe(e: BaseException) -> str:
    line = getattr(e, "lineno", None)
    where = f" (template line {line})" if line else ""
    return f"{type(e).__name__}: {shown(str(e), MESSAGE_CHARS)}{where}"


@lru_cache(maxsize=16)
def _compile(template: str):
    if not isinstance(template, str):
        raise ChatTemplateError(f"chat template must be a string, not {type(template).__name__}")
    try:
        return _environment().compile_template(template)
    except ChatTemplateError:
        raise
    except Exception as e:
        raise ChatTemplateError(f"chat template does not compile: {_describe(e)}") from e


@lru_cache(maxsize=1)
def _environment():
    import jinja2
    from jinja2.ext import Extension, loopcontrols

    from pocketlm.chat_sandbox import BoundedSandbox, _charge, _printed_size

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; here it is a no-op."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        text = str(message) if _printed_size(message) < 10_000 else "..."
        raise ChatTemplateError(f"chat template raised: {shown(text, MESSAGE_CHARS)}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Unlike jinja2's own tojson: no HTML escaping, non-ASCII kept (what templates were written against).
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        if isinstance(fmt, str):
            _charge(16 * len(fmt))  # a directive is 2 characters and prints at most ~30
        return datetime.now().strftime(fmt)

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.guard_filters()
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env
