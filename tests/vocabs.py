"""llama.cpp's tokenizer golden files, fetched once into a cache outside the repository.

The `llama-cpp-python` sdist on PyPI vendors llama.cpp, whose `models/` folder holds vocabulary-only GGUF
files (`ggml-vocab-<name>.gguf`, no weights) and, for most of them, the test inputs and expected ids that
llama.cpp's own `tests/test-tokenizer-0.cpp` checks:

    ggml-vocab-<name>.gguf.inp   the inputs, each followed by a line "__ggml_vocab_test__"
    ggml-vocab-<name>.gguf.out   one line per input: the token ids, space separated

`vocab_dir()` downloads the pinned sdist with pip (once), extracts only `models/ggml-vocab-*` into
`$POCKETLM_CACHE/llama.cpp-vocabs/<version>/` (default `~/.cache/pocketlm/`) and deletes nothing else.
`read_gguf_metadata()` reads a GGUF's key/value section directly: `gguf.GGUFReader` takes 10-20 s on the
large vocabularies (it maps every array element separately), which would make the tests slow.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SEPARATOR = "\n__ggml_vocab_test__\n"


class VocabsUnavailable(RuntimeError):
    """The sdist could not be downloaded (no network); the message says why."""


def cache_root() -> Path:
    return Path(os.environ.get("POCKETLM_CACHE") or Path.home() / ".cache" / "pocketlm")


def vocab_dir(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """The folder with llama.cpp's ggml-vocab-* files, fetched and extracted on first use."""
    root = cache_root()
    target = root / "llama.cpp-vocabs" / version
    if (target / ".complete").exists():
        return target
    sdist = _find_or_download_sdist(root, version)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        staging = Path(tmp) / "models"
        staging.mkdir()
        with tarfile.open(sdist) as tar:
            for member in tar:
                name = member.name.replace("\\", "/")
                if member.isfile() and "/vendor/llama.cpp/models/ggml-vocab-" in name:
                    src = tar.extractfile(member)
                    with open(staging / name.rsplit("/", 1)[1], "wb") as dst:
                        shutil.copyfileobj(src, dst)
        (staging / ".complete").write_text(f"llama-cpp-python {version}\n")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            staging.rename(target)
        except OSError:  # another process got there first
            if not (target / ".complete").exists():
                raise
    return target


def _find_or_download_sdist(root: Path, version: str) -> Path:
    name = f"llama_cpp_python-{version}.tar.gz"
    # The benchmarks' llama.cpp build (bench/build_llamacpp.sh) keeps the same sdist: reuse it.
    for folder in (root / "llama-cpp-python-sdist", root / "llama.cpp" / "sdist"):
        if (folder / name).is_file():
            return folder / name
    dest = root / "llama-cpp-python-sdist"
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"llama-cpp-python=={version}", "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise VocabsUnavailable(f"cannot run pip download: {e}") from None
    if proc.returncode != 0 or not (dest / name).is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise VocabsUnavailable(f"pip download llama-cpp-python=={version} failed: {' / '.join(tail)}")
    return dest / name


def golden_names(folder: Path) -> list[str]:
    """Vocab names that have .inp/.out golden files."""
    return sorted(p.name[len("ggml-vocab-"):-len(".gguf.inp")] for p in folder.glob("ggml-vocab-*.gguf.inp"))


def read_golden(gguf_path: Path) -> list[tuple[str, list[int]]]:
    """(input text, expected ids) pairs, parsed as test-tokenizer-0.cpp's read_tests does."""
    raw = Path(str(gguf_path) + ".inp").read_bytes().decode("utf-8")
    inputs, pos = [], 0
    while pos < len(raw):
        nxt = raw.find(SEPARATOR, pos)
        if nxt < 0:
            inputs.append(raw[pos:])
            break
        inputs.append(raw[pos:nxt])
        pos = nxt + len(SEPARATOR)
    lines = Path(str(gguf_path) + ".out").read_bytes().decode("utf-8").split("\n")
    lines = lines[:-1] if lines and lines[-1] == "" else lines
    if len(lines) != len(inputs):
        raise ValueError(f"{gguf_path}: {len(inputs)} inputs but {len(lines)} outputs")
    return [(text, [int(t) for t in line.split()]) for text, line in zip(inputs, lines)]


# --- a fast reader for a GGUF's key/value section ----------------------------------------------------------------

# GGUF value types -> numpy dtype (scalars and arrays); 8 = string, 9 = array.
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}


def read_gguf_metadata(path: Path) -> dict:
    """{key: value} of a GGUF file's metadata, with Python values as `gguf.ReaderField.contents()` gives
    them (str, int, float, bool, lists). Tensor infos and data are not read."""
    data = Path(path).read_bytes()
    if data[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    if version < 2:
        raise ValueError(f"{path}: GGUF version {version} is not supported")
    pos = 24

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        s = data[pos + 8:pos + 8 + n].decode("utf-8", errors="surrogateescape")
        pos += 8 + n
        return s

    def value(vtype: int):
        nonlocal pos
        if vtype == 8:
            return string()
        if vtype == 9:
            (etype, n) = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if etype == 8:
                return [string() for _ in range(n)]
            if etype == 9:
                return [value(9) for _ in range(n)]
            arr = np.frombuffer(data, dtype=_NUMPY[etype], count=n, offset=pos)
            pos += arr.nbytes
            return arr.tolist()
        arr = np.frombuffer(data, dtype=_NUMPY[vtype], count=1, offset=pos)
        pos += arr.nbytes
        return arr[0].item()

    fields = {}
    for _ in range(n_kv):
        key = string()
        (vtype,) = struct.unpack_from("<I", data, pos)
        pos += 4
        fields[key] = value(vtype)
    return fields


def tokenizer_fields(path: Path) -> dict:
    """The fields `pocketlm.tokenizer.gguf_tokenizer_fields` would return for this file."""
    return {k: v for k, v in read_gguf_metadata(path).items()
            if k.startswith("tokenizer.") or k == "general.architecture"}
