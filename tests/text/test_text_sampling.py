"""Sampler vs transformers' logits processors (the reference for which tokens may be drawn), and the
statistics of the draw itself."""

from __future__ import annotations

import numpy as np
import pytest

from pocketlm.errors import InvalidInputError, NonFiniteError
from pocketlm.sampling import Sampler, SamplingParams


def hf_survivors(logits: np.ndarray, top_k: int, top_p: float, min_p: float) -> set[int]:
    """Ids left finite by TopK -> TopP -> MinP warpers (our order)."""
    torch = pytest.importorskip("torch")
    from transformers import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = torch.from_numpy(logits.copy())[None]
    ids = torch.zeros((1, 1), dtype=torch.long)
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    if min_p > 0:
        scores = MinPLogitsWarper(min_p)(ids, scores)
    return set(torch.nonzero(torch.isfinite(scores[0])).flatten().tolist())


def random_logits(seed: int, n: int, scale: float) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


FILTERS = [  # (top_k, top_p, min_p)
    (40, 0.95, 0.05), (40, 1.0, 0.0), (1000, 0.9, 0.0), (5, 0.5, 0.0), (40, 1.0, 0.2), (3000, 0.999, 0.0),
    (0, 0.95, 0.05), (0, 0.9, 0.0), (0, 0.5, 0.0), (0, 0.999, 0.0), (0, 0.99999, 0.0), (0, 1.0, 0.1),
    (0, 0.1, 0.0),
]


@pytest.mark.parametrize("top_k, top_p, min_p", FILTERS)
@pytest.mark.parametrize("vocab, scale", [(5000, 1.0), (5000, 4.0), (151936, 2.0)])
def test_candidates_match_transformers_warpers(top_k, top_p, min_p, vocab, scale):
    logits = random_logits(vocab + int(scale), vocab, scale)
    sampler = Sampler(SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p, min_p=min_p, seed=0), vocab)
    ids, probs = sampler.distribution(logits)
    assert set(ids.tolist()) == hf_survivors(logits, top_k, top_p, min_p)
    assert probs.sum() == pytest.approx(1.0)


def test_llm_like_logits_match_transformers():
    rng = np.random.default_rng(7)
    logits = (rng.standard_normal(151936) * 2).astype(np.float32)
    logits[rng.choice(151936, 30, replace=False)] += rng.uniform(5, 15, 30).astype(np.float32)
    for top_k, top_p, min_p in FILTERS:
        sampler = Sampler(SamplingParams(top_k=top_k, top_p=top_p, min_p=min_p), len(logits))
        assert set(sampler.distribution(logits)[0].tolist()) == hf_survivors(logits, top_k, top_p, min_p)


def test_greedy_is_argmax_and_top_k_1_is_greedy():
    for seed in range(10):
        logits = random_logits(seed, 1000, 3.0)
        best = int(np.argmax(logits))
        assert Sampler(SamplingParams(temperature=0), 1000).sample(logits) == best
        top1 = Sampler(SamplingParams(temperature=1.5, top_k=1, top_p=1.0, min_p=0.0, seed=seed), 1000)
        assert all(top1.sample(logits) == best for _ in range(5))


def test_same_seed_same_tokens():
    logits = random_logits(1, 151936, 2.0)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=0.95, min_p=0.0, seed=1234)
    a, b = Sampler(params, len(logits)), Sampler(params, len(logits))
    seq_a = [a.sample(logits) for _ in range(50)]
    seq_b = [b.sample(logits) for _ in range(50)]
    assert seq_a == seq_b
    assert len(set(seq_a)) > 1  # it does sample
    a.reseed(1234)
    assert [a.sample(logits) for _ in range(50)] == seq_a


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_repetition_penalty_matches_transformers(penalty):
    torch = pytest.importorskip("torch")
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = random_logits(3, 500, 2.0)
    before = logits.copy()
    recent = [5, 7, 5, 499, 0, 123, 7, 42, 42, 300]
    for last_n in (len(recent), 4):
        sampler = Sampler(SamplingParams(repetition_penalty=penalty, repeat_last_n=last_n), 500)
        got = sampler.apply_repetition_penalty(logits, recent)
        ids = torch.tensor([recent[-last_n:]])
        expected = RepetitionPenaltyLogitsProcessor(penalty)(ids, torch.from_numpy(logits.copy())[None])[0]
        np.testing.assert_array_equal(got, expected.numpy())
    sampler.sample(logits, recent)
    np.testing.assert_array_equal(logits, before)  # the caller's logits are never touched


