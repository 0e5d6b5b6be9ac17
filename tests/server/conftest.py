"""Fixtures of the server tests: a live server (live_server.py) with two models, and the same models
in this process as the reference."""

from __future__ import annotations

from pathlib import Path

import pytest

from live_server import API_KEY, LiveServer
from testutil import make_hf_model


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    from pocketlm.convert import convert

    d = tmp_path_factory.mktemp("served")
    make_hf_model(d / "hf", "llama", seed=3)
    return convert(d / "hf", d / "tiny.plm", quant="f32", progress=False)


@pytest.fixture(scope="session")
def server(tiny_bundle, smollm2_gguf):
    """SmolLM2 (id "smollm2") and a tiny random llama (id "tiny"), 2 threads, 1024-token contexts, an API key."""
    live = LiveServer(["smollm2", str(tiny_bundle), "-t", "2", "-c", "1024", "--api-key", API_KEY])
    yield live
    status = live.stop()
    assert status == 0, live.log()
    assert "pocketlm: stopped" in live.log()


@pytest.fixture(scope="session")
def reference(server, tiny_bundle):
    """The same models in this process: what a fresh session answers is what the server must answer."""
    from pocketlm import Engine

    return {"smollm2": Engine("smollm2", threads=2, max_context=1024),
            "tiny": Engine(tiny_bundle, threads=2, max_context=1024)}

