"""`pocketlm chat` at a terminal, driven through a pseudo-terminal (pexpect): line editing and history
(across runs), multi-line input, slash commands, Ctrl-C during an answer and at the prompt, and a
conversation longer than the context. What the model was sent is read back from the saved session
(/save), the conversation's messages as the chat kept them."""

from __future__ import annotations

import signal
import sys

import pytest

from pocketlm import Engine
from testutil import child_env, make_f32_bundle

pexpect = pytest.importorskip("pexpect")

LEFT, UP = "\x1b[D", "\x1b[A"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_f32_bundle(tmp_path_factory.mktemp("repl"), "qwen2", seed=7)


def spawn(model, *args, history, preexec_fn=None, **env):
    child = pexpect.spawn(sys.executable, ["-m", "pocketlm", "chat", str(model), "-t", "2", "--temp", "0", *args],
                          env=child_env(POCKETLM_HISTORY=str(history), TERM="xterm", **env), encoding="utf-8",
                          timeout=120, dimensions=(40, 200), preexec_fn=preexec_fn)
    child.expect_exact(">>> ")
    return child


def turn(child, text: str) -> None:
    child.send(text + "\r")
    child.expect_exact(">>> ")


def saved_messages(tiny, path) -> list[dict]:
    return Engine(tiny, threads=1, max_context=256).load_session(path).saved_extra["messages"]


def test_editing_history_blocks_and_commands(tiny, tmp_path):
    history = tmp_path / "history"
    child = spawn(tiny, "-n", "6", history=history)
    turn(child, "helo" + LEFT + "l")          # the cursor moved left: "hello", not "helo^[[Dl"
    turn(child, UP)                            # the previous line again
    child.send('"""\r')                         # a block of lines is one turn
    child.expect_exact("... ")
    child.send("line one\r")
    child.expect_exact("... ")
    turn(child, 'line two"""')
    child.send("first \\\r")                    # a trailing backslash goes on
    child.expect_exact("... ")
    turn(child, "second")
    turn(child, "/set temperature 0.5")
    assert "[temperature = 0.5]" in child.before
    turn(child, "/set nonsense 1")
    assert "pocketlm: error: /set: unknown option 'nonsense'" in child.before
    turn(child, "/set top_p 7")
    assert "pocketlm: error: /set top_p" in child.before
    turn(child, "/frobnicate")
    assert "unknown command '/frobnicate'" in child.before
    turn(child, "/help")
    assert "/system TEXT" in child.before
    turn(child, "/stats")
    assert "[context: " in child.before
    turn(child, f"/save {tmp_path / 'a.plms'}")
    users = [m["content"] for m in saved_messages(tiny, tmp_path / "a.plms") if m["role"] == "user"]
    assert users == ["hello", "hello", "line one\nline two", "first \nsecond"]
    turn(child, "/system be brief")
    turn(child, "/clear")
    turn(child, f"/save {tmp_path / 'b.plms'}")
    assert saved_messages(tiny, tmp_path / "b.plms") == [{"role": "system", "content": "be brief"}]
    child.sendcontrol("c")                      # at the prompt: the chat goes on
    child.expect_exact("Ctrl-D or /bye to exit")
    child.expect_exact(">>> ")
    child.sendcontrol("d")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "hello" in history.read_text().splitlines()
    # the history outlives the process
    child = spawn(tiny, "-n", "4", history=history)
    child.send(UP * 3 + "\r")  # three lines back: /clear, /system be brief, /save ... -> the /system line
    child.expect_exact(">>> ")
    turn(child, f"/save {tmp_path / 'c.plms'}")
    child.send("/bye\r")
    child.expect(pexpect.EOF)
    assert saved_messages(tiny, tmp_path / "c.plms")[0] == {"role": "system", "content": "be brief"}


