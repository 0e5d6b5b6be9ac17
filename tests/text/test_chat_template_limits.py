"""Chat templates are bounded in time and memory (issue 10 item 4): each hostile template fails with
ChatTemplateError naming the limit it hit, through render_chat, Engine.apply_chat_template and the CLI,
within a time bound and (in a child process) under an address-space limit. The bounded sandbox renders
ordinary templates exactly as transformers does, including every construct it rewrites."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testutil import child_env, rewrite_bundle

from pocketlm import chat_sandbox
from pocketlm.chat import default_chat_template, render_chat
from pocketlm.errors import ChatTemplateError

HI = [{"role": "user", "content": "hi"}]
BIG = "{% set b = 'x' * 2000000 %}"  # a string just under MAX_VALUE_SIZE
# Two long strings that differ only at the end, so comparing them reads them whole.
TWINS = "{% set p = 'x' * 1999999 %}{% set s1 = p ~ 'a' %}{% set s2 = p ~ 'b' %}"
# Hashing nested tuples recurses in C without a depth check: 300k levels crash CPython.
DEEP_TUPLE = "{% set ns = namespace(t=()) %}{% for i in range(300) %}{% set ns.t = (ns.t,) %}{% endfor %}"

# name -> (template, the limit the error must name)
HOSTILE = {
    "nested range loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                           "MAX_RENDER_SECONDS"),
    "loops over a long string": (BIG + "{% for c in b %}{% for d in b %}{% endfor %}{% endfor %}",
                                 "MAX_RENDER_SECONDS"),
    "exponential macro": ("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
                          "MAX_RENDER_SECONDS"),
    "macro recursion": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
    "string repetition": ("{{ 'x' * 10**10 }}", "MAX_VALUE_SIZE"),
    "list repetition": ("{{ [1] * 10**10 }}", "MAX_VALUE_SIZE"),
    "printing shared references": (BIG + "{{ [b] * 1000 }}", "MAX_VALUE_SIZE"),
    "doubling with +": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                        "{% endfor %}", "MAX_VALUE_SIZE"),
    "doubling with ~": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                        "{% endfor %}", "MAX_VALUE_SIZE"),
    "doubling a list": ("{% set ns = namespace(s=[1]) %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                        "{% endfor %}", "MAX_RENDER_CHARS"),  # 32 per item: before the value limit
    "many distinct strings": (BIG + "{% set l = [" + ", ".join(f"b ~ {i}" for i in range(40)) + "] %}",
                              "MAX_RENDER_CHARS"),
    "many encoded copies": (BIG + "{% set l = [" + ", ".join(["b.encode()"] * 40) + "] %}", "MAX_RENDER_CHARS"),
    "many slices": (BIG + "{% set l = [" + ", ".join(f"b[{i}:]" for i in range(40)) + "] %}", "MAX_RENDER_CHARS"),
    "join filter": (BIG + "{{ ([b] * 1000)|join }}", "MAX_VALUE_SIZE"),
    "join separator": (BIG + "{{ range(1000)|join(b) }}", "MAX_VALUE_SIZE"),
    "str.join": (BIG + "{{ b.join(range(1000)|map('string')) }}", "MAX_VALUE_SIZE"),
    "% width": ("{{ '%999999999s' % 'x' }}", "MAX_VALUE_SIZE"),
    "% precision": ("{{ '%.999999999f' % 1.0 }}", "MAX_VALUE_SIZE"),
    "% star width": ("{{ '%*s' % (999999999, 'x') }}", "'*' width"),
    "% many fields": (BIG + "{{ ('%s' * 100) % ((b,) * 100) }}", "MAX_VALUE_SIZE"),
    "format filter": ("{{ '%999999999s'|format('x') }}", "MAX_VALUE_SIZE"),
    "str.format width": ("{{ '{:999999999}'.format('x') }}", "MAX_VALUE_SIZE"),
    "str.format nested width": ("{{ '{:{w}}'.format('x', w=999999999) }}", "MAX_VALUE_SIZE"),
    "str.format many fields": (BIG + "{{ ('{0}' * 100).format(b) }}", "MAX_VALUE_SIZE"),
    "center filter": ("{{ 'x'|center(999999999) }}", "MAX_VALUE_SIZE"),
    "center method": ("{{ 'x'.center(999999999) }}", "MAX_VALUE_SIZE"),
    "ljust": ("{{ 'x'.ljust(999999999) }}", "MAX_VALUE_SIZE"),
    "zfill": ("{{ '1'.zfill(999999999) }}", "MAX_VALUE_SIZE"),
    "expandtabs": ("{{ ('\t' * 1000).expandtabs(10000000) }}", "MAX_VALUE_SIZE"),
    "indent": ("{{ ('x\n' * 100000)|indent(100000) }}", "MAX_VALUE_SIZE"),
    "wordwrap": ("{{ ('x ' * 5000)|wordwrap(1, wrapstring='y' * 100000) }}", "MAX_VALUE_SIZE"),
    "truncate end": ("{{ ('x' * 1000)|truncate(5, end='y' * 999999999) }}", "MAX_VALUE_SIZE"),
    "tojson indent": ("{{ [[[[1]]]]|tojson(indent=999999999) }}", "MAX_JSON_INDENT"),
    "tojson shared references": (BIG + "{{ ([b] * 1000)|tojson }}", "MAX_VALUE_SIZE"),
    "replace empty": (BIG + "{{ b|replace('', b) }}", "MAX_VALUE_SIZE"),
    "replace method": (BIG + "{{ b.replace('x', b) }}", "MAX_VALUE_SIZE"),
    "translate": (BIG + "{{ b.translate({120: b}) }}", "MAX_VALUE_SIZE"),
    "batch fill": ("{{ [1]|batch(999999999, 0)|list }}", "MAX_VALUE_SIZE"),
    "slice count": ("{{ [1]|slice(999999999)|list }}", "MAX_VALUE_SIZE"),
    "sum of lists": ("{{ ([[1]] * 100000)|sum(start=[])|length }}", "MAX_RENDER_CHARS"),
    "lipsum": ("{{ lipsum(1000000) }}", "MAX_VALUE_SIZE"),
    "integer squaring": ("{% set ns = namespace(x=10) %}{% for i in range(64) %}{% set ns.x = ns.x * ns.x %}"
                         "{% endfor %}", "MAX_INT_BITS"),
    "integer power": ("{{ 7 ** 999999999 }}", "MAX_INT_BITS"),
    "comparing long lists": (TWINS + "{{ [s1] * 300000 == [s2] * 300000 }}", "MAX_COMPARE_SIZE"),
    "in over a long list": (TWINS + "{{ s2 in [s1] * 300000 }}", "MAX_COMPARE_SIZE"),
    "is in test": (TWINS + "{{ s2 is in ([s1] * 300000) }}", "MAX_COMPARE_SIZE"),
    "loop.changed": (TWINS + "{% for i in range(4) %}{{ loop.changed([s1 if i % 2 else s2] * 300000) }}"
                     "{% endfor %}", "MAX_COMPARE_SIZE"),
    "sort": (TWINS + "{{ ([s1, s2] * 150000)|sort|length }}", "MAX_COMPARE_SIZE"),
    "max": (TWINS + "{{ ([s1, s2] * 150000)|max|length }}", "MAX_COMPARE_SIZE"),
    "hashing a deep tuple (in)": (DEEP_TUPLE + "{{ ns.t in {} }}", "MAX_HASH_NESTING"),
    "hashing a deep tuple (dict display)": (DEEP_TUPLE + "{{ {ns.t: 1} }}", "MAX_HASH_NESTING"),
    "hashing a deep tuple (item)": (DEEP_TUPLE + "{{ {}[ns.t] }}", "MAX_HASH_NESTING"),
    "hashing a deep tuple (dict())": (DEEP_TUPLE + "{{ dict([(ns.t, 1)]) }}", "MAX_HASH_NESTING"),
    "hashing a deep tuple (unique)": (DEEP_TUPLE + "{{ [ns.t]|unique|list }}", "MAX_HASH_NESTING"),
    "hashing a tuple DAG": ("{% set ns = namespace(t=(1,)) %}{% for i in range(40) %}{% set ns.t = (ns.t, ns.t) %}"
                            "{% endfor %}{{ ns.t in {} }}", "MAX_"),
    "set block": (BIG + "{% set s %}{% for i in range(1000) %}{{ b }}{% endfor %}{% endset %}", "MAX_VALUE_SIZE"),
    "output": (BIG + "{% for i in range(1000) %}{{ b }}{% endfor %}", "MAX_OUTPUT_CHARS"),
    "string filter": (BIG + "{{ ([b] * 1000)|string }}", "MAX_VALUE_SIZE"),
    "escape": (BIG + "{{ b|replace('x', '&')|e }}", "MAX_VALUE_SIZE"),
    "strftime_now": ("{{ strftime_now('%c' * 1000000) }}", "MAX_VALUE_SIZE"),
    "urlize": ("{{ ('a@' * 100000)|urlize }}", "MAX_REGEX_FILTER_CHARS"),
    "pprint": ("{{ [[[[[1] * 100000] * 10] * 10] * 10]|pprint }}", "MAX_VALUE_SIZE"),
    "recursive loop": ("{% for x in [[1]] recursive %}{{ loop([range(100000)|list] * 2) }}{% endfor %}",
                       "MAX_RENDER_CHARS"),
    "long source": ("{{ a ~ b }}" * 10000, "MAX_TEMPLATE_CHARS"),
    "compile-time folding": ("{{ [1]|slice(2000000)|list|length }}", "MAX_"),
}
TIME_LIMITED = {name for name, (_, limit) in HOSTILE.items() if limit == "MAX_RENDER_SECONDS"}


@pytest.fixture
def short_deadline(monkeypatch):
    monkeypatch.setattr(chat_sandbox, "MAX_RENDER_SECONDS", 0.2)


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_template_fails_cleanly(short_deadline, name):
    template, limit = HOSTILE[name]
    t0 = time.perf_counter()
    with pytest.raises(ChatTemplateError, match=limit):
        render_chat(template, HI)
    assert time.perf_counter() - t0 < 1.5


def test_errors_quote_at_most_a_little_of_the_template_values():
    with pytest.raises(ChatTemplateError) as e:
        render_chat(BIG + "{{ raise_exception(b) }}", HI)
    assert len(str(e.value)) < 1000


CHILD = """
import json, sys, time
from pocketlm import chat_sandbox
from pocketlm.chat import default_chat_template, render_chat
from pocketlm.errors import ChatTemplateError
chat_sandbox.MAX_RENDER_SECONDS = 0.3
for name, template in json.loads(sys.stdin.read()).items():
    t0 = time.perf_counter()
    try:
        render_chat(template, [{"role": "user", "content": "hi"}])
        result = "rendered"
    except ChatTemplateError:
        result = "ChatTemplateError"
    print(json.dumps([name, result, round(time.perf_counter() - t0, 2)]), flush=True)
