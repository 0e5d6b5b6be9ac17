"""Speculative decoding: cheap guesses of the next tokens, checked by the model in one step.

Decoding one token reads every weight of the model once; a step of k + 1 rows reads them once too
and costs little more while the CPU waits on memory. So a drafter guesses k tokens, the model runs
the last sampled token and the k guesses as one step of its scheduler (`Scheduler._step`, logits for
all k + 1 rows: `_core.run_batch(..., n_out)`), and `verify` keeps the guesses the model agrees
with, plus one token of its own: 1 to k + 1 tokens per step. The output is exactly plain decoding's:

- greedy (temperature 0): a guess is kept when it is the model's own argmax, so the tokens are
  those plain decoding gives, token for token;
- sampling: the standard rejection scheme (Leviathan et al. 2023, Chen et al. 2023) keeps guess d
  with probability min(1, p(d) / q(d)), p the model's distribution after the sampler's steps
  (penalty, temperature, top-k, top-p, min-p) and q the drafter's; at the first rejection it draws
  from the normalised max(0, p - q). Each token is then distributed as plain sampling draws it (the
  random stream differs, so the text does for one seed).

Drafters:
- `DraftModel`: a smaller model with the same tokenizer (`Engine(..., draft=MODEL)`). Its sessions
  follow the target's (one per target session, rewound and fed what the target accepted); the
  drafts of every sequence that speculates are made in shared steps of the draft model's program.
- `PromptLookup`: n-gram lookup in the tokens so far, no second model (`Engine(..., lookup=True)`):
  the continuation of the latest earlier occurrence of the last n tokens. Pays off where the output
  repeats the input (editing, summarising, rewriting code).

How many guesses: each sequence keeps a moving estimate alpha of how often its guesses are kept and
offers the k (at most `draft_max`) that maximises the expected tokens per unit of time (`best_k`:
k + 1 rows yield (1 - alpha^(k+1)) / (1 - alpha) tokens and cost 1 + cost * k model steps, cost = a
guess relative to a model step: the draft's size over the model's, 0 for lookup). A draft model also
stops guessing as soon as its own probability that all its guesses so far are kept falls below that
cost (a kept token saves one model step, a guess costs `cost` of one).
"""

from __future__ import annotations

import time
import weakref

import numpy as np

from pocketlm.errors import InvalidInputError
from pocketlm.sampling import Sampler

DEFAULT_DRAFT_MAX = 16


def best_k(alpha: float, cost: float, k_max: int) -> int:
    """The number of guesses that maximises expected tokens per unit of time: a step checking k guesses
    yields (1 - alpha^(k+1)) / (1 - alpha) tokens when each is kept with probability alpha, and costs
    1 + cost * k target steps (cost: one guess relative to one step of the model; 0 for lookup)."""
    alpha = min(max(alpha, 0.0), 0.999)
    best, best_rate = 1, 0.0
    for k in range(1, k_max + 1):
        rate = (1 - alpha ** (k + 1)) / (1 - alpha) / (1 + cost * k)
        if rate > best_rate + 1e-12:
            best, best_rate = k, rate
    return best


