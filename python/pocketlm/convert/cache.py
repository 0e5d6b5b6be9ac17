"""On-the-fly conversion for `pocketlm run model.gguf`: convert once, reuse afterwards.

Bundles live in $POCKETLM_CACHE (default ~/.cache/pocketlm/bundles), named
`<source stem>-<source id>-<state>.plm`. The source id hashes the source's absolute path; the
state hashes its size and mtime (for a folder: of config.json and the safetensors files) and the
pocketlm and converter versions, so editing or replacing the source, or upgrading pocketlm,
converts again. A new conversion deletes the bundles it supersedes (same source id, other
state, or the older `<stem>-<16 hex>.plm` naming): the cache holds one bundle per source, not one
per upgrade. A process still running an old bundle keeps its mapping; the file goes when it closes.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from pathlib import Path

from pocketlm import __version__
from pocketlm.convert.converter import CONVERTER_VERSION, convert
from pocketlm.convert.hf import is_hf_folder, source_files
from pocketlm.errors import BundleError


def cache_dir() -> Path:
    env = os.environ.get("POCKETLM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pocketlm" / "bundles"


def source_id(src: Path) -> str:
    """8 hex digits naming the source by its absolute path."""
    return hashlib.sha256(f"pocketlm source\n{src.resolve()}\n".encode()).hexdigest()[:8]


def cache_key(src: Path) -> str:
    """`<source id>-<state>`: the state changes with the source's files and the converter."""
    src = src.resolve()
    if not src.exists():
        raise BundleError(f"{src}: no such file or folder")
    files = source_files(src) if is_hf_folder(src) else [src]
    h = hashlib.sha256(f"pocketlm {__version__} converter {CONVERTER_VERSION}\n{src}\n".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return f"{source_id(src)}-{h.hexdigest()[:12]}"


def _looks_complete(path: Path) -> bool:
    """Magic and the header's file size match: a cheap check that does not need the C++ reader."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
        return len(head) == 24 and head[:8] == b"POCKETLM" and struct.unpack("<Q", head[16:24])[0] == path.stat().st_size
    except OSError:
        return False


def _stem(src: Path) -> str:
    return src.stem if src.is_file() else src.resolve().name


def cached_path(src: str | os.PathLike) -> Path:
    src = Path(src)
    return cache_dir() / f"{_stem(src)}-{cache_key(src)}.plm"


def superseded(src: str | os.PathLike, current: Path | None = None) -> list[Path]:
    """Cached bundles of `src` other than its current one, `current` (default: cached_path(src)):
    older sources or converters."""
    src = Path(src)
    current = current or cached_path(src)
    # `<stem>-<16 hex>.plm` is the naming of older pocketlm versions, which did not record the
    # source apart: such a bundle of another source with the same file name goes too (a cache
    # miss for it later, nothing lost).
    pattern = re.compile(re.escape(f"{_stem(src)}-") + rf"(?:{source_id(src)}-[0-9a-f]{{12}}|[0-9a-f]{{16}})\.plm")
    try:
        entries = list(current.parent.iterdir())
    except OSError:
        return []
    return sorted(p for p in entries if p != current and pattern.fullmatch(p.name))


def convert_to_cache(src: str | os.PathLike, progress: bool = True) -> Path:
    """The cached bundle for `src` (a .gguf file or a Hugging Face folder), converting it with the
    default recipe (GGUF types kept; f16 for Hugging Face) if it is not cached yet. A conversion
    deletes the cached bundles of `src` it supersedes."""
    target = cached_path(src)
    if _looks_complete(target):
        return target
    out = convert(src, target, quant=None, progress=progress)
    for old in superseded(src, target):
        try:
            old.unlink()
        except OSError:  # gone already, or not ours to delete: the new bundle is in place anyway
            pass
    return out