"""


def test_hostile_templates_within_a_memory_limit():
    """All of them in one child process limited to 768 MB of address space (Python and pocketlm
    take about 300 MB of it): none runs out of memory, each fails with ChatTemplateError."""
    env = child_env()
    templates = {name: t for name, (t, _) in HOSTILE.items() if name not in TIME_LIMITED}
    templates["nested range loops"] = HOSTILE["nested range loops"][0]
    r = subprocess.run(["prlimit", f"--as={768 << 20}", sys.executable, "-c", CHILD], input=json.dumps(templates),
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    results = {name: (result, seconds) for name, result, seconds in map(json.loads, r.stdout.splitlines())}
    assert set(results) == set(templates)
    assert all(result == "ChatTemplateError" and seconds < 1.5 for result, seconds in results.values()), results


# Every construct the bounded sandbox rewrites or checks, rendered by transformers as the reference.
CONSTRUCTS = """{%- set ns = namespace(total=0, parts=[]) -%}
{%- macro shout(text, n=2) -%}{{ (text | upper) ~ '!' * n }}{%- endmacro -%}
{%- for m in messages if m.role != 'system' -%}
{{ loop.index }}/{{ loop.length }} {{ shout(m.content[:5]) }} {{ m.content[-3:] }} {{ m.content[::2] }}
{%- set ns.total = ns.total + m.content | length -%}
{%- set ns.parts = ns.parts + [m.role] -%}
{%- if 1 < loop.index <= 3 %} mid{% endif -%}
{%- if m.role in ['user', 'tool'] and 'a' not in m.role %} u{% endif -%}
{%- if m.role is in ['assistant'] %} a{% endif -%}
{%- if m.role is eq 'user' and loop.index0 % 2 == 0 %} even{% endif %}
{% endfor -%}
{{ ns.total }} {{ ns.parts | join(',') }} {{ ns.parts | unique | sort | join('|') }} {{ [3, 1, 2] | max }}
{{ '%s has %d messages, %.2f %% %-6s|' % ('chat', messages | length, 12.5, 'pad') }}
{{ '{} {:>8} {:.3f} {name}'.format('a', 'right', 3.14159, name='kw') }} {{ '%05d' | format(42) }}
{{ 'mid' | center(11) }}|{{ 'ab\\ncd' | indent(2, true) }}|{{ 'x' * 3 }}{{ [1, 2] * 2 }}{{ (1, 2) + (3,) }}
{{ 'a-b-c'.split('-') | join('+') }} {{ ', '.join(['p', 'q']) }} {{ 'a\\tb'.expandtabs(4) }} {{ 'abc'.replace('b', 'BB') }}
{{ [[1, 2], [3]] | sum(start=[]) }} {{ [1, 2, 3] | sum }} {{ range(7) | batch(3, 0) | list }} {{ range(5) | slice(2) | list }}
{{ {'b': [1, {'c': 'é'}], 'a': None} | tojson(indent=2, sort_keys=True) }} {{ messages[0] | tojson }}
{{ 2 ** 10 }} {{ 7 // 2 }} {{ 17 % 5 }} {{ 'ab' ~ 1 ~ none ~ [1] }} {{ [1, [2]] }}
{%- set captured %}{% for i in range(3) %}[{{ i }}]{% endfor %}{% endset %} {{ captured }}
{%- for item in [[1, [2, [3]]]] recursive %}<{% if item is iterable %}{{ loop(item) }}{% else %}{{ item }}{% endif %}>{% endfor %}
{{ {(1, 2): 'a', 'k': 1, 'k': 2} }} {{ {(1, 2): 'a'}[(1, 2)] }} {{ (1, 2) in {(1, 2): 0} }} {{ [(1,), (1,)] | unique | list }}
{{ 'Hello World foo' | truncate(9, true, '..', 0) }} {{ 'a b c' | wordwrap(3) }} {{ 'x' | string }} {{ '  t  ' | trim }}
{% if add_generation_prompt %}<|assistant|>{% endif %}"""


def test_rewritten_constructs_render_as_in_transformers(hf_smollm_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there, café"},
                {"role": "assistant", "content": "Hi! What can I do?"}, {"role": "user", "content": "A joke 😀"}]
    expected = hf_smollm_tokenizer.apply_chat_template(messages, chat_template=CONSTRUCTS, tokenize=False,
                                                       add_generation_prompt=True)
    assert render_chat(CONSTRUCTS, messages) == expected
    assert "1/3 HELLO!! " in expected and "mid" in expected and '"é"' in expected  # the template did run


def test_limits_leave_ordinary_long_conversations_alone():
    # 50 turns of 4,000 characters (a 50k-token prompt) through a template that rebuilds its text with
    # four +'s a turn: 20 million characters built in all, under MAX_RENDER_CHARS.
    template = ("{% set ns = namespace(text='') %}{% for m in messages %}"
                "{% set ns.text = ns.text + '<|' + m.role + '|>' + m.content %}{% endfor %}{{ ns.text }}")
    messages = [{"role": "user", "content": "y" * 4000}] * 50
    assert len(render_chat(template, messages)) == 50 * (4000 + 8)
    # The same turns printed as they come: 250 of them make a 1M-character prompt, under MAX_OUTPUT_CHARS.
    assert len(render_chat(default_chat_template, messages * 5)) == 250 * (4000 + 28) + 22


# ---- through the engine and the command line, from a bundle carrying the template ---------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from testutil import make_hf_model

    from pocketlm.convert import convert

    folder = tmp_path_factory.mktemp("hostile_template")
    make_hf_model(folder / "hf", "llama", seed=5)
    return convert(folder / "hf", folder / "tiny.plm", quant="f32", progress=False)


def with_template(model: Path, template: str, name: str) -> Path:
    return rewrite_bundle(model, model.with_name(name), chat_template=template)


CLI_CASES = {"loops": ("nested range loops", "MAX_RENDER_SECONDS"), "repeat": ("string repetition", "MAX_VALUE_SIZE")}


@pytest.mark.parametrize("case", CLI_CASES)
def test_hostile_bundle_template_through_engine_and_cli(tiny_model, monkeypatch, case):
    """The Python API with a short deadline, then the CLI (a child process) with the default one."""
    from pocketlm.engine import Engine

    name, message = CLI_CASES[case]
    path = with_template(tiny_model, HOSTILE[name][0], f"{case}.plm")
    engine = Engine(path, threads=1)
    with monkeypatch.context() as m:
        m.setattr(chat_sandbox, "MAX_RENDER_SECONDS", 0.2)
        t0 = time.perf_counter()
        with pytest.raises(ChatTemplateError, match=message):
            engine.apply_chat_template(HI)
        with pytest.raises(ChatTemplateError, match=message):
            "".join(engine.chat(HI, max_tokens=2))
        assert time.perf_counter() - t0 < 2

    env = child_env()
    t0 = time.perf_counter()
    r = subprocess.run(["prlimit", f"--as={3 << 30}", sys.executable, "-m", "pocketlm", "chat", str(path), "-p", "hi",
                        "-n", "2"], capture_output=True, text=True, timeout=60, env=env)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith("pocketlm: error: ") and message in last, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert time.perf_counter() - t0 < chat_sandbox.MAX_RENDER_SECONDS + 15  # start-up, model load, render


def test_a_filter_without_a_signature_still_renders():
    """markupsafe 2.1.2 (Debian bookworm's python3-markupsafe) builds `escape` in C without a text
    signature, so inspect.signature refuses it: the sandbox guarded every filter with it and no
    template compiled there. Such a filter is wrapped without one (min stands for it: no signature
    either); a filter whose arguments are checked by name cannot go unchecked."""
    import inspect

    from pocketlm import chat_sandbox

    with pytest.raises(ValueError):
        inspect.signature(min)
    assert chat_sandbox._guard_filter("escape", min)([3, 1, 2]) == 1
    with pytest.raises(ValueError):
        chat_sandbox._guard_filter("center", min)
