"""Choosing the next token from the logits.

Pipeline, in this order (each step only narrows the candidates):
  repetition penalty -> top_k -> top_p -> min_p -> temperature -> softmax -> draw.

The penalty and the three filters follow transformers' RepetitionPenaltyLogitsProcessor, TopKLogitsWarper,
TopPLogitsWarper and MinPLogitsWarper; top_p and min_p are judged at temperature 1, and temperature only
reshapes the distribution over the survivors. temperature == 0 is greedy.

Speed: with temperature > 0 and top_k on (the defaults), `Sampler.sample` runs the whole pipeline in
one C++ call (csrc/runtime/sampler.cpp, same steps and arithmetic); this module stays the reference
(`distribution`) and serves the other settings. The vocabulary (up to ~150k) is never sorted. Top-k candidates come from a lower bound on the k-th
largest logit (the k-th largest of >= k block maxima) and a partition of the few logits above it. Without
top_k, top_p and min_p both become a logit threshold; top_p's is found from a histogram of the logits (see
`_top_p_cut`). Only small sets are ever sorted, and vocabulary-sized scratch arrays are allocated once.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pocketlm.errors import InvalidInputError, NonFiniteError


TINY = 1e-30  # the smallest temperature / top_p the float32 sampler gets (float32 normals reach 1.2e-38)
MIN_PENALTY = 1e-6  # logits divided by less overflow float32


@dataclass
class SamplingParams:
    temperature: float = 0.7  # 0 = greedy
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1.0 = off
    min_p: float = 0.05  # 0.0 = off; relative to the most likely token's probability
    repetition_penalty: float = 1.0  # 1.0 = off
    repeat_last_n: int = 64  # how many recent tokens the penalties look at; 0 = off, -1 = all given
    frequency_penalty: float = 0.0  # subtracted from a logit once per occurrence among them; 0 = off
    presence_penalty: float = 0.0  # subtracted once from the logit of each token among them; 0 = off
    seed: int | None = None  # same seed -> same tokens

    def __post_init__(self):
        def is_int(v) -> bool:
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)

        def is_number(v) -> bool:
            return isinstance(v, numbers.Real) and not isinstance(v, bool)

        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
            if not is_number(getattr(self, name)):
                raise InvalidInputError(f"SamplingParams: {name} must be a number, got {getattr(self, name)!r}")
        for name in ("top_k", "repeat_last_n"):
            if not is_int(getattr(self, name)):
                raise InvalidInputError(f"SamplingParams: {name} must be an integer, got {getattr(self, name)!r}")
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),  # NaN fails every comparison
            (self.top_k >= 0, "top_k must be >= 0 (0 turns it off)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.repeat_last_n >= -1, "repeat_last_n must be >= -1"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2] (0 = off)"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2] (0 = off)"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidInputError(f"SamplingParams: {message}")
        # The sampler works in float32: what underflows there must not reach it as 0 (a temperature
        # of 1e-300 made a request fail with "needs temperature > 0": the server fuzzer's finding).
        if self.temperature < TINY:
            self.temperature = 0.0  # as good as greedy: the top token's weight dwarfs every other
        self.top_p = max(self.top_p, TINY)  # a nucleus that small keeps the top token, as TINY does
        if self.repetition_penalty < MIN_PENALTY:
            raise InvalidInputError(f"SamplingParams: repetition_penalty must be >= {MIN_PENALTY}, got "
                                    f"{self.repetition_penalty!r}")
        if self.seed is not None:
            if not is_int(self.seed):
                raise InvalidInputError(f"SamplingParams: seed must be an integer, got {self.seed!r}")
            # llama.cpp's -1 is "a random seed"; other negative seeds are as good as any (mod 2^64)
            self.seed = None if self.seed == -1 else int(self.seed) % (1 << 64)


class Sampler:
    """Draws token ids from logits of one vocabulary size; holds the random generator between calls."""

    def __init__(self, params: SamplingParams, vocab_size: int):
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self.params = params
        self.vocab_size = int(vocab_size)
        self.rng = np.random.default_rng(params.seed)
        self._work = _Workspace(self.vocab_size)

    def reseed(self, seed: int | None) -> None:
        self.rng = np.random.default_rng(seed)

    # -- the pipeline --

    def sample(self, logits: np.ndarray, recent_tokens: Sequence[int] = ()) -> int:
        """One token id from `logits` (float32 [vocab_size]); `recent_tokens` feed the repetition penalty.
        The caller's array is never modified. NaN anywhere in the logits, or a largest logit of +-inf,
        raises NonFiniteError, on every path."""
        p = self.params
        if p.temperature > 0 and 0 < p.top_k < self.vocab_size and _fast_top_k() is not None:
            # The usual settings: the whole pipeline in one C++ call (csrc/runtime/sampler.cpp), the
            # same steps and arithmetic as _candidates + _draw below.
            x = np.asarray(logits, dtype=np.float32)
            if x.shape != (self.vocab_size,):
                raise ValueError(f"logits must have shape ({self.vocab_size},), got {x.shape}")
            x = np.ascontiguousarray(self.apply_repetition_penalty(x, recent_tokens))
            token = int(_fast_top_k()(x, p.top_k, p.temperature, p.top_p, p.min_p, self.rng.random()))
            if token < 0:  # the C++ scan saw NaN, or the top logit is infinite
                raise _non_finite(x)
            return token
        ids, vals = self._candidates(logits, recent_tokens)
        if len(vals) == 1:
            return int(ids[0]) if ids is not None else 0
        return self._draw(ids, vals)

    def distribution(self, logits: np.ndarray, recent_tokens: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """(ids, probabilities) that `sample` draws from, ids in no particular order. For inspection and tests."""
        ids, vals = self._candidates(logits, recent_tokens)
        if ids is None:
            ids = np.arange(self.vocab_size)
        t = self.params.temperature or 1.0  # greedy: a single candidate anyway
        weights = np.exp((vals.astype(np.float64) - float(vals.max())) / t)
        return ids, weights / weights.sum()

    def _candidates(self, logits: np.ndarray, recent_tokens: Sequence[int]) -> tuple[np.ndarray | None, np.ndarray]:
        """The surviving ids (None = the whole vocabulary) and their penalized logits."""
        p = self.params
        x = np.asarray(logits, dtype=np.float32)
        if x.shape != (self.vocab_size,):
            raise ValueError(f"logits must have shape ({self.vocab_size},), got {x.shape}")
        x = self.apply_repetition_penalty(x, recent_tokens)
        if p.temperature == 0:
            best = int(np.argmax(x))  # the first NaN if there is one: checking the winner checks all
            if not math.isfinite(x.item(best)):
                raise _non_finite(x)
            return np.array([best]), x[best:best + 1]
        top = float(x.max())  # NaN if any is
        if not math.isfinite(top):
            raise _non_finite(x)

        if 0 < p.top_k < self.vocab_size:
            ids = _top_k_ids(x, p.top_k)
            ids, vals = _sorted_desc(ids, x[ids])
            ids, vals = _top_p_prefix(ids, vals, _logsumexp(vals), p.top_p)
        elif p.top_p < 1 or p.min_p > 0:
            # Both keep the logits above a threshold; only the survivors are gathered.
            cut = _top_p_cut(x, top, p.top_p, self._work) if p.top_p < 1 else -math.inf
            if p.min_p > 0:
                cut = max(cut, top + math.log(p.min_p))
            ids = np.flatnonzero(x >= cut)
            return ids, x[ids]
        else:
            return None, x

        if p.min_p > 0:
            keep = vals >= vals.max() + math.log(p.min_p)
            ids, vals = ids[keep], vals[keep]
        return ids, vals

    def apply_repetition_penalty(self, x: np.ndarray, recent_tokens: Sequence[int]) -> np.ndarray:
        """The penalties over the last `repeat_last_n` of `recent_tokens`, as llama.cpp's sampler applies
        them: first the repetition penalty (HF semantics: each distinct token's logit is divided by it
        if positive and multiplied by it if negative), then OpenAI's frequency and presence penalties
        (minus count x frequency_penalty, minus presence_penalty once). Returns `x` itself when there is
        nothing to do, a penalized copy otherwise."""
        p = self.params
        penalty, last_n = p.repetition_penalty, p.repeat_last_n
        if (penalty == 1.0 and p.frequency_penalty == 0 and p.presence_penalty == 0) or last_n == 0 \
                or len(recent_tokens) == 0:
            return x
        if last_n > 0:
            try:
                recent_tokens = recent_tokens[-last_n:]
            except TypeError:  # e.g. a deque
                recent_tokens = list(recent_tokens)[-last_n:]
        ids, counts = np.unique(np.asarray(recent_tokens, dtype=np.int64), return_counts=True)
        if ids[0] < 0 or ids[-1] >= self.vocab_size:
            raise ValueError(f"recent token ids must be in [0, {self.vocab_size}), got {ids[0]}..{ids[-1]}")
        x = x.copy()
        seen = x[ids]
        if penalty != 1.0:
            seen = np.where(seen < 0, seen * penalty, seen / penalty)
        if p.frequency_penalty != 0 or p.presence_penalty != 0:
            seen = seen - (counts * p.frequency_penalty + p.presence_penalty).astype(np.float32)
        x[ids] = seen
        return x

    def _draw(self, ids: np.ndarray | None, vals: np.ndarray) -> int:
        """Draw from softmax(vals / temperature); ids=None means vals is the whole vocabulary."""
        weights = np.exp((vals - vals.max()) / np.float32(self.params.temperature))
        u = self.rng.random()
        if len(weights) <= _DRAW_BLOCK:
            cumulative = np.cumsum(weights, dtype=np.float64)
            pick = min(int(np.searchsorted(cumulative, u * cumulative[-1], side="right")), len(weights) - 1)
        else:
            # Two-level inverse CDF: block sums, then within one block (a float64 cumsum over 150k is slow).
            n_full = len(weights) // _DRAW_BLOCK * _DRAW_BLOCK
            sums = weights[:n_full].reshape(-1, _DRAW_BLOCK).sum(axis=1, dtype=np.float64)
            sums = np.concatenate([sums, [weights[n_full:].sum(dtype=np.float64)]])
            block_cum = np.cumsum(sums)
            target = u * block_cum[-1]
            b = min(int(np.searchsorted(block_cum, target, side="right")), len(sums) - 1)
            while sums[b] == 0:  # rounding put us on an empty block
                b -= 1
            inside = np.cumsum(weights[b * _DRAW_BLOCK:(b + 1) * _DRAW_BLOCK], dtype=np.float64)
            rest = target - (block_cum[b - 1] if b > 0 else 0.0)
            pick = b * _DRAW_BLOCK + min(int(np.searchsorted(inside, rest, side="right")), len(inside) - 1)
        return pick if ids is None else int(ids[pick])


_DRAW_BLOCK = 512


def _non_finite(x: np.ndarray) -> NonFiniteError:
    """The error for logits holding NaN or an infinite maximum (only built on failure)."""
    n_nan = int(np.isnan(x).sum())
    what = f"{n_nan} NaN of {x.size}" if n_nan else f"a largest value of {float(np.max(x))}"
    return NonFiniteError(f"the model's logits hold {what} (NaN or infinity): no token can be chosen; "
                          f"its weights or metadata are broken")


def _fast_top_k():
    """pocketlm._core's sample_top_k, or None where the extension is not built (the converter and
    these numpy paths work without it)."""
    global _FAST
    if _FAST is False:
        try:
            from pocketlm import _core
            _FAST = _core.kernels.sample_top_k
        except ImportError:
            _FAST = None
    return _FAST


_FAST = False

# -- filters on sorted candidates --------------------------------------------------------------------------------

def _logsumexp(vals: np.ndarray) -> float:
    top = float(vals.max())
    return top + math.log(float(np.exp(vals.astype(np.float64) - top).sum()))


def _sorted_desc(ids: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-vals, kind="stable")
    return ids[order], vals[order]


def _top_p_prefix(ids: np.ndarray, vals: np.ndarray, log_z: float, top_p: float):
    """Keep the most likely tokens while the probability mass before each is < top_p (at least one).
    `vals` are sorted descending; `log_z` normalizes them (it may cover tokens outside `vals`)."""
    if top_p >= 1:
        return ids, vals
    probs = np.exp(vals.astype(np.float64) - log_z)
    mass_before = np.cumsum(probs) - probs
    keep = max(1, int(np.count_nonzero(mass_before < top_p)))
    return ids[:keep], vals[:keep]


# -- candidate search without sorting the vocabulary --------------------------------------------------------------

def _top_k_ids(x: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest logits, in no particular order.

    Cut x into >= k blocks: the k-th largest block maximum is <= the k-th largest logit (k different blocks
    reach it), so every top-k logit is at or above it, and few others are. Partition only those.
    """
    n = x.shape[0]
    n_blocks = min(n, 8 * k)
    block = n // n_blocks
    maxima = np.concatenate([x[:n_blocks * block].reshape(n_blocks, block).max(axis=1), x[n_blocks * block:]])
    bound = np.partition(maxima, len(maxima) - k)[len(maxima) - k]
    cands = np.flatnonzero(x >= bound)
    if len(cands) > k:
        cands = cands[np.argpartition(x[cands], len(cands) - k)[len(cands) - k:]]
    return cands


