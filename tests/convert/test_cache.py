"""convert_to_cache: `pocketlm run model.gguf` converts once into $POCKETLM_CACHE and reuses it: keyed by
content, so a copy or a move finds its bundle and an edit converts again."""

from __future__ import annotations

import os
import shutil

from convert_fixtures import hf_models, tiny_gguf  # noqa: F401
from testutil import make_hf_model
from pocketlm.bundle import read_bundle
from pocketlm.convert import cache_dir, convert_to_cache
from pocketlm.convert.cache import source_id, superseded


def variant_gguf(folder) -> "os.PathLike":
    """A GGUF like tiny_gguf with other weights (another content)."""
    from gguf_craft import write_gguf

    model = make_hf_model(folder / "hf", "llama", seed=99, num_hidden_layers=1)
    path = folder / "variant.gguf"
    write_gguf(path, model, folder / "hf", "llama", {"attn_v.weight": "Q8_0", "ffn_up.weight": "Q4_0"})
    return path


def test_converts_once_then_reuses(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("POCKETLM_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    src = tmp_path / "model.gguf"
    shutil.copy(tiny_gguf, src)

    first = convert_to_cache(src, progress=False)
    assert first.parent == tmp_path / "cache" and first.name.startswith("model-") and first.suffix == ".plm"
    assert read_bundle(first).metadata["quantization"]["mode"] == "keep"
    stamp = first.stat().st_mtime_ns
    assert convert_to_cache(src, progress=False) == first and first.stat().st_mtime_ns == stamp  # reused

    st = src.stat()  # touched, the same content: still the same bundle
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert convert_to_cache(src, progress=False) == first and first.stat().st_mtime_ns == stamp
    copy = tmp_path / "elsewhere" / "renamed.gguf"  # a copy, and a move: found, not converted again
    copy.parent.mkdir()
    shutil.copy(src, copy)
    assert convert_to_cache(copy, progress=False) == first and first.stat().st_mtime_ns == stamp
    moved = tmp_path / "moved.gguf"
    copy.rename(moved)
    assert convert_to_cache(moved, progress=False) == first

    shutil.copy(variant_gguf(tmp_path / "v"), src)  # the source changes: a new bundle, which replaces the old
    second = convert_to_cache(src, progress=False)
    assert second != first and second.exists() and not first.exists()

    second.write_bytes(second.read_bytes()[:5000])  # a damaged cache entry is converted again
    assert convert_to_cache(src, progress=False) == second
    read_bundle(second)


def test_default_location_and_hf_folders(hf_models, tmp_path, monkeypatch):
    monkeypatch.delenv("POCKETLM_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "pocketlm" / "bundles"
    out = convert_to_cache(hf_models["llama"][0], progress=False)
    assert out.parent == cache_dir() and out.name.startswith("llama-")
    assert read_bundle(out).metadata["quantization"]["mode"] == "f16"


def test_a_new_conversion_deletes_only_what_it_supersedes(tiny_gguf, tmp_path, monkeypatch):
    """One bundle per source: upgrading pocketlm or editing the source does not pile up copies.
    Bundles of other sources (even with the same file name), foreign files and files being
    written stay; bundles in the naming of older versions go."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("POCKETLM_CACHE", str(cache))
    src = tmp_path / "a" / "model.gguf"
    other = tmp_path / "b" / "model.gguf"  # same stem, another source (another content)
    variant = variant_gguf(tmp_path / "v")
    for p, content in ((src, tiny_gguf), (other, variant)):
        p.parent.mkdir()
        shutil.copy(content, p)
    kept = convert_to_cache(other, progress=False)
    first = convert_to_cache(src, progress=False)
    assert first.name.split("-")[1] == source_id(src) != source_id(other) == kept.name.split("-")[1]

    # what an older pocketlm or converter left behind for this source
    stale = cache / f"model-{source_id(src)}-{'0' * 12}.plm"
    legacy = cache / f"model-{'2' * 16}.plm"  # the naming of older versions
    for p in (stale, legacy):
        shutil.copy(first, p)
    foreign = [cache / "notes.txt", cache / f"model-{source_id(src)}-old.plm",
               cache / f".model-{source_id(src)}-{'1' * 12}.plm.tmp-123"]
    for p in foreign:
        p.write_bytes(b"x")
    assert superseded(src) == sorted([stale, legacy])

    with open(src, "r+b") as f:  # an edit the samples see (its last byte: tensor data)
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    second = convert_to_cache(src, progress=False)
    assert second.exists() and not first.exists() and not stale.exists() and not legacy.exists()
    assert kept.exists() and all(p.exists() for p in foreign)
    assert superseded(src) == [] and superseded(other) == []
