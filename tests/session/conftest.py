"""Fixtures shared by the session tests: the tiny windowed bundles, built once per test run."""

from __future__ import annotations

import pytest

from testutil import make_windowed_bundle


@pytest.fixture(scope="session")
def windowed_bundle(tmp_path_factory):
    """windowed_bundle(arch, window) -> path of the f32 bundle (testutil.make_windowed_bundle), made
    on first use: test_rewind_windows and test_clone share them."""
    made = {}

    def get(arch: str, window: int):
        if (arch, window) not in made:
            made[arch, window] = make_windowed_bundle(tmp_path_factory.mktemp(f"{arch}-w{window}"), arch, window)
        return made[arch, window]

    return get
