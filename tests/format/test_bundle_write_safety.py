"""What the writer guarantees (issue 10 items 6, 7, 8): the converter never writes a bundle the loader
refuses (it runs the loader's checks on the finished temporary file before the rename); metadata it
cannot write is named by key; a failed write is a StorageError naming the bundle; the temporary file
of a killed conversion is removed by the next write of the same bundle."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from testutil import child_env, make_hf_model
from pocketlm import Engine
from pocketlm.bundle import TensorSpec, read_bundle, remove_stale_temporaries, write_bundle
from pocketlm.cli.main import main
from pocketlm.convert import converter
from pocketlm.dtypes import DType
from pocketlm.engine import check_loadable
from pocketlm.errors import BundleError


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    d = tmp_path_factory.mktemp("write") / "hf"
    make_hf_model(d, "llama", seed=3)
    return d


def _tokenizer_edit(fn):
    def apply(model):
        doc = json.loads(model.tokenizer_json)
        fn(doc)
        model.tokenizer_json = json.dumps(doc)
    return apply


def _first_merge_unknown(doc):
    merges = doc["model"]["merges"]
    merges[0] = ["\u2603never", "\u2603seen"] if isinstance(merges[0], list) else "\u2603never \u2603seen"


# What a hostile or broken source made the converter write before (each was a bundle `run` refused,
# or a NaN json.dumps named no key), as an edit of the SourceModel -> what the error must say.
SOURCE_EDITS = {
    "merges naming unknown tokens": (_tokenizer_edit(_first_merge_unknown), "invalid tokenizer.json"),
    "token strings corrupted": (_tokenizer_edit(lambda d: d["model"].update(vocab=[1, 2])), "invalid tokenizer.json"),
    "bos_id past the vocabulary": (lambda m: m.special_tokens.update(bos_id=10**6), r"bos_id 1000000 is outside"),
    "eos_id negative": (lambda m: m.special_tokens.update(eos_ids=[-3]), r"eos_ids\[0\] must be a token id"),
    "freq_base -1": (lambda m: m.config.update(rope_theta=-1.0), "config.rope_theta must be a finite number > 0"),
    "context_length 0": (lambda m: m.config.update(max_position=0), "config.max_position must be an integer >= 1"),
    "head count a string": (lambda m: m.config.update(n_heads="4"), "config.n_heads must be an integer"),
    "top_k -5": (lambda m: m.generation.update(top_k=-5), "generation.top_k must be an integer in"),
    "rms_eps NaN": (lambda m: m.config.update(rms_eps=float("nan")), "config.rms_eps must be a finite number > 0"),
    "temp NaN": (lambda m: m.generation.update(temperature=float("nan")), "generation.temperature must be a finite"),
    "sliding_window 2^63-5": (lambda m: m.config.update(sliding_window=2**63 - 5), "config.sliding_window: window"),
    "llama3 factor 0": (lambda m: m.config.update(rope_scaling={
        "type": "llama3", "factor": 0.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}), "config.rope_scaling.factor"),
}


# Refused by the loader's checks on the finished temporary file; the other cases are caught earlier,
# by the reader's metadata check before any tensor is written, and named by the source.
LOADER_ONLY = {"merges naming unknown tokens", "token strings corrupted"}


@pytest.fixture
def hostile_source(monkeypatch):
    """Makes convert() read its source and then apply one edit (as a hostile file would hold it)."""
    read = converter.read_source

    def use(edit):
        def read_source(src):
            model = read(src)
            model.config, model.generation = copy.deepcopy(model.config), dict(model.generation)
            model.special_tokens = dict(model.special_tokens)
            edit(model)
            return model
        monkeypatch.setattr(converter, "read_source", read_source)
    return use


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


@pytest.mark.parametrize("case", sorted(SOURCE_EDITS))
def test_converter_never_writes_a_bundle_the_loader_refuses(hf, tmp_path, hostile_source, case):
    edit, match = SOURCE_EDITS[case]
    hostile_source(edit)
    out = tmp_path / "out.plm"
    with pytest.raises(BundleError, match=match) as err:
        converter.convert(hf, out, quant="f32", progress=False)
    where = f"{out}: not written, the loader would refuse it: " if case in LOADER_ONLY else f"{hf.name}: bad metadata: "
    assert str(err.value).startswith(where)
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_refused_bundle_leaves_the_previous_one(hf, tmp_path, hostile_source):
    out = converter.convert(hf, tmp_path / "out.plm", quant="f32", progress=False)
    before = out.read_bytes()
    hostile_source(SOURCE_EDITS["token strings corrupted"][0])
    with pytest.raises(BundleError, match="not written"):
        converter.convert(hf, out, quant="f32", progress=False)
    assert out.read_bytes() == before and leftovers(tmp_path) == []
    Engine(out, threads=1, max_context=16)


def test_cli_convert_reports_a_refused_bundle_in_one_line(hf, tmp_path, hostile_source, capsys):
    hostile_source(SOURCE_EDITS["token strings corrupted"][0])
    assert main(["convert", str(hf), "-o", str(tmp_path / "x.plm"), "--quant", "f32"]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"pocketlm: error: {tmp_path / 'x.plm'}: not written"), err


def test_check_loadable_without_the_extension_reads_the_structure_in_python(hf, tmp_path, monkeypatch):
    """The converter must work without pocketlm._core: the checks then read the file in Python."""
    import pocketlm

    path = converter.convert(hf, tmp_path / "ok.plm", quant="f32", progress=False)
    monkeypatch.setitem(sys.modules, "pocketlm._core", None)  # import fails
    monkeypatch.delattr(pocketlm, "_core", raising=False)
    check_loadable(path)
    bad = tmp_path / "bad.plm"
    meta = read_bundle_metadata_python(path)
    meta["config"]["sliding_window"] = 2**63 - 5
    write_bundle(bad, meta, [TensorSpec("x", DType.F32, (4,), lambda: np.zeros(4, np.float32))])
    with pytest.raises(BundleError, match=r"config.sliding_window: window 9223372036854775803"):
        check_loadable(bad)


def read_bundle_metadata_python(path: Path) -> dict:
    from pocketlm.bundle import PyLayout

    return json.loads(PyLayout(str(path)).metadata_json)


def test_metadata_nan_is_named_before_any_file_is_made(tmp_path):
    with pytest.raises(BundleError, match=r"config.layers\[1\].eps is not a finite number"):
        write_bundle(tmp_path / "x.plm", {"config": {"layers": [{}, {"eps": float("nan")}]}}, [])
    assert list(tmp_path.iterdir()) == []


# ---- storage --------------------------------------------------------------------------------------------------

WRITE_SCRIPT = """
import sys, numpy as np
from pocketlm.bundle import TensorSpec, write_bundle
from pocketlm.errors import StorageError
try:
    write_bundle(sys.argv[1], {}, [TensorSpec("w", 0, (1 << 20,), lambda: np.ones(1 << 20, np.float32))])