def test_ctrl_c_stops_an_answer_and_the_context_shifts(smollm2_gguf, tmp_path):
    child = spawn("smollm2", "-n", "2000", "-c", "256", history=tmp_path / "h")
    child.send("Write a very long story about a dragon.\r")
    child.expect_exact("dragon.\r\n")  # (the terminal's echo)
    child.expect(r"\w+ \w+ \w+ \w+")  # the answer is under way
    child.sendcontrol("c")
    child.expect_exact("[answer stopped]")
    child.expect_exact(">>> ")
    turn(child, "/set max_tokens 120")
    for q in ("Tell me about the sea.", "And the moon?", "And the sun?"):
        turn(child, q)
        if "is full" in child.before:
            break
    assert "[the context of 256 tokens is full" in child.before
    turn(child, f"/save {tmp_path / 's.plms'}")
    messages = Engine("smollm2", threads=1, max_context=256).load_session(tmp_path / "s.plms").saved_extra["messages"]
    assert messages[0]["content"] == "Write a very long story about a dragon."
    assert messages[1]["role"] == "assistant" and messages[1]["content"]  # the answer as far as it went
    child.send("/bye\r")
    child.expect(pexpect.EOF)


def test_a_failed_turn_never_happened(tiny, tmp_path):
    """A turn the template refuses is an error line; the chat goes on without it (no unanswered
    message left to break the next turn). Seeds as llama.cpp's (-1: random), a malformed one refused."""
    import subprocess

    template = ("{% if messages[-1].content == 'boom' %}{{ raise_exception('no boom here') }}{% endif %}"
                "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>")
    (tmp_path / "t.jinja").write_text(template, encoding="utf-8")
    script = f"boom\nhello\n/set seed -1\n/set seed x\n/save {tmp_path / 's.plms'}\n/bye\n"
    r = subprocess.run([sys.executable, "-m", "pocketlm", "chat", str(tiny), "-t", "2", "-n", "4",
                        "--chat-template", str(tmp_path / "t.jinja")], input=script, capture_output=True, text=True,
                       env=child_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "pocketlm: error:" in r.stderr and "no boom here" in r.stderr
    assert "[seed = -1]" in r.stderr and "pocketlm: error: /set seed" in r.stderr
    messages = Engine(tiny, threads=1, max_context=256).load_session(tmp_path / "s.plms").saved_extra["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[0]["content"] == "hello"


@pytest.mark.parametrize("script,sent", [('"""line one\nline two', "line one\nline two"),   # no closing quotes
                                         ("first \\\nsecond \\", "first \nsecond")])     # nor continuation
def test_input_that_ends_inside_a_turn_sends_it(tiny, tmp_path, script, sent):
    """Piped input that ends inside a \"\"\" block or after a trailing backslash is still a turn (it was
    dropped): the template reports the message it was given."""
    import subprocess

    (tmp_path / "t.jinja").write_text("{% if 'second' in messages[-1].content or 'two' in messages[-1].content %}"
                                      "{{ raise_exception('got[' + messages[-1].content + ']') }}{% endif %}<a>",
                                      encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "pocketlm", "chat", str(tiny), "-t", "2", "-n", "4",
                        "--chat-template", str(tmp_path / "t.jinja")], input=script, capture_output=True, text=True,
                       env=child_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "got[" + sent.replace("\n", "\\n") + "]" in r.stderr, r.stderr  # the error shows the repr


def test_ctrl_c_works_when_started_with_sigint_ignored(tiny, tmp_path):
    """A chat started from a background job inherits SIGINT ignored (and Python then installs no
    handler): at a terminal it takes Ctrl-C back, at the prompt and during an answer."""
    child = spawn(tiny, "-n", "100000", history=tmp_path / "h",
                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    child.sendcontrol("c")
    child.expect_exact("Ctrl-D or /bye to exit", timeout=30)
    child.expect_exact(">>> ")
    child.send("hello\r")
    child.expect_exact("hello\r\n")  # (the terminal's echo)
    # readline has returned the line (it turns bracketed paste off) and the answer is under way: a
    # Ctrl-C before that lands in readline, which drops it (the line is already taken), and the
    # answer runs on (this test matched readline's escape sequence as the answer once, ~1 run in 8)
    child.expect_exact("\x1b[?2004l")
    child.expect(r"[^\s\x1b]")
    child.sendcontrol("c")
    child.expect_exact("[answer stopped]", timeout=30)
    child.expect_exact(">>> ")
    child.send("/bye\r")
    child.expect(pexpect.EOF)
