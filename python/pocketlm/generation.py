"""One generation request as a state machine: prompt in, text pieces out, one token at a time.

A `Generation` knows nothing about how its model is run. `prepare` checks the request and works out
what the session must be fed (after reusing the prefix it already holds); then, each time its
driver has run those tokens, `on_logits` samples the next token, streams its text and says what to
feed next, until it is done. Two drivers run it: the engine's scheduler, which batches the rows of
many generations into one executor step (`pocketlm.scheduler`), and `Session.generate` on a session
whose program the scheduler does not run (logits="all"), one executor call at a time.
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Sequence

import numpy as np

from pocketlm.errors import ContextOverflowError, InvalidInputError
from pocketlm.sampling import Sampler, SamplingParams
from pocketlm.speculative import Speculation
from pocketlm.tokenizer import StreamDecoder

SAMPLING_NAMES = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "frequency_penalty",
                  "presence_penalty", "seed")


class Generation:
    """The continuation of one prompt on one session. Not thread-safe: one driver runs it."""

    def __init__(self, session, prompt: str | Sequence[int], max_tokens: int | None = None,
                 stop: str | Sequence[str] = (), add_special_tokens: bool = True, constraint=None,
                 logprobs: int | None = None, **sampling):
        from pocketlm.session import GenerationStats

        self.t_start = time.perf_counter()
        self.session = session
        engine = session.engine
        if getattr(engine, "is_encoder", False):
            raise InvalidInputError(f"{engine.path.name} is an embedding model (an encoder): it gives embeddings "
                                    "(Engine.embed, /v1/embeddings), not text")
        unknown = set(sampling) - set(SAMPLING_NAMES)
        if unknown:
            raise InvalidInputError(f"unknown sampling parameter {min(unknown)!r}; known: "
                                    f"{', '.join(SAMPLING_NAMES)}")
        self.ids = self._prompt_ids(prompt, add_special_tokens)
        defaults = engine.generation_defaults
        params = {k: defaults[k] for k in SAMPLING_NAMES if defaults.get(k) is not None}
        given = {k: v for k, v in sampling.items() if v is not None}
        params.update(given)
        greedy_penalty = defaults.get("greedy_repetition_penalty")
        if params.get("temperature") == 0 and "repetition_penalty" not in given and greedy_penalty is not None:
            # pocketlm's own default penalty is for sampling: greedy decoding stays the model's
            # argmax (a checkpoint's own penalty has no such entry and applies, as in transformers).
            params["repetition_penalty"] = greedy_penalty
        self.params = SamplingParams(**params)
        if max_tokens is None:
            max_tokens = int(defaults.get("max_tokens") or 512)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, numbers.Integral) or max_tokens < 0:
            raise InvalidInputError(f"max_tokens must be an integer >= 0, got {max_tokens!r}")
        self.max_tokens = int(max_tokens)
        if not stop:
            stop = engine.default_stop  # a store package's PARAMETER stop, when the request names none
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        if not all(isinstance(s, str) for s in stops):
            raise InvalidInputError(f"stop must be a string or a list of strings, got {stop!r}")
        self.stops = [s for s in stops if s]
        self.stats = GenerationStats(finish_reason="length")
        self.token_ids: list[int] = []   # generated so far (EOS excluded)
        self.feed: np.ndarray | None = None  # tokens the session must run next (from session.cached_tokens)
        self.unfed: int | None = None  # once done: the last sampled token, if not EOS (never fed back)
        self.done = self.max_tokens == 0
        tok = engine.tokenizer
        self._sampler = Sampler(self.params, vocab_size=engine.vocab_size)
        self._stream = StreamDecoder(tok, skip_special_tokens=True)
        self._eos = set(tok.eos_ids)
        self._pending = ""   # text held back: it may still grow into a stop string
        self._t_decode = 0.0
        spec = getattr(engine, "speculator", None)
        self.constraint = constraint  # pocketlm.constrain.Constraint: masks the logits, takes each token
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, numbers.Integral)
                                     or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
            raise InvalidInputError(f"logprobs must be an integer in 0..{MAX_TOP_LOGPROBS} (the alternatives "
                                    f"to report per token) or None, got {logprobs!r}")
        self.top_logprobs = None if logprobs is None else int(logprobs)
        # One entry per generated token (EOS excluded), when asked for: (token, its log-probability,
        # [(id, log-probability) of the top_logprobs most likely]), from the model's own distribution
        # (the raw logits, before penalties, temperature and constraints).
        self.logprobs: list[tuple[int, float, list[tuple[int, float]]]] = []
        self.spec = Speculation(engine.draft_max) if (spec is not None and session.logits_mode == "last"
                                                      and constraint is None and logprobs is None) else None

    def _prompt_ids(self, prompt, add_special_tokens: bool) -> list[int]:
        session = self.session
        tok = session.engine.tokenizer
        if isinstance(prompt, str):
            ids = tok.encode(prompt, add_special_tokens=add_special_tokens and session.position == 0)
            if not ids and add_special_tokens and tok.bos_id is not None:
                ids = [tok.bos_id]  # nothing but the start of a text (as llama.cpp and transformers)
            if not ids:
                raise InvalidInputError("empty prompt: the text gives no token and the model has no BOS "
                                        "token to start from")
            return ids
        ids = list(prompt)
        if not ids:
            raise InvalidInputError("empty prompt: no token ids to start from")
        return session._token_array(ids, "generate").tolist()

    def start(self) -> None:
        """Reuses the cached prefix the prompt starts with (rewinding the session to it) and sets
        `feed` to what the session must run before the first token is sampled. Raises
        ContextOverflowError when the prompt does not fit; the session is then unchanged."""
        session = self.session
        if self.done:
            return
        ids = self.ids
        cache = getattr(session.engine, "prefix_cache", None)
        self._from_empty = not session._tokens
        if cache is not None and self._from_empty:  # an empty session: another's prompt may start alike
            cache.adopt(session, ids)
        history = session._tokens
        common, at, forget = session._reusable(ids)
        new = ids[at:]
        k, limit = session.keep, session.max_context
        if common + len(new) > limit and session.on_overflow != "shift":
            raise ContextOverflowError(
                f"the prompt needs {common + len(new)} tokens of context but the session has "
                f"{limit}; shorten it or raise max_context")
        if common + len(new) > limit and min(common, k) + len(new) > limit:
            # Even a shift of everything after the kept tokens leaves no room: the prompt's middle
            # never enters the cache, as if a shift had evicted it (the last half of the room is fed).
            # (ids that continue the cached tokens follow the tokens evicted before.)
            before = session._evicted if session._evicted and not forget and at == common else []
            common = min(common, k)
            tail = max(1, (limit - k) // 2)
            session._rewind(common)
            session._evicted[:] = before + ids[k:len(ids) - tail]
            new = ids[common:k] + ids[len(ids) - tail:]
        else:
            if common < len(history):
                session._rewind(common)
            if forget:
                session._evicted.clear()
            session._make_room(len(new), "prompt tokens")  # a shifting session evicts its oldest if need be
        self.stats.reused_tokens = session.cached_tokens  # a rewind past a sliding window's ring replays the rest
        self.stats.prompt_tokens = session.position - session.cached_tokens + len(new)
        self.feed = session._feed_after(np.asarray(new, dtype=np.int32))

    def on_logits(self, logits: np.ndarray) -> list[str]:
        """The logits after the last token fed: samples the next token. Returns the text pieces it
        completes (possibly none) and sets `feed` to [token], or `done` with the finish reason."""
        session = self.session
        recent = session._tokens[-self.params.repeat_last_n:] if self.params.repeat_last_n else session._tokens
        raw = logits
        if self.stats.generated_tokens == 0:  # the prompt is in: keep it for sessions that start alike
            cache = getattr(session.engine, "prefix_cache", None)
            if cache is not None and self.stats.prompt_tokens and getattr(self, "_from_empty", False) \
                    and not session._evicted:  # (a shifted cache's KV saw tokens its entry would not name)
                cache.insert(session)  # (a conversation going on in its own session is not copied each turn)
        if self.constraint is not None:
            logits = self.constraint.apply(logits)
        token = self._sampler.sample(logits, recent)
        if self.top_logprobs is not None and token not in self._eos:
            self.logprobs.append(log_probabilities(raw, token, self.top_logprobs))
        return self._emit([token], session.position)

    @property
    def n_out(self) -> int:
        """Logits rows the next step must return: 1, or the fed token and each guess (speculation)."""
        return 1 + len(self.spec.drafts) if self.spec is not None else 1

    def on_verify(self, rows: np.ndarray, base: int) -> list[str]:
        """The logits after the fed token x0 (at position `base`) and after each of the guesses fed
        with it (`spec.drafts`): keeps the guesses the model agrees with and its own next token
        (`pocketlm.speculative.verify`), then goes on as `on_logits`."""
        from pocketlm.speculative import verify

        spec, stats = self.spec, self.stats
        offered = len(spec.drafts)
        tokens, kept = verify(self, rows, base)
        spec.adapt(kept, offered)
        stats.draft_tokens += offered
        stats.accepted_tokens += kept
        spec.drafts, spec.q = [], []
        self.session._rewind(base + 1 + kept)  # the rejected guesses leave the cache
        return self._emit(tokens, base + 1)

    def _emit(self, tokens: list[int], position: int) -> list[str]:
        """Takes sampled tokens in order, as plain decoding takes each: EOS, stop strings, max_tokens
        and the context end each finish it. `position`: the session position before the first of them
        would be fed. The session keeps every token but the last taken (which `feed` holds, unless done)."""
        stats, session = self.stats, self.session
        pieces: list[str] = []
        for j, token in enumerate(tokens):
            now = time.perf_counter()
            if stats.generated_tokens == 0:
                stats.prefill_seconds = now - self.t_start
            stats.generated_tokens += 1
            if stats.generated_tokens == 1:
                stats.ttft_seconds = now - self.t_start
                self._t_decode = now
            self.feed = None
            done = None
            if token in self._eos:
                done = self._finish("stop", pieces)
            else:
                if self.constraint is not None:
                    self.constraint.accept(token)
                self.token_ids.append(token)
                self._pending += self._stream.push(token)
                emit, hit_stop = split_stop(self._pending, self.stops) if self.stops else (self._pending, False)
                if emit:
                    pieces.append(emit)
                self._pending = self._pending[len(emit):]
                if hit_stop:
                    self._pending = ""
                    done = self._finish("stop", pieces, flush=False)
                elif self.constraint is not None and self.constraint.finished:
                    done = self._finish("stop", pieces)  # the grammar is complete
                elif stats.generated_tokens >= self.max_tokens:
                    done = self._finish("length", pieces)  # the last token is not fed back
                elif position + j >= session.max_context and session.on_overflow != "shift":
                    done = self._finish("context", pieces)
            if done is not None:
                if session.position > position + j:  # kept guesses past this one were fed: not any more
                    session._rewind(position + j)
                self.unfed = None if token in self._eos else token
                return done
        session._make_room(1)  # a full context shifts (or the check above has finished)
        # (after a rewind or shift that emptied a ring's cache, the kept tokens are fed first)
        self.feed = session._feed_after(np.array([tokens[-1]], dtype=np.int32))
        return pieces

    def cancel(self, reason: str = "cancelled") -> None:
        if not self.done:
            self.stats.finish_reason = reason
            self._close_stats()
            self.done = True
            self.feed = None

    def _finish(self, reason: str, pieces: list[str], flush: bool = True) -> list[str]:
        self.stats.finish_reason = reason
        if flush:
            tail, _ = split_stop(self._pending + self._stream.flush(), self.stops, final=True)
            if tail:
                pieces.append(tail)
        self._close_stats()
        self.done = True
        return pieces

    def _close_stats(self) -> None:
        if self.stats.generated_tokens:
            self.stats.decode_seconds = time.perf_counter() - self._t_decode


MAX_TOP_LOGPROBS = 20  # as OpenAI's top_logprobs


def log_probabilities(logits: np.ndarray, token: int, top: int) -> tuple[int, float, list[tuple[int, float]]]:
    """(token, log p(token), the `top` most likely ids with theirs, most likely first) under softmax(logits)."""
    x = np.asarray(logits, dtype=np.float32)
    m = float(x.max())
    log_z = m + float(np.log(np.exp(x - m, dtype=np.float32).sum(dtype=np.float64)))
    best: list[tuple[int, float]] = []
    if top:
        ids = np.argpartition(-x, top - 1)[:top] if top < x.size else np.arange(x.size)
        ids = ids[np.argsort(-x[ids], kind="stable")]
        best = [(int(i), float(x[i]) - log_z) for i in ids]
    return int(token), float(x[token]) - log_z, best


def reusable_prefix(history: list[int], ids: list[int]) -> int:
    """How many leading tokens of `ids` a cache holding `history` already has, leaving at least one
    of `ids` to feed (its logits are the next token's)."""
    if ids[:len(history)] == history and len(ids) > len(history):
        return len(history)
    common = 0
    for a, b in zip(history, ids):
        if a != b:
            break
        common += 1
    return min(common, len(ids) - 1)


def split_stop(text: str, stops: list[str], final: bool = False) -> tuple[str, bool]:
    """(text safe to emit, whether a stop string was found). Holds back a tail that could
    still grow into a stop string unless `final`."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        return text[:cut], True
    if final:
        return text, False
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return text[:len(text) - hold], False