except StorageError as e:
    print(type(e).__name__, e.errno, "|", e)
"""


def test_a_failed_write_is_a_storage_error_naming_the_bundle(tmp_path):
    """A real write failure: the file-size limit (RLIMIT_FSIZE, EFBIG; Python ignores SIGXFSZ) stops
    the 4 MiB tensor as a full disk would (ENOSPC takes the same path)."""
    out = tmp_path / "big.plm"
    r = subprocess.run(["prlimit", "--fsize=1000000", sys.executable, "-c", WRITE_SCRIPT, str(out)],
                       capture_output=True, text=True, timeout=60, env=child_env())
    assert r.returncode == 0, r.stderr
    name, errno_, _, message = r.stdout.strip().split(" ", 3)
    assert name == "StorageError" and int(errno_) == 27  # EFBIG
    assert message == f"cannot write {out}: File too large"
    assert list(tmp_path.iterdir()) == []


def test_cli_reports_a_failed_write_in_one_line(hf, tmp_path):
    out = tmp_path / "x.plm"
    r = subprocess.run(["prlimit", "--fsize=100000", sys.executable, "-m", "pocketlm", "convert", str(hf), "-o",
                        str(out), "--quant", "f32"], capture_output=True, text=True, timeout=120,
                       env=child_env())
    assert r.returncode == 1, r.stderr
    assert r.stderr.splitlines()[-1] == f"pocketlm: error: cannot write {out}: File too large", r.stderr
    assert list(tmp_path.iterdir()) == []


# ---- temporary files of killed writes ----------------------------------------------------------------------------

SLOW_CONVERT = """
import sys, time
from pocketlm.convert import converter
encode = converter._encode
def slow(t, dtype, *rest):
    time.sleep(0.3)
    return encode(t, dtype, *rest)
converter._encode = slow
converter.convert(sys.argv[1], sys.argv[2], quant="f32", progress=False)
"""


def start_slow_convert(hf: Path, out: Path) -> tuple[subprocess.Popen, Path]:
    """A real conversion in a child process, slowed per tensor; returns it and its temporary file
    once that exists."""
    child = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, str(hf), str(out)],
                             env=child_env(), stderr=subprocess.PIPE)
    tmp = out.parent / f".{out.name}.tmp-{child.pid}"
    deadline = time.monotonic() + 60
    while not tmp.exists():
        assert child.poll() is None, child.stderr.read().decode()
        assert time.monotonic() < deadline, "the child never started writing"
        time.sleep(0.05)
    return child, tmp


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_the_next_write_removes_the_temporary_file_of_a_killed_conversion(hf, tmp_path, sig):
    out = tmp_path / "model.plm"
    child, tmp = start_slow_convert(hf, out)
    child.send_signal(sig)
    child.wait(timeout=30)
    assert tmp.exists() and not out.exists()  # what a killed conversion leaves
    converter.convert(hf, out, quant="f32", progress=False)
    assert leftovers(tmp_path) == [] and read_bundle(out).verify() == []


def test_a_write_in_progress_keeps_its_temporary_file(hf, tmp_path):
    out = tmp_path / "model.plm"
    other = tmp_path / ".other.plm.tmp-1"  # another bundle's: not ours to judge
    other.write_bytes(b"x")
    child, tmp = start_slow_convert(hf, out)
    try:
        assert remove_stale_temporaries(out) == []
        assert tmp.exists() and other.exists()
    finally:
        child.kill()
        child.wait(timeout=30)
    assert remove_stale_temporaries(out) == [str(tmp)] and other.exists()


def test_a_temporary_file_with_our_pid_from_before_we_started_is_removed(tmp_path):
    """Containers start their processes with the same few PIDs: a killed conversion's `.tmp-PID`
    may carry ours. Older than this process, it is not ours; written since, it is kept."""
    out = tmp_path / "model.plm"
    ours = tmp_path / f".{out.name}.tmp-{os.getpid()}"
    ours.write_bytes(b"left by an earlier process with our PID")
    earlier = time.time() - 3600
    os.utime(ours, (earlier, earlier))
    assert remove_stale_temporaries(out) == [str(ours)] and not ours.exists()
    ours.write_bytes(b"written now")
    assert remove_stale_temporaries(out) == [] and ours.exists()
    write_bundle(out, {}, [TensorSpec("w", DType.F32, (4,), lambda: np.ones(4, np.float32))])
    assert leftovers(tmp_path) == [] and read_bundle(out).tensors[0].name == "w"
