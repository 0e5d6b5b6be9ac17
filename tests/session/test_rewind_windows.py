"""Rewind and prefix reuse on sliding-window layers against a fresh session fed the same tokens.

A windowed layer's KV cache is a ring of window + chunk - 1 slots; rewinding further back than
the ring still holds must not read overwritten keys (the session feeds the kept tokens again).
Every windowed architecture (Mistral, Qwen2 and Qwen3 with use_sliding_window, Phi-3, Gemma 2,
Gemma 3 5:1), f32 and f16 KV, window 8 and chunk 4 (ring of 11 slots), so that a
40-token prompt wraps each ring several times. Rewinds by less than a chunk, by exactly a chunk
(the last one that is a plain truncation), by one more, by more than the window, and to 0.
"""

from __future__ import annotations

import numpy as np
import pytest

from testutil import WINDOWED_ARCHS, WINDOWED_TINY, greedy_continuation as _greedy
from pocketlm.engine import Engine

WINDOW, CHUNK, CTX = 8, 4, 64
RING = WINDOW + CHUNK - 1
REWINDS = [1, CHUNK, CHUNK + 1, WINDOW + 3, 40]  # tokens dropped from a 40-token session


@pytest.fixture(scope="module", params=WINDOWED_ARCHS)
def bundle(request, windowed_bundle):
    return request.param, windowed_bundle(request.param, WINDOW)


def _engine(path, kv_type):
    return Engine(path, threads=1, max_context=CTX, prefill_chunk=CHUNK, kv_type=kv_type)


def _tol(logits):
    return 1e-4 * max(1.0, float(np.abs(logits).max()))


class _CountingState:
    """Stands in for a session's _core.State and counts the tokens it runs."""

    def __init__(self, state):
        self.state, self.tokens_run = state, 0
        self.kv_capacities = state.kv_capacities

    def run(self, tokens, pos):
        self.tokens_run += len(tokens)
        return self.state.run(tokens, pos)


@pytest.mark.parametrize("kv_type", ["f32", "f16"])
def test_rewind_then_prefill_equals_fresh_session(bundle, kv_type):
    arch, path = bundle
    engine = _engine(path, kv_type)
    rng = np.random.default_rng(5)
    prompt = rng.integers(3, engine.vocab_size, 40).tolist()
    more = rng.integers(3, engine.vocab_size, 6).tolist()
    rings = [c for c in engine.create_session()._state.kv_capacities if c < CTX]
    assert rings and set(rings) == {RING}, rings  # the case exercises a ring that wraps
    session = engine.create_session()
    for drop in REWINDS:
        session.reset()
        session.prefill(prompt)
        counting = session._state = _CountingState(session._state)
        session.rewind(40 - drop)
        got = session.prefill(more)
        kept = prompt[:40 - drop] + more
        fresh = engine.create_session()
        want = fresh.prefill(kept)
        np.testing.assert_allclose(got, want, rtol=0, atol=_tol(want), err_msg=f"{arch} rewound by {drop}")
        # Within a chunk the ring still holds the window: a plain truncation. Beyond, a replay.
        assert counting.tokens_run == (len(more) if drop <= CHUNK else len(kept)), drop
        assert session.tokens == kept
        assert _greedy(session, got, 6) == _greedy(fresh, want, 6), (arch, drop)
        session._state = counting.state


def test_the_check_catches_a_ring_that_lost_the_window(bundle):
    """Rewinds by chunk + 1 and by 20 treated as plain truncations read overwritten keys: the
    comparison above would see it (the condition is tight)."""
    arch, path = bundle
    engine = _engine(path, "f32")
    rng = np.random.default_rng(6)
    prompt = rng.integers(3, engine.vocab_size, 40).tolist()
    errors = []
    for drop in (CHUNK + 1, 20):
        s = engine.create_session()
        s.prefill(prompt)
        s.kv_cache.can_trim = lambda position: True
        s.rewind(40 - drop)
        got = s.prefill(prompt[40 - drop:41 - drop])
        want = engine.create_session().prefill(prompt[:41 - drop])
        errors.append(float(np.abs(got - want).max() / _tol(want)))
    assert min(errors) > 10, (arch, errors)


@pytest.mark.parametrize("kv_type", ["f32", "f16"])
def test_generate_prefix_reuse_equals_fresh_session(bundle, kv_type):
    arch, path = bundle
    engine = _engine(path, kv_type)
    rng = np.random.default_rng(7)
    first = rng.integers(3, engine.vocab_size, 36).tolist()
    # The next prompt shares `keep` tokens with what the session holds (36 + 7 fed back): 41 is a
    # rewind by 2 (a truncation), the others go past what the rings hold.
    for keep in (41, 35, 20, 0):
        s = engine.create_session()
        list(s.generate(first, max_tokens=8, temperature=0))
        second = s.tokens[:keep] + rng.integers(3, engine.vocab_size, 5).tolist()
        got = list(s.generate(second, max_tokens=8, temperature=0))
        assert s.last_stats.reused_tokens == (keep if keep == 41 else 0)
        got_tokens = s.tokens
        fresh = engine.create_session()
        want = list(fresh.generate(second, max_tokens=8, temperature=0))
        assert got == want and got_tokens == fresh.tokens, (arch, keep)
        assert s.last_stats.prompt_tokens + s.last_stats.reused_tokens == len(second)


def test_rewind_with_all_logits_returns_only_the_new_rows(bundle):
    """A replay after a rewind feeds the kept tokens again; forward() and score() still return rows
    for the tokens given, equal to a fresh session's rows for the same positions."""
    arch, path = bundle
    engine = _engine(path, "f32")
    rng = np.random.default_rng(8)
    prompt = rng.integers(3, engine.vocab_size, 40).tolist()
    more = rng.integers(3, engine.vocab_size, 6).tolist()
    s = engine.create_session(logits="all")
    s.forward(prompt)
    s.rewind(21)
    got = s.forward(more)
    fresh = engine.create_session(logits="all").forward(prompt[:21] + more)[21:]
    assert got.shape == (6, engine.vocab_size)
    np.testing.assert_allclose(got, fresh, rtol=0, atol=_tol(fresh), err_msg=arch)
    s.rewind(21)
    scores = s.score(more)
    want = engine.create_session(logits="all").score(prompt[:21] + more)[21:]
    np.testing.assert_allclose(scores[1:], want[1:], rtol=0, atol=1e-4)


def test_cached_tokens_and_bench_rewind(bundle):
    """`cached_tokens` says when a rewind left tokens to replay, and bench's untimed rewind rebuilds
    them before the timed step, so that the step's logits equal a fresh session's."""
    from pocketlm.bench import _rewind_untimed

    _, path = bundle
    engine = _engine(path, "f32")
    ids = np.random.default_rng(5).integers(3, WINDOWED_TINY["vocab_size"], 40).tolist()
    s = engine.create_session()
    s.prefill(ids)
    assert s.cached_tokens == 40
    s.rewind(40 - CHUNK)  # within every ring
    assert s.cached_tokens == s.position == 40 - CHUNK
    s.rewind(20)          # past the rings
    assert (s.position, s.cached_tokens) == (20, 0)
    _rewind_untimed(s, 10)
    assert s.cached_tokens == s.position == 10
    got = s.decode(ids[10])
    fresh = engine.create_session()
    want = fresh.prefill(ids[:11])
    np.testing.assert_allclose(got, want, atol=_tol(want), rtol=0)
