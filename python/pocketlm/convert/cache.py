"""On-the-fly conversion for `pocketlm run model.gguf`: convert once, reuse afterwards.

Bundles live in $POCKETLM_CACHE (default ~/.cache/pocketlm/bundles), named
`<source stem>-<key>.plm`; the key hashes the source's absolute path, size and mtime (for a
folder: of config.json and the safetensors files) and the converter version, so editing or
replacing the source, or upgrading the converter, converts again.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

from pocketlm import __version__
from pocketlm.convert.converter import CONVERTER_VERSION, convert
from pocketlm.convert.hf import is_hf_folder, source_files
from pocketlm.errors import BundleError


def cache_dir() -> Path:
    env = os.environ.get("POCKETLM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pocketlm" / "bundles"


def cache_key(src: Path) -> str:
    src = src.resolve()
    if not src.exists():
        raise BundleError(f"{src}: no such file or folder")
    files = source_files(src) if is_hf_folder(src) else [src]
    h = hashlib.sha256(f"pocketlm {__version__} converter {CONVERTER_VERSION}\n{src}\n".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _looks_complete(path: Path) -> bool:
    """Magic and the header's file size match: a cheap check that does not need the C++ reader."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
        return len(head) == 24 and head[:8] == b"POCKETLM" and struct.unpack("<Q", head[16:24])[0] == path.stat().st_size
    except OSError:
        return False


def cached_path(src: str | os.PathLike) -> Path:
    src = Path(src)
    stem = src.stem if src.is_file() else src.resolve().name
    return cache_dir() / f"{stem}-{cache_key(src)}.plm"


def convert_to_cache(src: str | os.PathLike, progress: bool = True) -> Path:
    """The cached bundle for `src` (a .gguf file or a Hugging Face folder), converting it with the
    default recipe (GGUF types kept; f16 for Hugging Face) if it is not cached yet."""
    target = cached_path(src)
    if _looks_complete(target):
        return target
    return convert(src, target, quant=None, progress=progress)
