"""Bundles whose checksums are all valid but whose metadata is hostile or inconsistent with the
tensors: loading must raise BundleError naming the bundle and the problem (UnsupportedModelError for
an unknown architecture), and the CLI must say so in one line, never with a traceback."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from bundle_craft import with_metadata
from testutil import make_hf_model
from pocketlm import Engine
from pocketlm.bundle import read_bundle
from pocketlm.cli.main import main
from pocketlm.convert import convert
from pocketlm.errors import BundleError, UnsupportedModelError


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A tiny llama bundle (hidden 64, 4 heads of 16, 2 KV heads, 2 layers, vocab 320): its bytes
    and its metadata."""
    d = tmp_path_factory.mktemp("meta")
    make_hf_model(d / "hf", "llama", seed=5)
    path = convert(d / "hf", d / "good.plm", quant="f32", progress=False)
    return path.read_bytes(), read_bundle(path).metadata


def edit(section, **changes):
    """A metadata edit: `changes` applied to a section, a value of None deleting the key."""
    def apply(meta):
        for key, value in changes.items():
            if value is None:
                del meta[section][key]
            else:
                meta[section][key] = value
    return apply


def put(**sections):
    def apply(meta):
        meta.update(sections)
    return apply


def drop(section):
    return lambda meta: meta.pop(section)


# case -> (edit of the metadata, what the message must say)
HOSTILE = {
    # caught when the bundle is opened: types and ranges of the sections the runtime reads
    "config a list": (put(config=[64, 2]), "config must be an object, got an array"),
    "n_kv_heads 0": (edit("config", n_kv_heads=0), r"config.n_kv_heads must be an integer >= 1, got 0"),
    "hidden_size a string": (edit("config", hidden_size="64"), "config.hidden_size must be an integer"),
    "hidden_size true": (edit("config", hidden_size=True), "config.hidden_size must be an integer"),
    "vocab_size a float": (edit("config", vocab_size=320.0), "config.vocab_size must be an integer"),
    "rope_theta NaN": (edit("config", rope_theta=float("nan")), "config.rope_theta must be a finite number > 0"),
    "rms_eps 0": (edit("config", rms_eps=0), "config.rms_eps must be a finite number > 0"),
    "architecture a number": (put(architecture=7), "architecture must be a string, got a number"),
    "special_tokens null": (put(special_tokens=None), "special_tokens must be an object, got null"),
    "special_tokens a list": (put(special_tokens=[1, 2]), "special_tokens must be an object"),
    "bos_id outside vocab": (edit("special_tokens", bos_id=320), r"bos_id 320 is outside the vocabulary"),
    "bos_id a string": (edit("special_tokens", bos_id="1"), "bos_id must be a token id"),
    "eos_ids a number": (edit("special_tokens", eos_ids=2), "eos_ids must be an array"),
    "eos_id negative": (edit("special_tokens", eos_ids=[2, -1]), r"eos_ids\[1\] must be a token id"),
    "pad_id a string": (edit("special_tokens", pad_id="0"), "pad_id must be an integer or null"),
    "add_bos a string": (edit("special_tokens", add_bos="yes"), "add_bos must be true or false"),
    "tokenizer a string": (put(tokenizer="{}"), "tokenizer must be an object, got a string"),
    "tokenizer json an object": (edit("tokenizer", json={}), "tokenizer.json must be a string"),
    "chat_template a number": (put(chat_template=1), "chat_template must be a string or null"),
    "generation a list": (put(generation=[0.7]), "generation must be an object"),
    "temperature a string": (edit("generation", temperature="hot"), "generation.temperature must be a finite"),
    "top_k a float": (edit("generation", top_k=40.5), "generation.top_k must be an integer"),
    # caught when the engine loads: sections missing, or a config the tensors do not fit
    "no architecture": (drop("architecture"), "metadata has no architecture"),
    "no config": (drop("config"), "metadata has no config"),
    "no tokenizer": (drop("tokenizer"), "metadata has no tokenizer"),
    "tokenizer without json": (edit("tokenizer", json=None), "tokenizer has no json document"),
    "tokenizer json invalid": (edit("tokenizer", json="{"), "invalid tokenizer.json"),
    "no hidden_size": (edit("config", hidden_size=None), "cannot build the model from its metadata: .*'hidden_size'"),
    "n_kv_heads does not divide": (edit("config", n_kv_heads=3), "n_heads 4 is not a multiple of n_kv_heads 3"),
    "hidden_size wrong": (edit("config", hidden_size=32), r"tensor 'token_embd.weight' has shape \[320, 64\]"),
    "vocab_size wrong": (edit("config", vocab_size=300), r"the config implies \[300, 64\]"),
    "n_heads wrong": (edit("config", n_heads=8, n_kv_heads=8), r"'blk.0.attn_q.weight' has shape \[64, 64\]"),
    "n_layers too many": (edit("config", n_layers=3), "no tensor 'blk.2.attn_norm.weight'"),
    # huge sizes fail fast, before anything is built or allocated for them
    "n_layers huge": (edit("config", n_layers=10**9), r"config.n_layers must be an integer in 1..4096"),
    "n_layers past the tensors": (edit("config", n_layers=4000), "n_layers is 4000, but the bundle holds only"),
    "head_dim huge": (edit("config", head_dim=2**20, rope_dim=2**20), r"config.head_dim must be an integer in 1..4096"),
    "head_dim large": (edit("config", head_dim=1024, rope_dim=1024), r"implies \[4096, 64\]"),
    "rope_dim odd": (edit("config", rope_dim=7), "rope_dim 7 must be even"),
    "sliding_window negative": (edit("config", sliding_window=-4), "window -4 must be >= 0"),
    "layer_windows short": (edit("config", layer_windows=[0]), "layer_windows has 1 entries, config.n_layers is 2"),
    "rope_scaling a list": (edit("config", rope_scaling=[8.0]), "config.rope_scaling must be an object or null"),
    "rope_scaling without factor": (edit("config", rope_scaling={"type": "llama3"}), "'factor'"),
}