@pytest.mark.parametrize("frequency,presence", [(0.5, 0.0), (0.0, 1.5), (-0.7, 0.3), (2.0, -2.0)])
def test_frequency_and_presence_penalties_follow_openai(frequency, presence):
    """OpenAI's formula, token by token: mu[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty,
    over the last repeat_last_n tokens, after the repetition penalty (llama.cpp's order)."""
    logits = random_logits(4, 300, 2.0)
    recent = [5, 7, 5, 299, 0, 123, 7, 42, 42, 42]
    for last_n, rep in ((len(recent), 1.0), (4, 1.0), (6, 1.3)):
        sampler = Sampler(SamplingParams(repetition_penalty=rep, repeat_last_n=last_n, frequency_penalty=frequency,
                                         presence_penalty=presence), 300)
        got = sampler.apply_repetition_penalty(logits, recent)
        expected = logits.astype(np.float64)
        window = recent[-last_n:]
        for j in set(window):
            if rep != 1.0:
                expected[j] = expected[j] * rep if expected[j] < 0 else expected[j] / rep
            expected[j] -= window.count(j) * frequency + presence
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(InvalidInputError, match="frequency_penalty must be in"):
        SamplingParams(frequency_penalty=2.5)


def test_repetition_penalty_then_greedy():
    logits = np.array([1.0, 3.0, 2.9, -1.0], dtype=np.float32)
    sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=1.2, repeat_last_n=2), 4)
    assert sampler.sample(logits, [0, 1]) == 2  # 3.0 / 1.2 < 2.9
    assert sampler.sample(logits, [1, 0, 3]) == 1  # token 1 is outside the last 2


def chi_square(counts: np.ndarray, expected: np.ndarray) -> float:
    return float(((counts - expected) ** 2 / expected).sum())


def test_draws_follow_softmax_small_vocab():
    logits = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2], dtype=np.float32)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42), len(logits))
    n = 20000
    counts = np.bincount([sampler.sample(logits) for _ in range(n)], minlength=len(logits))
    assert chi_square(counts, probs * n) < 24.3  # chi-square, 7 degrees of freedom, p = 0.001


def test_draws_follow_softmax_large_vocab():
    """The two-level draw used for whole-vocabulary sampling, checked over 10 groups of ids."""
    logits = random_logits(5, 20000, 1.5)
    probs = np.exp(logits.astype(np.float64) - logits.max())
    probs /= probs.sum()
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=43), len(logits))
    n = 8000
    groups = np.arange(len(logits)) * 10 // len(logits)
    counts = np.bincount(groups[[sampler.sample(logits) for _ in range(n)]], minlength=10)
    expected = np.bincount(groups, weights=probs, minlength=10) * n
    assert chi_square(counts, expected) < 27.9  # 9 degrees of freedom, p = 0.001


def test_temperature_sharpens():
    logits = np.array([1.0, 0.0], dtype=np.float32)
    ids, probs = Sampler(SamplingParams(temperature=0.5, top_k=0, top_p=1.0, min_p=0.0), 2).distribution(logits)
    assert probs[list(ids).index(0)] == pytest.approx(1 / (1 + np.exp(-2.0)))


def test_bad_input():
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)
    sampler = Sampler(SamplingParams(), 10)
    with pytest.raises(ValueError, match="shape"):
        sampler.sample(np.zeros(11, np.float32))
    with pytest.raises(NonFiniteError, match="NaN"):
        sampler.sample(np.full(10, np.nan, np.float32))
    with pytest.raises(ValueError, match="recent token"):
        Sampler(SamplingParams(repetition_penalty=1.1), 10).sample(np.zeros(10, np.float32), [10])


# ---- the C++ fast path (csrc/runtime/sampler.cpp) against this module's numpy pipeline ----

class _FixedDraw:
    """Stands in for the generator: every draw is u."""

    def __init__(self, u: float):
        self.u = u

    def random(self) -> float:
        return self.u


def _numpy_pick(sampler: Sampler, logits: np.ndarray, u: float) -> int:
    ids, vals = sampler._candidates(logits, ())
    if len(vals) == 1:
        return int(ids[0])
    sampler.rng = _FixedDraw(u)
    return sampler._draw(ids, vals)


@pytest.mark.parametrize("vocab, k", [(100, 1), (100, 99), (5000, 40), (49152, 40), (151936, 40), (151936, 3000)])
def test_cpp_top_k_ids_are_the_k_largest(vocab, k):
    from pocketlm import _core

    x = random_logits(vocab + k, vocab, 3.0)
    if vocab >= 2 * k:
        x[::97] = np.nan  # never chosen
    got = np.asarray(_core.kernels.top_k_ids(x, k))
    finite = np.where(np.isnan(x), -np.inf, x)
    want = np.argsort(-finite, kind="stable")[:k]
    assert len(got) == k and len(set(got.tolist())) == k
    assert set(got.tolist()) == set(want.tolist())


