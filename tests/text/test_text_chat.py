"""render_chat vs transformers' apply_chat_template(..., tokenize=False) on the same templates."""

from __future__ import annotations

import pytest

from pocketlm.chat import ChatTemplateError, default_chat_template, render_chat

# Qwen2.5-style ChatML: a default system prompt when none is given, and tools rendered with tojson.
QWEN_STYLE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Exercises the environment: loopcontrols, namespace, indentation via trim/lstrip blocks, tojson options.
FEATURES = """{% set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m.role == 'system' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    [{{ ns.n }}] {{ m.role | upper }}: {{ m.content }}
    {% if ns.n >= 3 %}{% break %}{% endif %}
{% endfor %}
{{ {"é": [1, 2], "a": "<b>"} | tojson(indent=2, sort_keys=True) }}
{% generation %}{{ bos_token }}|{{ eos_token }}{% endgeneration %}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi, how can I help?"},
     {"role": "user", "content": "Tell me a joke about café owners 😀"},
     {"role": "assistant", "content": "No."}, {"role": "user", "content": "多谢\nline two"}],
]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city, ünïcode",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def templates(smollm_fields):
    return {"smollm": smollm_fields["tokenizer.chat_template"], "qwen": QWEN_STYLE, "features": FEATURES,
            "chatml": default_chat_template}


@pytest.mark.parametrize("name", ["smollm", "qwen", "features", "chatml"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_transformers(hf_smollm_tokenizer, templates, name, add_generation_prompt):
    hf = hf_smollm_tokenizer
    for messages in CONVERSATIONS:
        expected = hf.apply_chat_template(messages, chat_template=templates[name], tokenize=False,
                                          add_generation_prompt=add_generation_prompt)
        got = render_chat(templates[name], messages, add_generation_prompt=add_generation_prompt,
                          bos_token=hf.bos_token, eos_token=hf.eos_token)
        assert got == expected, (name, messages)


def test_tools_match_transformers(hf_smollm_tokenizer):
    messages = CONVERSATIONS[1]
    expected = hf_smollm_tokenizer.apply_chat_template(messages, chat_template=QWEN_STYLE, tools=TOOLS,
                                                       tokenize=False, add_generation_prompt=True)
    assert render_chat(QWEN_STYLE, messages, tools=TOOLS) == expected
    assert '"description": "Weather in a city, ünïcode"' in expected


def test_smollm_template_text(smollm_fields):
    got = render_chat(smollm_fields["tokenizer.chat_template"], CONVERSATIONS[0])
    assert got == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                   "<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")


def test_extras_and_strftime():
    template = "{{ strftime_now('%Y') | length }} {{ greeting }}"
    assert render_chat(template, [], greeting="hello") == "4 hello"


def test_template_errors_are_chat_template_errors():
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_chat("{{ raise_exception('roles must alternate') }}", CONVERSATIONS[0])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat("{% for m in messages %}", CONVERSATIONS[0])
    with pytest.raises(ChatTemplateError):
        render_chat("{{ messages[5]['content'] + 1 }}", CONVERSATIONS[0])
    with pytest.raises(ChatTemplateError):  # the sandbox refuses attribute escapes
        render_chat("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", CONVERSATIONS[0])
    with pytest.raises(ChatTemplateError):  # immutable: templates cannot change the caller's messages
        render_chat("{{ messages.append(1) }}", CONVERSATIONS[0])


@pytest.mark.parametrize("messages, message", [
    ("hi", "list"),
    ([["user", "hi"]], r"messages\[0\] must be a dict"),
    ([{"content": "hi"}], "role"),
    ([{"role": "user"}], "content"),
    ([{"role": "user", "content": 3}], "content"),
])
def test_invalid_messages(messages, message):
    with pytest.raises(ValueError, match=message):
        render_chat(default_chat_template, messages)


def test_tool_call_message_without_content():
    messages = [{"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]}]
    assert render_chat("{{ messages[0].tool_calls[0].name }}", messages) == "f"
