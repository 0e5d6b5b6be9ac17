"""`pocketlm chat --session FILE` and `run --session FILE`: a conversation resumed in a new process
answers as one process holding the whole conversation does."""

from __future__ import annotations

import subprocess
import sys

from pocketlm import Engine
from testutil import child_env


def cli(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "pocketlm", *args], capture_output=True, text=True, env=child_env(),
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_chat_resumes_after_a_restart(smollm2_gguf, tmp_path):
    f = str(tmp_path / "chat.plms")
    q1, q2 = "My name is Ada. Please remember it.", "What is my name?"
    first = cli("chat", "smollm2", "--session", f, "-p", q1, "--temp", "0", "-n", "24", "-t", "2")
    second = cli("chat", "smollm2", "--session", f, "-p", q2, "--temp", "0", "-n", "24", "-t", "2")
    engine = Engine("smollm2", threads=2)
    s = engine.create_session()
    a1 = "".join(s.chat([{"role": "user", "content": q1}], temperature=0, max_tokens=24))
    a2 = "".join(s.chat([{"role": "user", "content": q1}, {"role": "assistant", "content": a1},
                         {"role": "user", "content": q2}], temperature=0, max_tokens=24))
    assert first.strip() == a1.strip() and second.strip() == a2.strip()
    loaded = engine.load_session(f)
    assert [m["role"] for m in loaded.saved_extra["messages"]] == ["user", "assistant", "user", "assistant"]


def test_run_continues_the_text(smollm2_gguf, tmp_path):
    f = str(tmp_path / "run.plms")
    out1 = cli("run", "smollm2", "--session", f, "-p", "Once upon a time", "--temp", "0", "-n", "8", "-t", "2",
               "--no-echo")
    out2 = cli("run", "smollm2", "--session", f, "-p", " Then", "--temp", "0", "-n", "8", "-t", "2", "--no-echo")
    engine = Engine("smollm2", threads=2)
    s = engine.create_session()
    g1 = "".join(s.generate("Once upon a time", temperature=0, max_tokens=8))
    # the continuation follows the whole text: prompt, all 8 generated tokens, then the new prompt
    ids = engine.tokenizer.encode("Once upon a time") + s.last_text_ids[-8:] + \
        engine.tokenizer.encode(" Then", add_special_tokens=False)
    g2 = "".join(engine.create_session().generate(ids, temperature=0, max_tokens=8))
    assert out1.rstrip("\n") == g1 and out2.rstrip("\n") == g2


def test_chat_outlives_its_context(smollm2_gguf):
    """A conversation longer than `-c` goes on: the context shifts (the system prompt kept), chat says so
    on standard error, and answers as an in-process session that shifts alike."""
    system, questions = "You are a poet.", ["Write a poem about the sea.", "Now one about the moon.", "And the sun?"]
    r = subprocess.run([sys.executable, "-m", "pocketlm", "chat", "smollm2", "-c", "160", "--system", system,
                        "--temp", "0", "-n", "60", "-t", "2"], input="\n".join(questions) + "\n", capture_output=True,
                       text=True, env=child_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    assert "the context of 160 tokens is full" in r.stderr
    engine = Engine("smollm2", threads=2, max_context=160)
    messages = [{"role": "system", "content": system}]
    s = engine.create_session(on_overflow="shift", keep=engine.chat_keep(messages))
    answers = []
    for q in questions:
        messages.append({"role": "user", "content": q})
        answers.append("".join(s.chat(messages, temperature=0, max_tokens=60)))
        messages.append({"role": "assistant", "content": answers[-1]})
    assert s.evicted_tokens > 0 and s.tokens[:s.keep] == s.history[:s.keep]
    assert r.stdout.split("\n")[:len("\n".join(answers).split("\n"))] == "\n".join(answers).split("\n")
