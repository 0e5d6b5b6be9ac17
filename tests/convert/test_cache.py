"""convert_to_cache: `pocketlm run model.gguf` converts once into $POCKETLM_CACHE and reuses it."""

from __future__ import annotations

import os
import shutil

from convert_fixtures import hf_models, tiny_gguf  # noqa: F401
from pocketlm.bundle import read_bundle
from pocketlm.convert import cache_dir, convert_to_cache


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

    st = src.stat()  # the source changes (new mtime): a new bundle
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = convert_to_cache(src, progress=False)
    assert second != first and second.exists()

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