_GAP_RANGE = 32.0  # logits further below the top weigh < e^-32 each; they share the last bin
_N_BINS = 8192
_BIN_WIDTH = _GAP_RANGE / _N_BINS
_BIN_MAX_WEIGHT = np.exp(-np.arange(_N_BINS) * _BIN_WIDTH)  # weight e^(x - top) at each bin's upper edge
_BIN_MIN_WEIGHT = np.append(_BIN_MAX_WEIGHT[1:], 0.0)  # ... and lower edge (the last bin reaches 0)


class _Workspace:
    """Vocabulary-sized scratch arrays, allocated once per Sampler rather than on every token."""

    def __init__(self, n: int):
        self.weights = np.empty(n, np.float32)
        self.gap = np.empty(n, np.float32)
        self.bins = np.empty(n, np.int32)
        self.mask = np.empty(n, np.float32)


def _top_p_cut(x: np.ndarray, top: float, top_p: float, work: _Workspace) -> float:
    """top_p over the whole vocabulary without sorting it: the lowest logit that survives.

    Bin the logits by their distance below the top. From the bin counts and each bin's weight range, the
    cumulative mass is bracketed well enough to pin the cut to a narrow band of bins; only the band's tokens
    are sorted.
    """
    weights, gap, bins = work.weights, work.gap, work.bins
    np.subtract(x, np.float32(top), out=weights)
    np.exp(weights, out=weights)  # in [0, 1]
    total = float(weights.sum(dtype=np.float64))
    target = top_p * total
    np.subtract(np.float32(top), x, out=gap)
    np.minimum(gap, np.float32(_GAP_RANGE), out=gap)
    gap *= np.float32(1 / _BIN_WIDTH)
    np.copyto(bins, gap, casting="unsafe")  # truncation = floor, gaps are >= 0
    np.minimum(bins, _N_BINS - 1, out=bins)
    counts = np.bincount(bins, minlength=_N_BINS)
    # Bounds on the mass up to and including each bin, from above and below. Summing from the head is
    # precise when the cut is early, from the tail (total minus what follows) when top_p is close to 1.
    head_hi, head_lo = np.cumsum(counts * _BIN_MAX_WEIGHT), np.cumsum(counts * _BIN_MIN_WEIGHT)
    mass_hi = np.minimum(head_hi, total - (head_lo[-1] - head_lo))
    mass_lo = np.maximum(head_lo, total - (head_hi[-1] - head_hi))
    # The cut is in the first bin whose mass reaches the target; a bin of slack covers float32 rounding.
    first = max(int(np.searchsorted(mass_hi, target)) - 1, 0)
    last = min(int(np.searchsorted(mass_lo, target)) + 1, _N_BINS - 1)

    # A token is kept while the mass from it downwards exceeds 1 - top_p (the mass above it is < top_p).
    # Summed from the bottom, like transformers does, this stays exact as top_p nears 1.
    np.greater(bins, last, out=work.mask)
    mass_after_band = float(np.dot(weights, work.mask))
    band = np.flatnonzero((bins >= first) & (bins <= last))
    band_vals = np.sort(x[band])  # ascending
    mass_from = mass_after_band + np.cumsum(np.exp(band_vals.astype(np.float64) - top))
    kept = band_vals[mass_from > (1 - top_p) * total]
    if len(kept):
        return float(kept[0])
    # Nothing in the band survives: the cut is the lowest logit of the bins before it (or the top itself).
    return float(x[bins < first].min()) if first > 0 else top
