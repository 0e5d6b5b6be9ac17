"""The committed fuzz corpus (fuzz/corpus/), replayed through the same oracles the fuzzers use
(fuzz/targets.py): a .plm through read_bundle, describe, Engine and one token; a .gguf through
convert and then the bundle it wrote; a chat template through render_chat within its time limit; a
signature through pocketlm.signing.verify; a model in an OCI layout through pull and the store; a session
file through Engine.load_session and one more token; a request through the server app (no 500).
Each input must pass or be refused with a PocketLMError; the seeds must go all the way through.
Bundle and GGUF inputs are recipes (JSON edits of a generated tiny model, fuzz/make_seeds.py), so no
model file is committed. Crashers found by scripts/fuzz.sh join the corpus once fixed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
sys.path.insert(0, str(FUZZ))

import make_seeds  # noqa: E402
import plm_layout  # noqa: E402
import targets  # noqa: E402

# seeds the tiny model's 64-token context refuses (still parsed and rendered first)
SERVER_SEEDS_REFUSED = {"seed-chat-tools.json"}
RECIPES = [(kind, path) for kind in ("bundle", "gguf", "chat", "signature", "manifest", "session", "server")
           for path in sorted((FUZZ / "corpus" / kind).iterdir())]
SEEDS = [(kind, name) for kind, names in targets.SEEDS.items() for name in names]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> Path:
    return make_seeds.ensure_seeds(tmp_path_factory.mktemp("fuzz_seeds"))


@pytest.mark.parametrize("kind, name", SEEDS, ids=[f"{k}/seed-{n}" for k, n in SEEDS])
def test_seed_goes_all_the_way(seeds, kind, name):
    check, _ = targets.TARGETS[kind]
    assert check(targets.seed_path(seeds, kind, name).read_bytes()) == "generated"


@pytest.mark.parametrize("kind, path", RECIPES, ids=[f"{k}/{p.name}" for k, p in RECIPES])
def test_corpus_input(seeds, kind, path):
    check, _ = targets.TARGETS[kind]
    outcome = check(targets.corpus_input(kind, path, seeds))  # anything but a PocketLMError fails the test
    if kind == "server":  # an HTTP status; check_server raises on a 500 or a malformed error
        assert outcome.isdigit() and (outcome == "200" or not path.name.startswith("seed-")
                                      or path.name in SERVER_SEEDS_REFUSED), outcome
        return
    if path.name.startswith("seed-"):
        assert outcome.startswith(("rendered", "verified", "pulled")), outcome
    else:
        assert outcome.startswith(("generated", "rendered", "verified", "pulled", "refused: ",
                                   "converted, then refused: ")), outcome


def test_corpus_is_small_and_has_no_model_files():
    assert sum(p.stat().st_size for _, p in RECIPES) < 1 << 20
    assert {p.suffix for _, p in RECIPES} == {".json"}
    assert {k for k, _ in RECIPES} == {"bundle", "gguf", "chat", "signature", "manifest", "session", "server"}


def test_resigned_edit_reaches_the_structural_checks(seeds, tmp_path):
    """A bundle edited and re-signed by plm_layout passes the checksums, so its refusal comes from
    the check behind them (here: a tensor whose size disagrees with its shape)."""
    from pocketlm.bundle import read_bundle
    from pocketlm.errors import BundleError

    seed = targets.seed_path(seeds, "bundle", "llama-int4").read_bytes()
    layout = plm_layout.parse(seed)
    assert bytes(plm_layout.build(layout)) == seed  # the writer's layout, reproduced exactly
    entry = layout.entries[0]
    entry.nbytes += 1
    (tmp_path / "resigned.plm").write_bytes(plm_layout.build(layout))
    with pytest.raises(BundleError, match=f"nbytes {entry.nbytes} does not match"):
        read_bundle(tmp_path / "resigned.plm")
