"""Session.clone() (a conversation fork) against fresh sessions fed the same tokens.

Llama (full attention) and every windowed architecture, f32 and f16 KV, window 8 and chunk 4 (a
ring of 11 slots): a clone of a session holding fewer tokens than a ring and one whose rings have
wrapped, then different continuations on the original and the clone, interleaved. Each must answer
as a fresh session of the same engine fed its whole token list, whatever the other does. Also:
prefix reuse in generate() on a clone, clones after a rewind (within the rings, and past them with a
replay pending), an all-logits session, a busy session, kv_bytes against the config's arithmetic,
and the executor refusing to copy between States of different shapes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from testutil import WINDOWED_ARCHS, greedy_continuation as _greedy, make_hf_model
from pocketlm import ConcurrentUseError
from pocketlm.convert import convert
from pocketlm.engine import Engine

WINDOW, CHUNK, CTX = 8, 4, 64
RING = WINDOW + CHUNK - 1
# Per architecture: (n_layers, n_kv_heads, head_dim, layers with a ring) of the tiny configs
# (testutil.make_hf_model for llama, testutil.windowed_configs for the others).
KV_SHAPES = {"llama": (2, 2, 16, 0), "mistral": (2, 1, 16, 2), "qwen2": (3, 1, 16, 2), "qwen3": (2, 1, 16, 2),
             "phi3": (2, 1, 16, 2), "gemma2": (2, 1, 16, 1), "gemma3": (6, 1, 16, 5)}


@pytest.fixture(scope="module")
def llama_bundle(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    make_hf_model(d / "hf", "llama", seed=4)
    return convert(d / "hf", d / "f32.plm", quant="f32", progress=False)


@pytest.fixture(scope="module", params=("llama",) + WINDOWED_ARCHS)
def bundle(request, llama_bundle, windowed_bundle):
    arch = request.param
    return arch, llama_bundle if arch == "llama" else windowed_bundle(arch, WINDOW)


@pytest.fixture(params=["f32", "f16"])
def engine(request, bundle):
    arch, path = bundle
    e = _engine(path, request.param)
    e.arch_name = arch
    return e


def _engine(path, kv_type, chunk=CHUNK):
    return Engine(path, threads=1, max_context=CTX, prefill_chunk=chunk, kv_type=kv_type)


def _ids(rng, n):
    return rng.integers(3, 320, n).tolist()


def _tol(logits):
    return 1e-4 * max(1.0, float(np.abs(logits).max()))


def _same_as_fresh(session, got, what):
    """got (the logits of session's last call) equals a fresh session's fed session.tokens; returns
    the fresh session."""
    fresh = session.engine.create_session()
    want = fresh.prefill(session.tokens)
    np.testing.assert_allclose(got, want, rtol=0, atol=_tol(want), err_msg=f"{session.engine.arch_name}: {what}")
    return fresh, want


@pytest.mark.parametrize("n", [6, 30])  # below a ring's 11 slots, and wrapped twice
def test_forks_continue_independently(engine, n):
    rng = np.random.default_rng(n)
    prompt, a, b = _ids(rng, n), _ids(rng, 7), _ids(rng, 9)
    s = engine.create_session()
    s.prefill(prompt)
    c = s.clone()
    assert c.tokens == prompt and (c.position, c.cached_tokens) == (n, n) and c.engine is engine
    # Interleaved, so that a state shared by mistake shows: decode steps and multi-chunk prefills.
    steps = [(s, a[:1]), (c, b[:6]), (s, a[1:2]), (c, b[6:7]), (s, a[2:7]), (c, b[7:9])]
    for i, (session, ids) in enumerate(steps):
        got = session.prefill(ids)
        fresh, want = _same_as_fresh(session, got, f"n={n} step {i} ({'clone' if session is c else 'original'})")
        if i >= 4:
            assert _greedy(session, got, 4) == _greedy(fresh, want, 4), (engine.arch_name, n, i)
    assert s.tokens[:n + 7] == prompt + a and c.tokens[:n + 9] == prompt + b


def test_generate_on_a_clone_reuses_the_prefix(engine):
    rng = np.random.default_rng(1)
    prompt = _ids(rng, 30)
    s = engine.create_session()
    s.prefill(prompt)
    c = s.clone()
    for session, more in ((c, _ids(rng, 5)), (s, _ids(rng, 3))):
        follow = prompt + more
        got = list(session.generate(follow, max_tokens=6, temperature=0))
        assert session.last_stats.reused_tokens == 30 and session.last_stats.prompt_tokens == len(more)
        fresh = engine.create_session()
        assert got == list(fresh.generate(follow, max_tokens=6, temperature=0)), engine.arch_name
        assert session.tokens == fresh.tokens


# (tokens, dropped, then the clone rewinds to): a rewind within every ring (a truncation) and one
# past them (a replay pending in both); 12 - 3: a ring just wrapped (slot 0 holds position 11), so
# the clone's own rewind to 1 must not take slot 0 for position 0 (the clone knows what its rings hold).
@pytest.mark.parametrize("n,drop,again", [(40, 2, None), (40, 20, None), (40, 2, 15), (12, 3, 1)])
def test_clone_after_a_rewind(engine, n, drop, again):
    rng = np.random.default_rng(drop)
    prompt, a, b = _ids(rng, n), _ids(rng, 5), _ids(rng, 6)
    s = engine.create_session()
    s.prefill(prompt)
    s.rewind(n - drop)
    c = s.clone()
    assert (c.position, c.cached_tokens) == (s.position, s.cached_tokens)
    if drop == 20 and engine.arch_name != "llama":
        assert c.cached_tokens == 0
    if again is not None:
        c.rewind(again)
    _same_as_fresh(c, c.prefill(b), f"clone of {n} rewound by {drop}, then to {again}")
    _same_as_fresh(s, s.prefill(a), f"original of {n} rewound by {drop}")


def test_clone_with_all_logits(engine):
    rng = np.random.default_rng(3)
    prompt, more, other = _ids(rng, 30), _ids(rng, 6), _ids(rng, 5)
    s = engine.create_session(logits="all")
    s.forward(prompt)
    c = s.clone()
    assert c.logits_mode == "all"
    # score() on the clone reads the last logits the clone was given (its first value is not NaN).
    got = c.score(more)
    want = engine.create_session(logits="all").score(prompt + more)[30:]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, err_msg=engine.arch_name)
    rows = s.forward(other)
    fresh = engine.create_session(logits="all").forward(prompt + other)[30:]
    assert rows.shape == (5, engine.vocab_size)
    np.testing.assert_allclose(rows, fresh, rtol=0, atol=_tol(fresh), err_msg=engine.arch_name)


def test_kv_bytes_follow_the_config(engine):
    n_layers, n_kv_heads, head_dim, n_rings = KV_SHAPES[engine.arch_name]
    row = 2 * n_kv_heads * head_dim * (4 if engine.kv_type == "f32" else 2)  # K and V of one position
    capacities = [RING] * n_rings + [CTX] * (n_layers - n_rings)
    s = engine.create_session()
    assert sorted(s._state.kv_capacities) == sorted(capacities)
    assert s.kv_reserved_bytes == sum(capacities) * row
    assert s.kv_bytes == 0
    rng = np.random.default_rng(2)
    for n in (5, 30):
        s.reset()
        s.prefill(_ids(rng, n))
        assert s.kv_bytes == sum(min(n, c) for c in capacities) * row, (engine.arch_name, n)
        assert s.clone().kv_bytes == s.kv_bytes
    s.rewind(10)  # past the rings: the tokens to replay still count
    assert s.kv_bytes == sum(min(10, c) for c in capacities) * row


def test_cloning_a_busy_session_raises(llama_bundle):
    s = _engine(llama_bundle, "f32").create_session()
    gen = s.generate([5, 6, 7], max_tokens=4, temperature=0)
    next(gen)
    with pytest.raises(ConcurrentUseError, match=r"Session.clone\(\) was called while generate\(\)"):
        s.clone()
    gen.close()
    assert s.clone().tokens == s.tokens


def test_copy_between_states_of_another_shape_is_refused(llama_bundle, windowed_bundle):
    mistral = windowed_bundle("mistral", WINDOW)
    state = _engine(mistral, "f32").create_session()._state
    others = {
        "KV shapes differ": _engine(llama_bundle, "f32").create_session()._state,
        "KV types differ": _engine(mistral, "f16").create_session()._state,
        "max_context differs": _engine(mistral, "f32").create_session(max_context=32)._state,
        "the layers' KV capacities differ": _engine(mistral, "f32", chunk=8).create_session()._state,  # rings of 15
    }
    for why, other in others.items():
        with pytest.raises(ValueError, match=f"^cannot copy a KV cache between these States: {why} "):
            state.copy_kv_from(other, 4)
    for n in (-1, CTX + 1):
        with pytest.raises(ValueError, match=r"n_positions must be in 0\.\.64"):
            state.copy_kv_from(_engine(mistral, "f32").create_session()._state, n)


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads resident memory from /proc")
def test_a_clone_commits_only_the_kv_its_tokens_use(tmp_path):
    """A 4096-position cache reserves 8 MiB here; a clone of a 20-token session copies each head's
    first 20 slots, so it commits a few pages (and its new State's bookkeeping), not the 8 MiB."""
    make_hf_model(tmp_path / "hf", "llama", seed=5, num_hidden_layers=4, num_key_value_heads=4,
                  max_position_embeddings=4096)
    engine = Engine(convert(tmp_path / "hf", tmp_path / "m.plm", quant="f32", progress=False), threads=1,
                    max_context=4096, prefill_chunk=CHUNK, kv_type="f32")
    s = engine.create_session()
    s.prefill(list(range(3, 23)))
    assert s.kv_reserved_bytes == 8 << 20 and s.kv_bytes == 20 * 2 * 4 * 16 * 4 * 4
    engine.create_session()  # the first State's one-time costs (thread start-up, allocator arenas)
    page = os.sysconf("SC_PAGE_SIZE")
    before = int(Path("/proc/self/statm").read_text().split()[1]) * page
    c = s.clone()
    grown = int(Path("/proc/self/statm").read_text().split()[1]) * page - before
    assert grown < (2 << 20), f"a clone committed {grown} bytes"
    assert c.kv_bytes == s.kv_bytes
