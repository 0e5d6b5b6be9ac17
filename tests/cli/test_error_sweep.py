"""One error style for every subcommand: a bad file or value prints one line `pocketlm: error: ...` and exits 1;
a command line that cannot work (usage) exits 2 with argparse's `pocketlm CMD: error: ...`. The same bad inputs
through run, chat, bench, perplexity, inspect, serve and convert."""

from __future__ import annotations

import subprocess
import sys

import pytest

from testutil import child_env

# the arguments each subcommand needs besides the model (kept small: nothing should get far)
COMMANDS = {
    "run": ["-p", "hi", "-n", "1"],
    "chat": ["-p", "hi", "-n", "1"],
    "bench": ["-p", "4", "-n", "2", "-r", "1", "--no-load", "-q"],
    "perplexity": ["-f", "TEXT"],
    "inspect": [],
    "serve": ["--port", "0"],
    "convert": ["-o", "OUT"],
}


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pocketlm", *map(str, args)], capture_output=True, text=True,
                          env=child_env(), timeout=300, cwd=cwd)


def one_error_line(r, status: int = 1) -> str:
    assert r.returncode == status, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("pocketlm: error: "), r.stderr
    return last


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_missing_and_junk_models(command, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 40, encoding="utf-8")
    args = [str(text) if a == "TEXT" else str(tmp_path / "out.plm") if a == "OUT" else a for a in COMMANDS[command]]
    line = one_error_line(cli(command, tmp_path / "missing.plm", *args))
    assert "missing.plm" in line and ("no such file" in line.lower() or "does not exist" in line.lower())
    junk = tmp_path / "junk.plm"
    junk.write_bytes(b"not a bundle at all" * 10)
    line = one_error_line(cli(command, junk, *args))
    assert "junk.plm" in line


@pytest.mark.parametrize("command", ["run", "perplexity"])
def test_missing_text_file(command, tmp_path):
    line = one_error_line(cli(command, "smollm2", "-f", tmp_path / "missing.txt", "-n", "1") if command == "run"
                          else cli(command, "smollm2", "-f", tmp_path / "missing.txt"))
    assert line == f"pocketlm: error: {tmp_path / 'missing.txt'}: No such file or directory"


def test_usage_errors_exit_2(tmp_path):
    r = cli("perplexity", "smollm2")
    assert r.returncode == 2 and r.stderr.strip().endswith("pocketlm perplexity: error: give the text with -f FILE")
    r = cli("perplexity", "smollm2", "--kl-divergence", "a", "--kl-divergence-base", "b")
    assert r.returncode == 2 and "pocketlm perplexity: error: --kl-divergence-base and --kl-divergence" in r.stderr
    bad = {"inspect": ["-c", "0"], "convert": ["--group-size", "7"]}
    for command in sorted(COMMANDS):
        r = cli(command, "smollm2", *bad.get(command, ["-t", "0"]))
        assert r.returncode == 2 and f"pocketlm {command}: error: " in r.stderr, (command, r.stderr)


def test_convert_refuses_a_wrong_output(smollm2_gguf, tmp_path):
    line = one_error_line(cli("convert", smollm2_gguf, "-o", tmp_path / "x.gguf"))
    assert ".plm" in line and not (tmp_path / "x.gguf").exists()
    line = one_error_line(cli("convert", smollm2_gguf, "-o", tmp_path / "no" / "such" / "x.plm"))
    assert "does not exist" in line and not (tmp_path / "no").exists()
    # an existing folder is a place, not a name: the bundle is named after the source there
    r = cli("convert", smollm2_gguf, "-o", tmp_path, "-q")
    assert r.returncode == 0, r.stderr
    out = tmp_path / (smollm2_gguf.stem + ".plm")
    assert r.stdout.strip() == str(out) and out.is_file()
