"""NaN and infinite logits are an error on every decoding path, through the API and the CLI.

The bundles are a tiny f32 Llama rewritten with pocketlm.bundle.write_bundle (the converter refuses
non-finite weights): a NaN in the final norm makes every logit NaN; a NaN row of the output head
makes one logit NaN (greedy decoding used to pick it: argmax returns the first NaN); an infinite
norm weight makes the largest logit infinite. The reference: the same prompt on the clean bundle
gives tokens, so the error is the poison's.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from testutil import child_env, make_hf_model
from pocketlm.bundle import TensorSpec, read_bundle, write_bundle
from pocketlm.convert import convert
from pocketlm.engine import Engine
from pocketlm.errors import NonFiniteError

POISONS = {  # name -> (tensor, element index in its flat f32 data, value)
    "all-nan": ("output_norm.weight", 5, np.nan),
    "one-nan-logit": ("output.weight", 17 * 64, np.nan),  # row 17 of (320, 64): logit 17 only
    "inf": ("output_norm.weight", 5, np.inf),
}
PATHS = {
    "greedy": dict(temperature=0),
    "greedy+penalty": dict(temperature=0, repetition_penalty=1.2),
    "top-k (C++)": dict(temperature=0.8, top_k=20, seed=1),
    "top-p (numpy)": dict(temperature=0.8, top_k=0, top_p=0.9, seed=1),
}


def poisoned_copy(src, dst, tensor: str, index: int, value: float):
    bundle = read_bundle(src)

    def loader(info):
        def load():
            data = np.array(bundle.tensor(info.name), copy=True)
            if info.name == tensor:
                data.view(np.float32)[index] = value
            return data
        return load

    write_bundle(dst, bundle.metadata, [TensorSpec(t.name, t.dtype, t.shape, loader(t)) for t in bundle.tensors])
    return dst


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    d = tmp_path_factory.mktemp("nonfinite")
    make_hf_model(d / "hf", "llama", seed=3)
    clean = convert(d / "hf", d / "clean.plm", quant="f32", progress=False)
    out = {name: poisoned_copy(clean, d / f"{name}.plm", *spec) for name, spec in POISONS.items()}
    return clean, out


def _engine(path):
    return Engine(path, threads=1, max_context=64, prefill_chunk=16, kv_type="f32")


def test_the_poison_reaches_the_logits(bundles):
    clean, poisoned = bundles
    ids = _engine(clean).tokenizer.encode("The quick brown fox")
    assert np.isfinite(_engine(clean).create_session().prefill(ids)).all()
    assert np.isnan(_engine(poisoned["all-nan"]).create_session().prefill(ids)).all()
    one = _engine(poisoned["one-nan-logit"]).create_session().prefill(ids)
    assert np.isnan(one[17]) and np.isfinite(np.delete(one, 17)).all()
    assert np.isinf(_engine(poisoned["inf"]).create_session().prefill(ids).max())


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("poison", sorted(POISONS))
def test_generate_raises_non_finite_on_every_path(bundles, poison, path):
    clean, poisoned = bundles
    kwargs = dict(max_tokens=4, **PATHS[path])
    assert len(_engine(clean).create_session().generate("The quick brown fox", **kwargs).__next__()) > 0
    with pytest.raises(NonFiniteError, match="NaN or infinity"):
        list(_engine(poisoned[poison]).generate("The quick brown fox", **kwargs))


@pytest.mark.parametrize("poison", sorted(POISONS))
def test_score_raises_non_finite(bundles, poison):
    clean, poisoned = bundles
    ids = _engine(clean).tokenizer.encode("The quick brown fox jumps")
    assert np.isfinite(_engine(clean).create_session(logits="all").score(ids)[1:]).all()
    s = _engine(poisoned[poison]).create_session(logits="all")
    with pytest.raises(NonFiniteError):
        s.score(ids)
    with pytest.raises(NonFiniteError):  # a NaN carried over from the previous call's last row
        s.score(ids[:1])


def cli(*args, timeout=120):
    """`python -m pocketlm` as a user runs it, under a 3 GB address-space limit."""
    cmd = ["prlimit", f"--as={3 << 30}", sys.executable, "-m", "pocketlm", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, timeout=timeout, env=child_env())


@pytest.mark.parametrize("command", [
    ["run", "-p", "The quick brown", "-n", "8", "--temp", "0"],
    ["run", "-p", "The quick brown", "-n", "8", "--temp", "0.7", "--seed", "1"],
    ["chat", "-p", "hello", "-n", "8", "--temp", "0"],
])
def test_cli_fails_cleanly_without_printing_nul(bundles, command):
    clean, poisoned = bundles
    assert cli(command[0], clean, *command[1:]).returncode == 0
    r = cli(command[0], poisoned["one-nan-logit"], *command[1:])
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert err.startswith("pocketlm: error: ") and "NaN" in err and "Traceback" not in err
    assert b"\x00" not in r.stdout


def test_cli_perplexity_fails_cleanly(bundles, tmp_path):
    _, poisoned = bundles
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    r = cli("perplexity", poisoned["all-nan"], "-f", text, "-c", "16", "-b", "16", "--chunks", "1")
    err = r.stderr.decode()
    assert r.returncode == 1 and "pocketlm: error: " in err and "NaN" in err and "Traceback" not in err
