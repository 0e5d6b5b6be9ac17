"""On-the-fly conversion for `pocketlm run model.gguf`: convert once, reuse afterwards.

Bundles live in $POCKETLM_CACHE (default ~/.cache/pocketlm/bundles), named
`<source stem>-<source id>-<state>.plm`. The source id hashes the source's absolute path; the
state hashes its content (for a folder: config.json, the safetensors files and the tokenizer and
generation files the converter reads; each file's size, its first 8 MiB whole (a GGUF's header and
metadata, the tokenizer included, are there) and 16 samples of 64 KiB spread over the rest, its end
included: at most about 9 MB read per file, whatever the model's size) and the pocketlm and converter
versions. An edit that keeps a file's size and falls between the samples of its tensor data is not
seen (a fast hash, not a full one: `convert` hashes everything into the bundle's provenance). So editing or replacing the source, or
upgrading pocketlm, converts again, while a copy or a move of a source already converted finds its
bundle under the other name (any bundle of the same state serves). A new conversion deletes the
bundles it supersedes (same source id, other state, or the older `<stem>-<16 hex>.plm` naming): the
cache holds one bundle per source, not one per upgrade. A process still running an old bundle keeps
its mapping; the file goes when it closes.
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


HEAD_BYTES = 8 << 20     # the start of each source file, hashed whole
SAMPLE_BYTES = 1 << 16   # bytes of each later sample
SAMPLES = 16             # samples after the head, the last at the file's end
# the small files of a Hugging Face folder the converter reads besides config.json and the weights
FOLDER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                "chat_template.jinja", "chat_template.json", "tokenizer.model", "modules.json")


def content_state(src: Path) -> str:
    """12 hex digits naming the source's content and the converter (see the module doc)."""
    src = src.resolve()
    if not src.exists():
        raise BundleError(f"{src}: no such file or folder")
    folder = is_hf_folder(src)
    files = source_files(src) + [src / n for n in FOLDER_FILES if (src / n).is_file()] if folder else [src]
    h = hashlib.sha256(f"pocketlm {__version__} converter {CONVERTER_VERSION}\n".encode())
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(src) if folder else ''}\0{size}\n".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(HEAD_BYTES))
            rest = size - HEAD_BYTES
            for i in range(1, SAMPLES + 1) if rest > 0 else ():
                fh.seek(HEAD_BYTES + max(0, rest - SAMPLE_BYTES) * i // SAMPLES)
                h.update(fh.read(SAMPLE_BYTES))
    return h.hexdigest()[:12]


def cache_key(src: Path) -> str:
    """`<source id>-<state>`: the state changes with the source's content and the converter."""
    return f"{source_id(src)}-{content_state(src)}"


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
    """The source's bundle: its own name, or (a copy or a move of a source converted before) a complete
    bundle of the same content under another name; else its own name, to convert into."""
    src = Path(src)
    key = cache_key(src)
    own = cache_dir() / f"{_stem(src)}-{key}.plm"
    if _looks_complete(own):
        return own
    state = key.split("-")[1]
    try:
        same = sorted(p for p in cache_dir().glob(f"*-{state}.plm") if _looks_complete(p))
    except OSError:
        same = []
    return same[0] if same else own


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
    # Several processes may want the same model at once (Ray actors starting on one node, two
    # servers): one converts, under an exclusive lock beside the target, the others wait and take
    # its bundle (the converter writes a temporary file and renames it, so none sees half of one).
    # The lock file goes when the conversion ends (a waiter that then finds no bundle, after a
    # failure, tries itself), so a failed conversion leaves nothing in the cache.
    import fcntl

    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.with_name(target.name + ".lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            if _looks_complete(target):
                return target
            out = convert(src, target, quant=None, progress=progress)
        finally:
            lock_path.unlink(missing_ok=True)
    for old in superseded(src, target):
        try:
            old.unlink()
        except OSError:  # gone already, or not ours to delete: the new bundle is in place anyway
            pass
    return out
