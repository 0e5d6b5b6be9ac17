"""Hostile and edge inputs, through the command line and the API (issue 10, items 7 and 8): invalid
UTF-8 in -p, -s, a prompt file or standard input; an empty prompt; -n 0; a tokenizer.json whose Split
regex backtracks until the tokenizers library panics. Each case fails as one line,
`pocketlm: error: ...` with exit status 1 (or does what the API does with the same input), within
a time and memory bound: every command runs under prlimit --as=3G with a timeout."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pocketlm.bundle import read_bundle
from pocketlm.engine import Engine
from pocketlm.errors import BundleError, InvalidInputError
from testutil import child_env, make_f32_bundle
from testutil import rewrite_bundle as rewritten

BACKTRACKING = "(a+)+$"  # exponential in the run of a's before a character that is not one
SLOW_TEXT = "a" * 40 + "b"


def cli(*args, input: bytes | None = None, timeout: float = 120, memory: int = 3 << 30):
    """`python -m pocketlm ARGS` (bytes or str arguments) under a 3 GB address-space limit."""
    cmd = ["prlimit", f"--as={memory}", sys.executable, "-m", "pocketlm",
           *(a if isinstance(a, bytes) else str(a) for a in args)]
    return subprocess.run(cmd, capture_output=True, input=input, timeout=timeout, env=child_env())


def failed_cleanly(r, *fragments: str) -> bool:
    last = r.stderr.decode("utf-8", "replace").strip().splitlines()[-1]
    return (r.returncode == 1 and last.startswith("pocketlm: error: ") and all(f in last for f in fragments)
            and b"Traceback" not in r.stderr)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_f32_bundle(tmp_path_factory.mktemp("hostile"), "llama", seed=3, name="tiny.plm")


@pytest.fixture(scope="module")
def no_bos_model(model):
    meta = read_bundle(model).metadata
    return rewritten(model, model.with_name("nobos.plm"),
                     special_tokens={**meta["special_tokens"], "bos_id": None, "add_bos": False})


@pytest.fixture(scope="module")
def backtracking_model(model):
    meta = read_bundle(model).metadata
    doc = json.loads(meta["tokenizer"]["json"])
    split = {"type": "Split", "pattern": {"Regex": BACKTRACKING}, "behavior": "Isolated", "invert": False}
    doc["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, doc["pre_tokenizer"]]}
    return rewritten(model, model.with_name("backtracking.plm"),
                     tokenizer={**meta["tokenizer"], "json": json.dumps(doc)})


# ---- invalid UTF-8 -----------------------------------------------------------------------------

def test_invalid_utf8_in_prompt_option(model):
    r = cli("run", model, b"-p", b"caf\xc3 au lait", "-n", 2)
    assert failed_cleanly(r, "-p/--prompt is not valid UTF-8", "0xc3 at byte 3"), r.stderr
    assert r.stdout == b""  # not echoed
    r = cli("chat", model, "-s", b"\xff system", "-p", "hi", "-n", 2)
    assert failed_cleanly(r, "-s/--system is not valid UTF-8", "0xff at byte 0"), r.stderr
    r = cli("run", model, "-p", "hi", "--stop", b"ok\xe2\x82", "-n", 2)
    assert failed_cleanly(r, "--stop is not valid UTF-8", "0xe2 at byte 2"), r.stderr


def test_invalid_utf8_on_stdin_and_in_files(model, tmp_path):
    r = cli("run", model, "-n", 2, input=b"good start \xed\xa0\x80 surrogate bytes")
    assert failed_cleanly(r, "standard input is not valid UTF-8", "at byte 11"), r.stderr
    bad = tmp_path / "prompt.txt"
    bad.write_bytes(b"abc\xfe")
    r = cli("run", model, "-f", bad, "-n", 2)
    assert failed_cleanly(r, f"{bad} is not valid UTF-8", "0xfe at byte 3"), r.stderr
    r = cli("chat", model, "-n", 2, "--temp", 0, input=b"hello\nsecond \x80 line\n")
    assert failed_cleanly(r, "line 2 of standard input is not valid UTF-8"), r.stderr
    assert r.stdout.count(b"\n") == 1  # the first line was answered


def test_valid_utf8_still_works(model):
    engine = Engine(model, threads=1)
    prompt = "Über café naïve 東京"
    want = "".join(engine.generate(prompt, max_tokens=6, temperature=0))
    r = cli("run", model, "-n", 6, "--temp", 0, "--no-echo", input=prompt.encode())
    assert r.returncode == 0 and r.stdout.decode() == want + "\n"


def test_lone_surrogates_through_the_api(model):
    engine = Engine(model, threads=1)
    for text in ("caf\udcc3", "\ud800 x"):
        with pytest.raises(InvalidInputError, match="lone surrogate"):
            list(engine.generate(text, max_tokens=2))
        with pytest.raises(InvalidInputError, match="lone surrogate"):
            list(engine.chat([{"role": "user", "content": text}], max_tokens=2))


# ---- empty prompt, -n 0 ------------------------------------------------------------------------

def test_empty_prompt(model, no_bos_model):
    want = "".join(Engine(model, threads=1).generate("", max_tokens=6, temperature=0))
    r = cli("run", model, "-p", "", "-n", 6, "--temp", 0)
    assert r.returncode == 0 and r.stdout.decode() == want + "\n", r.stderr
    r = cli("run", no_bos_model, "-p", "", "-n", 6)
    assert failed_cleanly(r, "empty prompt"), r.stderr
    r = cli("run", no_bos_model, "-n", 6, input=b"")
    assert failed_cleanly(r, "empty prompt"), r.stderr


def test_n_zero_does_no_work(model):
    r = cli("run", model, "-p", "The quick brown fox", "-n", 0)
    assert r.returncode == 0 and r.stdout == b"The quick brown fox\n"
    assert "[prompt 0 tok" in r.stderr.decode() and "(0 tok)" in r.stderr.decode()


# ---- a tokenizer that panics -------------------------------------------------------------------

def test_backtracking_split_regex_is_a_bundle_error(backtracking_model):
    engine = Engine(backtracking_model, threads=1)
    assert engine.tokenizer.encode("a short text")  # the regex is fine on most text
    with pytest.raises(BundleError, match="tokenizer.*retry-limit"):
        engine.tokenizer.encode(SLOW_TEXT)
    with pytest.raises(BundleError, match="tokenizer"):
        list(engine.generate(SLOW_TEXT, max_tokens=2))
    r = cli("run", backtracking_model, "-p", SLOW_TEXT, "-n", 2, timeout=60)
    assert failed_cleanly(r, "tokenizer", "retry-limit"), r.stderr


def test_out_of_memory_is_one_line(model):
    """A context the address-space limit cannot hold (the model claims 2^24 trained positions; -c asks
    for all of them): the RoPE table or the session's reservation runs out of memory, which the CLI
    reports as one line, not a traceback. 1 GB, so that it fails before touching gigabytes."""
    meta = read_bundle(model).metadata
    huge = rewritten(model, model.with_name("huge_context.plm"),
                     config={**meta["config"], "max_position": 1 << 24})
    r = cli("run", huge, "-p", "hello", "-n", "2", "-c", str(1 << 24), "-t", "1", memory=1 << 30)
    assert failed_cleanly(r, "out of memory"), r.stderr.decode(errors="replace")[-2000:]