def hostile_bundle(good, tmp_path, change, name="hostile.plm"):
    data, meta = good
    meta = copy.deepcopy(meta)
    change(meta)
    path = tmp_path / name
    # json.dumps writes NaN as the bare literal, which json.loads (the reader) accepts.
    path.write_bytes(bytes(with_metadata(data, json.dumps(meta).encode())))
    return path


def test_rewritten_metadata_alone_is_harmless(good, tmp_path):
    path = hostile_bundle(good, tmp_path, lambda meta: None)
    engine = Engine(path, threads=1, max_context=32)
    assert read_bundle(path).verify() == []
    assert len("".join(engine.generate("The quick", max_tokens=3, temperature=0))) > 0


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_metadata_raises_bundle_error(good, tmp_path, case):
    change, match = HOSTILE[case]
    path = hostile_bundle(good, tmp_path, change)
    with pytest.raises(BundleError, match=match) as err:
        Engine(path, threads=1, max_context=32)
    assert str(err.value).startswith(f"{path}: ")


def test_build_errors_chain_the_original(good, tmp_path):
    path = hostile_bundle(good, tmp_path, edit("config", hidden_size=None))
    with pytest.raises(BundleError) as err:
        Engine(path, threads=1, max_context=32)
    assert isinstance(err.value.__cause__, KeyError)


def test_unknown_architecture_stays_unsupported(good, tmp_path):
    path = hostile_bundle(good, tmp_path, put(architecture="mamba"))
    with pytest.raises(UnsupportedModelError, match="'mamba' is not supported"):
        Engine(path, threads=1, max_context=32)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_cli_reports_hostile_metadata_in_one_line(good, tmp_path, capsys, case):
    path = hostile_bundle(good, tmp_path, HOSTILE[case][0])
    assert main(["run", str(path), "-p", "x", "-n", "1", "-t", "1", "-c", "32"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"pocketlm: error: {path}: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("case, command", [
    ("special_tokens null", "run"),   # fails at open
    ("hidden_size wrong", "run"),     # fails building the model
    ("no hidden_size", "inspect"),    # inspect --graph builds the model too
])
def test_cli_process_exits_1_without_traceback(good, tmp_path, case, command):
    path = hostile_bundle(good, tmp_path, HOSTILE[case][0])
    args = ["run", path, "-p", "x", "-n", "1"] if command == "run" else ["inspect", path, "--graph"]
    r = subprocess.run([sys.executable, "-m", "pocketlm", *map(str, args)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("pocketlm: error: ") and r.stderr.count("\n") == 1, r.stderr
