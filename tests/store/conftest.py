"""Fixtures of the store tests: a store in a temporary folder ($POCKETLM_STORE), a small real bundle,
and a plain-HTTP registry on 127.0.0.1 (registries.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from registries import Registry, need_registry


@pytest.fixture
def store(tmp_path, monkeypatch):
    from pocketlm.store import Store

    monkeypatch.setenv("POCKETLM_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("POCKETLM_CACHE", str(tmp_path / "cache"))
    return Store()


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    """A tiny random llama at f32 (a real .plm, ~1 MB)."""
    from testutil import make_f32_bundle

    return make_f32_bundle(tmp_path_factory.mktemp("bundle"), "llama", seed=5)


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    need_registry()
    r = Registry(tmp_path_factory.mktemp("registry"))
    yield r
    r.stop()