@pytest.mark.parametrize("top_k, top_p, min_p", [f for f in FILTERS if f[0] > 0])
@pytest.mark.parametrize("vocab, scale", [(5000, 1.0), (5000, 4.0), (151936, 2.0)])
def test_cpp_sample_matches_numpy_pipeline(top_k, top_p, min_p, vocab, scale):
    """The same token as _candidates + _draw for the same uniform draw u, over a grid of u."""
    from pocketlm import _core

    logits = random_logits(vocab + 2 * int(scale), vocab, scale)
    for temperature in (0.7, 1.3):
        sampler = Sampler(SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p), vocab)
        for u in np.linspace(0.0, 0.999, 97):
            got = _core.kernels.sample_top_k(logits, top_k, temperature, top_p, min_p, float(u))
            assert got == _numpy_pick(sampler, logits, float(u)), (temperature, u)


def test_sample_takes_the_fast_path_and_rejects_nan():
    sampler = Sampler(SamplingParams(temperature=0.7, top_k=40, seed=1), 1000)
    logits = random_logits(3, 1000, 2.0)
    reference = Sampler(SamplingParams(temperature=0.7, top_k=40, seed=1), 1000)
    rng = np.random.default_rng(1)  # the draws the fast path makes
    for _ in range(50):
        assert sampler.sample(logits) == _numpy_pick(reference, logits, rng.random())
    bad = logits.copy()
    bad[10] = np.nan
    with pytest.raises(NonFiniteError, match="NaN"):
        sampler.sample(bad)
    bad[10] = np.inf
    with pytest.raises(NonFiniteError, match="infinity"):
        sampler.sample(bad)


# Every decoding path: greedy, greedy with a penalty, the C++ top-k path with and without a penalty,
# numpy's top_p / min_p thresholds, the plain softmax over the vocabulary.
PATHS = {
    "greedy": dict(temperature=0),
    "greedy+penalty": dict(temperature=0, repetition_penalty=1.3),
    "cpp-top-k": dict(temperature=0.8, top_k=40),
    "cpp-top-k+penalty": dict(temperature=0.8, top_k=40, repetition_penalty=1.3),
    "numpy-top-p": dict(temperature=0.8, top_k=0, top_p=0.9, min_p=0.0),
    "numpy-min-p": dict(temperature=0.8, top_k=0, top_p=1.0, min_p=0.1),
    "numpy-all": dict(temperature=0.8, top_k=0, top_p=1.0, min_p=0.0),
}


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("where", [0, 1234, 49151])
def test_nan_anywhere_is_refused_on_every_path(path, where):
    """A single NaN anywhere (not only at the maximum), +inf, or nothing but -inf: NonFiniteError,
    while the same logits without it give a token."""
    vocab = 49152
    logits = random_logits(9, vocab, 3.0)
    sampler = Sampler(SamplingParams(seed=3, **PATHS[path]), vocab)
    recent = [where, 7, 8]  # the penalty touches the NaN too
    assert 0 <= sampler.sample(logits, recent) < vocab
    for value in (np.nan, np.inf):
        bad = logits.copy()
        bad[where] = value
        with pytest.raises(NonFiniteError):
            sampler.sample(bad, recent)
    with pytest.raises(NonFiniteError):
        sampler.sample(np.full(vocab, -np.inf, np.float32), recent)
    low = logits.copy()
    low[where] = -np.inf  # a masked token is fine
    assert sampler.sample(low, recent) != where


def test_cpp_sampler_reports_non_finite_without_raising():
    from pocketlm import _core

    x = random_logits(10, 5000, 2.0)
    x[4321] = np.nan
    assert _core.kernels.sample_top_k(x, 40, 0.8, 0.95, 0.05, 0.5) == -1


@pytest.mark.parametrize("bad", [dict(temperature=float("nan")), dict(top_p=float("nan")), dict(min_p=float("nan")),
                                 dict(repetition_penalty=float("nan")), dict(top_k=4.5), dict(top_k="40"),
                                 dict(temperature="0.7"), dict(repeat_last_n=True), dict(top_k=-5)])
def test_sampling_params_refuse_non_numbers_and_nan(bad):
    from pocketlm.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="SamplingParams"):
        SamplingParams(**bad)


def test_values_below_float32_do_not_reach_the_sampler():
    """The C++ sampler works in float32: a temperature or top_p of 1e-300 became 0 there and failed
    ("needs temperature > 0", found by the server fuzzer). Now such a temperature samples as greedy
    does and such a top_p keeps the top token, both compared with the greedy argmax of the same
    logits; a penalty that would overflow is refused."""
    import numpy as np

    from pocketlm.errors import InvalidInputError
    from pocketlm.sampling import Sampler, SamplingParams

    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = rng.normal(size=97).astype(np.float32)
        for params in (SamplingParams(temperature=1e-300, seed=1), SamplingParams(temperature=0.8, top_p=1e-300, seed=1)):
            assert Sampler(params, 97).sample(logits) == int(np.argmax(logits))
    with pytest.raises(InvalidInputError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=1e-300)