class CostModel:
    """What speculating costs, measured as the engine runs: the drafter's seconds per guess, and the
    seconds of a step of r rows (a moving average per row count, over steps made of decode and
    verification rows only). Verifying is nearly free while a step waits on memory and costs most of
    a step per row once it waits on arithmetic (Qwen2.5-Coder-1.5B Q4_K_M here: 67 ms for 2 rows,
    +22-26 ms per extra row), so the best number of guesses depends on the model and the machine.
    Row counts not seen yet are estimated from a line through those seen (from one alone: +10 % a
    row, the memory-bound case, which makes larger steps worth a try); with none, `prior` (a guess's
    cost relative to a step) stands in."""

    def __init__(self, prior: float):
        self.prior = prior
        self.guess_seconds = 0.0
        self.step_seconds: dict[int, float] = {}

    def step(self, rows: int, seconds: float) -> None:
        old = self.step_seconds.get(rows)
        self.step_seconds[rows] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def guessed(self, seconds: float) -> None:
        """A draft step of one guess per sequence took `seconds` (catch-up steps of whole prompts are
        not guesses and are not recorded)."""
        self.guess_seconds = seconds if self.guess_seconds == 0 else 0.8 * self.guess_seconds + 0.2 * seconds

    def _line(self) -> tuple[float, float] | None:
        """(intercept, slope >= 0) of a least-squares line through the row counts seen (two or more)."""
        b = self.step_seconds
        if len(b) < 2:
            return None
        known = sorted(b)
        n = len(known)
        mr, mt = sum(known) / n, sum(b[r] for r in known) / n
        slope = max(0.0, sum((r - mr) * (b[r] - mt) for r in known) / sum((r - mr) ** 2 for r in known))
        return mt - slope * mr, slope

    def seconds(self, rows: int) -> float | None:
        """A step of `rows` rows, from the line through the row counts seen (one noisy count does not
        decide alone); from a single one, +10 % a row; None before any measurement."""
        b = self.step_seconds
        if not b:
            return None
        line = self._line()
        if line is None:
            r0 = next(iter(b))
            return b[r0] * (1 + 0.1 * (rows - r0))
        return max(min(b.values()) * 0.5, line[0] + line[1] * rows)

    def best_k(self, alpha: float, k_max: int) -> int:
        """The number of guesses with the most expected tokens per second: (1 - alpha^(k+1)) /
        (1 - alpha) tokens for k guesses and a step of k + 1 rows."""
        if self.seconds(2) is None:
            return best_k(alpha, self.prior, k_max)
        alpha = min(max(alpha, 0.0), 0.999)
        rate = lambda k: (1 - alpha ** (k + 1)) / (1 - alpha) / (k * self.guess_seconds + self.seconds(k + 1))  # noqa: E731
        return max(range(1, k_max + 1), key=lambda k: (rate(k), -k))

    @property
    def cost(self) -> float:
        """A guess (its draft step and its row in the model's step) relative to what a kept token
        saves, a model step of one row."""
        two = self.seconds(2)
        if two is None:
            return self.prior
        extra = self.seconds(3) - two
        return min(3.0, max(0.0, (self.guess_seconds + extra) / max(two - extra, 1e-9)))


class Speculation:
    """One generation's speculative state (`Generation.spec`): its guesses, its estimate of how often
    a guess is kept (alpha), and the number of guesses k that `choose` sets from it before each step."""

    __slots__ = ("alpha", "draft_max", "drafts", "k", "q", "sampler")

    def __init__(self, draft_max: int):
        self.draft_max = draft_max
        self.alpha = 0.7                  # prior: kept guesses / offered, then a moving average
        self.k = 1
        self.drafts: list[int] = []       # guesses after the token being fed (gen.feed = [x0, *drafts])
        self.q: list[tuple[np.ndarray, np.ndarray] | None] = []  # drafter's (ids, probs) per guess; None: certain
        self.sampler: Sampler | None = None  # the drafter's own random stream (draft model, sampling)

    def adapt(self, kept: int, offered: int) -> None:
        """After a step that kept `kept` of `offered` guesses: a step that stops at the first miss
        tells alpha ~ kept / (kept + 1) (or kept / offered when none missed); moving average 0.3."""
        if offered == 0:
            return
        seen = kept / offered if kept == offered else kept / (kept + 1)
        self.alpha = 0.7 * self.alpha + 0.3 * seen

    def choose(self, costs: CostModel) -> None:
        """Sets k from the engine's measured costs (`CostModel.best_k`)."""
        self.k = costs.best_k(self.alpha, self.draft_max)


def _draw(probs: np.ndarray, u: float) -> int:
    """Index drawn from normalised `probs` by the uniform number u in [0, 1)."""
    return min(int(np.searchsorted(np.cumsum(probs), u, side="right")), len(probs) - 1)


