"""The committed fuzz corpus (fuzz/corpus/), replayed through the same oracles the fuzzers use
(fuzz/targets.py): a .plm through read_bundle, describe, Engine and one token; a .gguf through
convert and then the bundle it wrote; a chat template through render_chat within its time limit.
Each input must pass or be refused with a PocketLMError; the seeds must go all the way through.
Crashers found by scripts/fuzz.sh are added here once fixed, so they stay fixed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
sys.path.insert(0, str(FUZZ))

import targets  # noqa: E402

CASES = [(kind, path) for kind in ("bundle", "gguf", "chat") for path in sorted((FUZZ / "corpus" / kind).iterdir())]


@pytest.mark.parametrize("kind, path", CASES, ids=[f"{k}/{p.name}" for k, p in CASES])
def test_corpus_input(kind, path):
    check, _ = targets.TARGETS[kind]
    outcome = check(path.read_bytes())  # anything but a PocketLMError propagates and fails the test
    if path.name.startswith("seed-"):
        assert outcome.startswith(("generated", "rendered")), outcome
    else:
        assert outcome.startswith(("generated", "rendered", "refused: ")), outcome


def test_corpus_is_small():
    assert sum(p.stat().st_size for _, p in CASES) < 1 << 20
    assert {k for k, _ in CASES} == {"bundle", "gguf", "chat"}


def test_resigned_mutation_reaches_the_structural_checks():
    """A bundle edited and re-signed by plm_layout passes the checksums, so its refusal comes from
    the check behind them (here: a tensor whose size disagrees with its shape)."""
    import plm_layout

    from pocketlm.bundle import read_bundle
    from pocketlm.errors import BundleError

    seed = (FUZZ / "corpus" / "bundle" / "seed-llama-int4.plm").read_bytes()
    layout = plm_layout.parse(seed)
    assert bytes(plm_layout.build(layout)) == seed  # the writer's layout, reproduced exactly
    layout.entries[0].nbytes += 1
    path = targets._TMP / "resigned.plm"
    path.write_bytes(plm_layout.build(layout))
    try:
        with pytest.raises(BundleError, match="nbytes 10881 does not match"):
            read_bundle(path)
    finally:
        path.unlink()