def verify(gen, rows: np.ndarray, base: int) -> tuple[list[int], int]:
    """Checks gen.spec.drafts against the model's logits `rows` ([k + 1, vocab]: after the fed token
    x0, then after each guess); `base` is x0's position. Returns (tokens, kept): the guesses kept
    and then the model's own next token, and how many guesses were kept. Greedy keeps a guess that
    is the argmax; sampling follows the rejection scheme (module doc)."""
    spec, sampler = gen.spec, gen._sampler
    history = gen.session._tokens  # holds x0 and every guess (the step fed them)
    last_n = sampler.params.repeat_last_n
    out: list[int] = []
    greedy = sampler.params.temperature == 0
    for i in range(rows.shape[0]):
        end = base + i + 1  # tokens before row i's prediction: up to x0 and i guesses
        recent = history[max(0, end - last_n) if last_n else 0:end]
        if i == len(spec.drafts):  # every guess kept: the model's own token after them
            out.append(sampler.sample(rows[i], recent))
            return out, i
        d = spec.drafts[i]
        if greedy:
            t = sampler.sample(rows[i], recent)
            out.append(t)
            if t != d:
                return out, i
            continue
        ids, probs = sampler.distribution(rows[i], recent)
        p = dict(zip(ids.tolist(), probs.tolist()))
        q_ids, q_probs = spec.q[i] if spec.q[i] is not None else (np.array([d]), np.array([1.0]))
        q = dict(zip(q_ids.tolist(), q_probs.tolist()))
        pd, qd = p.get(d, 0.0), q.get(d, 0.0)
        if qd > 0 and sampler.rng.random() < min(1.0, pd / qd):
            out.append(d)
            continue
        # rejected: draw from max(0, p - q), renormalised (p itself if that is empty)
        cand = np.array(list(p), dtype=np.int64)
        resid = np.maximum(0.0, np.array([p[c] - q.get(c, 0.0) for c in p]))
        total = resid.sum()
        w = resid / total if total > 0 else np.array(list(p.values()))
        w = w / w.sum()
        out.append(int(cand[_draw(w, sampler.rng.random())]))
        return out, i
    raise AssertionError("verify: rows must be one more than the guesses")


class PromptLookup:
    """Guesses by n-gram lookup in the tokens so far (prompt and output): the tokens that followed
    the latest earlier occurrence of the last n tokens, for n from max_ngram down to min_ngram."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.costs = CostModel(prior=0.1)  # guesses are free; the rows they add to a step are not

    def propose(self, tokens: list[int], k: int) -> list[int]:
        n_tok = len(tokens)
        if k < 1 or n_tok < self.min_ngram + 1:
            return []
        arr = np.asarray(tokens, dtype=np.int64)
        last = arr[-1]
        # candidate ends: earlier positions holding the last token (not the last position itself)
        ends = np.flatnonzero(arr[:-1] == last)
        for n in range(min(self.max_ngram, n_tok - 1), self.min_ngram - 1, -1):
            key = arr[n_tok - n:]
            for e in ends[::-1]:  # latest first
                s = e - n + 1
                if s < 0 or not np.array_equal(arr[s:e + 1], key):
                    continue
                cont = arr[e + 1:e + 1 + k]
                if cont.size:
                    return cont.tolist()
        return []

    def draft(self, entries: list[tuple[object, list[int], int]]) -> None:
        """entries: (generation, tokens so far including x0, k): sets each generation's guesses."""
        for gen, tokens, k in entries:
            gen.spec.drafts = self.propose(tokens, k)
            gen.spec.q = [None] * len(gen.spec.drafts)


class DraftModel:
    """Guesses with a smaller model of the same tokenizer (an Engine), greedily or by sampling with
    the generation's parameters. Draft sessions follow the target sessions they serve."""

    def __init__(self, target, draft):
        check_compatible(target, draft)
        self.engine = draft
        self._sessions = {}  # id(target session) -> (weakref to it, draft session)
        # A guess costs one draft step; until measured, decode bound by the weights read puts that at
        # about the ratio of the two bundles' sizes (Qwen2.5-Coder 0.5B for 1.5B: 0.44).
        self.costs = CostModel(prior=min(1.0, draft.bundle.file_bytes / max(1, target.bundle.file_bytes)))

    def _session_for(self, target_session):
        key = id(target_session)
        entry = self._sessions.get(key)
        if entry is not None and entry[0]() is target_session:
            return entry[1]
        for k in [k for k, (ref, _) in self._sessions.items() if ref() is None]:
            del self._sessions[k]
        shifts = target_session.on_overflow == "shift" and self.engine.can_shift
        context = min(target_session.max_context, self.engine.max_context)
        ds = self.engine.create_session(max_context=context, on_overflow="shift" if shifts else "error",
                                        keep=min(target_session.keep, context - 1))
        self._sessions[key] = (weakref.ref(target_session), ds)
        return ds

    def draft(self, entries: list[tuple[object, list[int], int]]) -> None:
        """Runs the draft model's steps for every entry (generation, tokens so far including x0,
        k) together: first each draft session catches up with its tokens (rewinding past what the
        target rejected), then one row per sequence per guess."""
        from pocketlm import _core
        from pocketlm.generation import (
            reusable_prefix,  # (generation imports this module)
        )

        program = self.engine.compiled.program
        max_rows, max_seqs = int(program.max_tokens), int(program.max_seqs)
        cost = self.costs.cost
        work = []
        for gen, tokens, k in entries:
            ds = self._session_for(gen.session)
            limit = ds.max_context - 1
            if len(tokens) > limit:  # the draft's context is full: no guesses
                gen.spec.drafts, gen.spec.q = [], []
                continue
            evicted = gen.session._evicted
            if len(evicted) != len(ds._evicted):  # the target shifted: shift alike, or start over
                n = len(evicted) - len(ds._evicted)
                if n > 0 and ds.on_overflow == "shift" and ds.keep == gen.session.keep \
                        and ds.position >= ds.keep + n and ds._evicted + ds._tokens[ds.keep:ds.keep + n] == evicted:
                    ds._shift(n)
                else:
                    ds._reset()
            common = reusable_prefix(ds._tokens, tokens)
            if common < len(ds._tokens):
                ds._rewind(common)
            k = min(k, limit - len(tokens) + 1)
            gen.spec.drafts, gen.spec.q = [], []
            if gen.spec.sampler is None and gen._sampler.params.temperature > 0:
                gen.spec.sampler = Sampler(gen._sampler.params, vocab_size=self.engine.vocab_size)
                gen.spec.sampler.reseed(None if gen._sampler.params.seed is None else gen._sampler.params.seed + 1)
            work.append([gen, ds, ds._feed_after(np.asarray(tokens[common:], dtype=np.int32)), k, 1.0])
        # catch up (prompt chunks), then one guess per step
        while work:
            step, rows = [], 0
            for w in work:
                if len(step) == max_seqs or rows == max_rows:
                    break
                n = min(int(w[2].size), max_rows - rows)
                step.append((w, n))
                rows += n
            t_step = time.perf_counter()
            out = _core.run_batch(program, [(w[1]._state, w[2][:n], w[1].kv_cache.valid) for w, n in step])
            if all(n <= 2 for _, n in step):  # a guessing step (not a prompt's catch-up)
                self.costs.guessed(time.perf_counter() - t_step)
            still = []
            for i, (w, n) in enumerate(step):
                gen, ds = w[0], w[1]
                ds._advance(w[2][:n], ds.kv_cache.valid)
                w[2] = w[2][n:]
                if w[2].size:
                    still.append(w)
                    continue
                t, q, p = self._guess(gen, out[i], ds._tokens)
                gen.spec.drafts.append(t)
                gen.spec.q.append(q)
                w[4] *= p  # the draft's own odds that every guess so far is kept
                # Another guess is worth its cost only while those odds exceed it (one kept token saves
                # one model step; a guess costs `cost` of one).
                if len(gen.spec.drafts) < w[3] and w[4] > cost:
                    w[2] = np.array([t], dtype=np.int32)
                    still.append(w)
            still_ids = {id(w) for w in still}
            work = [w for w in work if id(w) in still_ids]

    def _guess(self, gen, logits: np.ndarray, history: list[int]) -> tuple[int, tuple | None, float]:
        """(guess, the drafter's (ids, probs) when sampling, the draft's probability of the guess)."""
        sampler = gen._sampler
        last_n = sampler.params.repeat_last_n
        recent = history[-last_n:] if last_n else history
        if sampler.params.temperature == 0:
            x = sampler.apply_repetition_penalty(np.asarray(logits, dtype=np.float32), recent).astype(np.float64)
            best = int(np.argmax(x))
            return best, None, float(1.0 / np.exp(x - x[best]).sum())
        s = gen.spec.sampler
        ids, probs = s.distribution(logits, recent)
        j = _draw(probs, s.rng.random())
        return int(ids[j]), (ids, probs), float(probs[j])


def check_compatible(target, draft) -> None:
    """Refuses a draft model whose tokenizer differs from the target's (the guesses are token ids)."""
    ta, tb = target.tokenizer, draft.tokenizer
    va, vb = ta.vocab(), tb.vocab()
    if va != vb or set(ta.eos_ids) != set(tb.eos_ids):
        diff = len(set(va.items()) ^ set(vb.items()))
        raise InvalidInputError(
            f"the draft model {draft.path.name} does not share the target's tokenizer ({len(vb)} vs {len(va)} "
            f"tokens, {diff} differing entries{', other EOS tokens' if set(ta.eos_ids) != set(tb.eos_ids) else ''}): "
            f"speculative decoding needs the same token ids in both models")
