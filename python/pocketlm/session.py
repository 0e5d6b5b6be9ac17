"""Session: one conversation's state (KV cache, position, token history) over a shared Engine.

Explicit steps (`prefill`, `decode`) under a high-level `generate`, which is a
generator yielding text pieces as tokens arrive. A session remembers the tokens
it has processed; a new prompt that starts with them reuses the cached prefix
(multi-turn chat re-renders the whole conversation but only prefills the new turn).

A session that fills its context either refuses more (on_overflow="error", ContextOverflowError) or
shifts (on_overflow="shift"): the first `keep` tokens stay (attention sinks, a system prompt), the
oldest after them leave the cache and the rest move down, their keys re-rotated to their new
positions (StreamingLLM's scheme; `_core.State.kv_shift`), so it goes on in bounded memory. The
tokens it evicted are remembered (`history`), so a re-rendered conversation still finds its place.

A session is used by one thread at a time: every call that changes its state
holds a lock (a `generate` for as long as its generator runs), and a second
caller gets ConcurrentUseError instead of silently interleaved tokens. Sessions of
one engine share its thread pool and workspace: a session costs its KV cache, and
sessions driven from several threads take turns step by step.
"""

from __future__ import annotations

import numbers
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from pocketlm.errors import (
    ConcurrentUseError,
    ContextOverflowError,
    InvalidInputError,
    NonFiniteError,
    UnsupportedModelError,
)
from pocketlm.generation import Generation
from pocketlm.kv_cache import KVCache


@dataclass
class GenerationStats:
    prompt_tokens: int = 0          # tokens prefilled for this request (after prefix reuse)
    reused_tokens: int = 0          # prompt tokens served from the session's cache
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    ttft_seconds: float = 0.0       # request start -> first generated token
    finish_reason: str = ""         # "stop" (EOS or stop string), "length", "context", "cancelled", "error"
    draft_tokens: int = 0           # speculative decoding: guesses offered to the model
    accepted_tokens: int = 0        # ... and kept

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        # the first token comes out of prefill; the rest from decode steps
        n = max(self.generated_tokens - 1, 0)
        return n / self.decode_seconds if self.decode_seconds > 0 else 0.0


class Session:
    def __init__(self, engine, max_context: int, logits: str = "last", on_overflow: str = "error",
                 keep: int = 4, discard: int | None = None):
        from pocketlm import _core

        if isinstance(max_context, bool) or not isinstance(max_context, numbers.Integral):
            raise InvalidInputError(f"max_context must be an integer, got {max_context!r}")
        if max_context < 1:
            raise InvalidInputError(f"max_context must be at least 1, got {max_context}")
        if max_context > engine.max_context:
            raise ContextOverflowError(
                f"a session's max_context of {max_context} exceeds the engine's max_context of "
                f"{engine.max_context}; load the engine with a larger max_context (at most the model's "
                f"trained context)")
        if on_overflow not in ("error", "shift"):
            raise InvalidInputError(f'on_overflow must be "error" or "shift", got {on_overflow!r}')
        for name, value, low in (("keep", keep, 0), ("discard", discard, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                                      or value < low):
                raise InvalidInputError(f"{name} must be an integer >= {low}, got {value!r}")
        if keep is None or (on_overflow == "shift" and keep >= max_context):
            raise InvalidInputError(f"keep ({keep}) must be below the session's max_context ({max_context}): "
                                    "a shift needs room after the kept tokens")
        self.engine = engine
        self.max_context = int(max_context)
        compiled = engine.compiled_for(logits)
        why = compiled.program.shift_unsupported
        if on_overflow == "shift" and why:
            raise UnsupportedModelError(f"on_overflow='shift' is not possible with {engine.path.name}: {why}")
        self._shift_unsupported = why  # why this program's cache cannot shift ("" when it can)
        self.on_overflow = on_overflow
        self.keep = int(keep)          # tokens a shift never evicts
        self.discard = None if discard is None else int(discard)  # tokens a shift evicts (None: half)
        self._evicted: list[int] = []  # tokens shifts evicted, in order: they stood at index `keep`
        self.logits_mode = logits
        self._chunk = compiled.program.max_tokens  # rows per executor call
        self._state = _core.State(compiled.program, self.max_context, engine.kv_type)
        self.kv_cache = KVCache(self._state, compiled.program.layer_windows, self.max_context)
        self._tokens: list[int] = []
        self._last_logits: np.ndarray | None = None
        self.last_stats = GenerationStats()
        self._last_generation = None  # the Generation of the last generate(): last_text_ids
        self._busy = threading.Lock()
        self._busy_with = ""

    # ---- one user at a time ------------------------------------------------
    def _enter(self, what: str) -> None:
        if not self._busy.acquire(blocking=False):
            raise ConcurrentUseError(
                f"Session.{what}() was called while {self._busy_with or 'another call'} is running on this "
                f"session (in another thread, or an unfinished generator): give each thread its own session "
                f"(engine.create_session()), and finish or close() a generator before the next call")
        self._busy_with = f"{what}()"

    def _leave(self) -> None:
        self._busy_with = ""
        self._busy.release()

    # ---- low level ---------------------------------------------------------
    @property
    def position(self) -> int:
        """Number of tokens the session holds (the position of the next token)."""
        return len(self._tokens)

    @property
    def cached_tokens(self) -> int:
        """Leading tokens whose keys and values are in the KV cache. Equal to `position` except
        after a rewind past what a sliding-window ring still holds: the next call then feeds the
        rest again first."""
        return self.kv_cache.valid

    @property
    def tokens(self) -> list[int]:
        """The tokens the KV cache holds, in order (the model sees these): after a shift, the kept
        ones then the most recent."""
        return list(self._tokens)

    @property
    def history(self) -> list[int]:
        """Every token of the conversation, the ones shifts evicted included (`tokens` without a shift)."""
        k = self.keep
        return self._tokens[:k] + self._evicted + self._tokens[k:] if self._evicted else list(self._tokens)

    @property
    def evicted_tokens(self) -> int:
        """How many tokens context shifts have evicted from this conversation."""
        return len(self._evicted)

    @property
    def kv_bytes(self) -> int:
        """Bytes of KV cache the session's tokens occupy: per layer min(position, capacity) x 2 (K and
        V) x n_kv_heads x head_dim x element size (2 for f16, 4 for f32), a sliding-window ring holding
        at most its capacity. Tokens a rewind left to replay count (the next call writes them again).

        `kv_reserved_bytes` is the reservation for max_context, far larger for a short conversation.
        Resident memory lies between the two: the reservation's pages are committed as positions are
        first written, and stay committed after a rewind or reset until the session is dropped."""
        return self.kv_cache.used_bytes(len(self._tokens))

    @property
    def kv_reserved_bytes(self) -> int:
        """Bytes of address space reserved for the KV cache: every layer's capacity (max_context, or
        a sliding window's ring) x 2 x n_kv_heads x head_dim x element size."""
        return self.kv_cache.reserved_bytes

    def clone(self) -> Session:
        """An independent session on the same engine with the same tokens and KV cache: a fork of the
        conversation. Each then continues on its own (a prefill, decode, rewind or generate on one
        never changes the other), answering as a fresh session fed its tokens would.

        Costs a new executor state, as `engine.create_session()` does: its own KV cache reservation
        (the thread pool, arena and scratch are the engine's, shared by its sessions); then a copy
        of the KV entries written since the cache was last rebuilt (about `kv_bytes`, more after a
        rewind the rings still hold): slots never written are not touched, so the clone's cache
        commits only the pages its tokens use.
        Sampling takes no state from the original: pass a seed to each generate() for reproducible
        forks. Raises ConcurrentUseError while the session is busy (a generator still running)."""
        self._enter("clone")
        try:
            twin = Session(self.engine, self.max_context, logits=self.logits_mode, on_overflow=self.on_overflow,
                           keep=self.keep, discard=self.discard)
            twin.kv_cache.copy_from(self.kv_cache)
            twin._tokens = list(self._tokens)
            twin._evicted = list(self._evicted)
            twin._last_logits = None if self._last_logits is None else self._last_logits.copy()
            return twin
        finally:
            self._leave()

    @property
    def unfed_tokens(self) -> list[int]:
        """The token of the last generate() the session has not run: its last sampled token, unless that
        was EOS (a generation that stops at max_tokens or a stop string never feeds it back). Prefill it
        to continue after the generated text; [] when there is none."""
        gen = self._last_generation
        return [] if gen is None or gen.unfed is None else [gen.unfed]

    @property
    def last_text_ids(self) -> list[int]:
        """The token ids of the last generate()'s whole text: its prompt and what it generated (EOS
        excluded). The session holds all but the last generated token (it was never fed back);
        prefill what is missing to continue after it."""
        gen = self._last_generation
        return [] if gen is None else list(gen.ids) + list(gen.token_ids)

    def save(self, path, extra: dict | None = None) -> None:
        """Writes the session (its tokens and KV cache, as stored) to `path`, atomically: a later
        `engine.load_session(path)` continues it exactly, without running the model again
        (pocketlm.session_file; docs/format.md). extra: a JSON-able dict saved with it, given back
        as the loaded session's `saved_extra`."""
        from pocketlm import session_file

        if self.logits_mode != "last":
            raise ValueError('only sessions made with logits="last" (generation) are saved')
        self._enter("save")
        try:
            session_file.save(self, path, extra)
        finally:
            self._leave()

    def reset(self) -> None:
        self._enter("reset")
        try:
            self._reset()
        finally:
            self._leave()

    def _reset(self) -> None:
        self._tokens.clear()
        self._evicted.clear()
        self._last_logits = None
        self.kv_cache.clear()

    def rewind(self, position: int) -> None:
        """Forget every token at or after `position`.

        Within what every sliding-window ring still holds this only truncates (the cache entries
        are overwritten later); past it, the kept tokens are fed again from position 0 on the next
        call, so the session always answers as a fresh one fed the same tokens would."""
        self._enter("rewind")
        try:
            self._rewind(position)
        finally:
            self._leave()

    def _rewind(self, position: int) -> None:
        if isinstance(position, bool) or not isinstance(position, numbers.Integral) \
                or not 0 <= position <= len(self._tokens):
            raise InvalidInputError(f"cannot rewind to {position!r}: session holds {len(self._tokens)} tokens")
        position = int(position)
        self.kv_cache.trim(position)  # past what a ring holds: empties it, the kept tokens are fed again
        del self._tokens[position:]
        if position < self.keep or position == 0:
            self._evicted.clear()  # what was evicted followed tokens that are gone now
        self._last_logits = None

    # ---- context shift -----------------------------------------------------
    def shift(self, n: int) -> None:
        """Evicts the n oldest tokens after the first `keep`: the rest move down, so n more fit. The
        cached keys move to their new positions (re-rotated), nothing runs the model again. A
        session with on_overflow="shift" calls this itself when its context is full."""
        self._enter("shift")
        try:
            if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= self.position - self.keep:
                raise InvalidInputError(f"cannot shift {n!r} tokens: the session holds {self.position - self.keep} "
                                        f"after the {self.keep} it keeps")
            if self._shift_unsupported:
                raise UnsupportedModelError(f"cannot shift {self.engine.path.name}'s KV cache: "
                                            f"{self._shift_unsupported}")
            self._shift(int(n))
        finally:
            self._leave()

    def _shift(self, n: int) -> None:
        k, kv = self.keep, self.kv_cache
        if kv.valid >= k + n:
            kv.shift(k, n)
        else:  # a rewind left some of them out of the cache: they are fed again, after the shift
            kv.trim(min(kv.valid, k))
        self._evicted.extend(self._tokens[k:k + n])
        del self._tokens[k:k + n]

    def _make_room(self, n_new: int, what: str = "tokens") -> None:
        """Shifts, if the session shifts, so that n_new more tokens fit; ContextOverflowError if they
        cannot (more than the context holds after the kept tokens), the session unchanged."""
        need = self.position + n_new - self.max_context
        if need <= 0:
            return
        room = self.position - self.keep  # tokens a shift may evict
        if self.on_overflow != "shift" or need > room:
            after = f" after the {self.keep} it keeps" if self.on_overflow == "shift" else ""
            raise ContextOverflowError(
                f"{n_new} {what} at position {self.position} exceed the context of {self.max_context} "
                f"tokens{after}; shorten the prompt, reset the session or raise max_context")
        n = min(max(need, self.discard if self.discard is not None else room // 2), room)  # llama.cpp evicts half
        # A sliding window must not reach down into the kept tokens after the shift: its ring no longer
        # holds them. Evict less where that is enough (else the cache is fed again, KVCache.shift).
        windows = [w for _, w in self.kv_cache.rings]
        if windows:
            n = max(need, min(n, self.position - max(windows) + 1 - self.keep))
        self._shift(n)

    def _reusable(self, ids: list[int]) -> tuple[int, int, bool]:
        """How a prompt `ids` continues this session: (cached tokens to keep, tokens of `ids` they
        stand for, whether the evicted tokens are dropped from the history). `ids` may continue the
        tokens the cache holds, or the whole history (a re-rendered conversation after a shift)."""
        from pocketlm.generation import reusable_prefix

        tokens = self._tokens
        if not self._evicted or ids[:len(tokens)] == tokens or tokens[:len(ids)] == ids:
            c = reusable_prefix(tokens, ids)  # ids continue (or are a prefix of) the cached tokens
            return c, c, False
        k, e = self.keep, len(self._evicted)
        c = reusable_prefix(self.history, ids)
        if c >= k + e:  # past the evicted ones: the cache holds the rest
            return c - e, c, False
        return min(c, k), min(c, k), True  # it parts before them: only kept tokens can stay

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        """Feeds tokens (in chunks of the engine's prefill size); returns the last position's logits."""
        self._enter("prefill")
        try:
            return self._prefill(token_ids)
        finally:
            self._leave()

    def _prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        ids = self._checked(token_ids, "prefill")
        logits = self._run(ids, keep_all=False)
        self._last_logits = logits[-1]
        return self._last_logits

    def _checked(self, token_ids: Sequence[int], what: str) -> np.ndarray:
        """token_ids as int32, after checking they are valid ids and fit in the context."""
        ids = self._token_array(token_ids, what)
        self._make_room(ids.size)
        return ids

    def _token_array(self, token_ids: Sequence[int], what: str) -> np.ndarray:
        """token_ids as a 1-D int32 array of ids in the vocabulary (one array made: decode's path)."""
        ids = list(token_ids)
        try:
            if all(type(t) is int for t in ids):
                arr = np.asarray(ids, dtype=np.int32)  # OverflowError beyond int32
            else:  # numpy integers, or something that is not an id at all
                arr = np.asarray(ids)
                if arr.dtype.kind not in "iu" or arr.ndim != 1:
                    raise InvalidInputError(f"{what} needs token ids as integers, got {arr.dtype} values")
        except (TypeError, ValueError, OverflowError) as e:
            raise InvalidInputError(f"{what} needs a sequence of token ids: {e}") from None
        if arr.size == 0:
            raise InvalidInputError(f"{what} needs a non-empty sequence of token ids")
        vocab = self.engine.vocab_size
        if arr.min() < 0 or arr.max() >= vocab:
            raise InvalidInputError(f"token ids must be in [0, {vocab})")
        return arr if arr.dtype == np.int32 else arr.astype(np.int32)

    def _run(self, ids: np.ndarray, keep_all: bool) -> np.ndarray:
        """Runs `ids` after the session's tokens; returns their logits (every row if keep_all, else
        the last). Tokens a rewind left out of the cache are fed first (their logits dropped)."""
        return self._run_feed(self._feed_after(ids), ids.size, keep_all)

    def _run_feed(self, ids: np.ndarray, n_new: int, keep_all: bool) -> np.ndarray:
        """Runs `ids` from the cached position in chunks; returns the logits of its last n_new rows
        (keep_all) or of its last row."""
        chunk, start = self._chunk, self.kv_cache.valid
        first_new = ids.size - n_new
        parts = []
        out = None
        for s in range(0, ids.size, chunk):
            part = ids[s:s + chunk]
            out = self._state.run(part, start + s)
            self._advance(part, start + s)
            if keep_all and s + part.size > first_new:
                parts.append(out[max(0, first_new - s):])
        if not keep_all:
            return out[-1:]
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _feed_after(self, ids: np.ndarray) -> np.ndarray:
        """What the next call must run, from the cached position, to add `ids`: the tokens a rewind
        left out of the cache, then `ids`."""
        valid = self.kv_cache.valid
        if valid < len(self._tokens):
            return np.concatenate([np.asarray(self._tokens[valid:], dtype=np.int32), ids])
        return ids

    def _advance(self, part: np.ndarray, pos: int) -> None:
        """Records that `part` ran at positions pos.. (the cached position): its keys and values are
        cached, and tokens past the history join it (a replayed part is in the history already)."""
        self.kv_cache.append(part.size, pos)
        end = pos + part.size
        if end > len(self._tokens):
            have = len(self._tokens) - pos
            self._tokens.extend(int(t) for t in (part[have:] if have > 0 else part))

    @property
    def chunk_tokens(self) -> int:
        """Tokens per executor call (the prefill chunk the session's program was planned for)."""
        return self._chunk

    def forward(self, token_ids: Sequence[int]) -> np.ndarray:
        """Feeds tokens and returns their logits as a float32 [n, vocab] array: one row per
        token for a session made with logits="all" (evaluation, KL divergence); only the last
        row ([1, vocab]) otherwise. Call it with at most `chunk_tokens` ids to bound memory.
        The logits are returned as computed, NaN included (score() and sampling refuse them)."""
        self._enter("forward")
        try:
            ids = self._checked(token_ids, "forward")
            logits = self._run(ids, keep_all=self.logits_mode != "last")
            self._last_logits = logits[-1]
            return logits
        finally:
            self._leave()

    def score(self, token_ids: Sequence[int]) -> np.ndarray:
        """Feeds `token_ids` and returns log P(token_i | everything before it) for each, as
        float64. The first value is NaN when the session held no tokens before (nothing
        predicts it). Needs a session made with `engine.create_session(logits="all")`.
        Raises NonFiniteError if the model's logits hold NaN or infinity."""
        if self.logits_mode != "all":
            raise ValueError('score() needs a session created with logits="all"')
        self._enter("score")
        try:
            ids = self._checked(token_ids, "score")
            prev = self._last_logits
            logits = self._run(ids, keep_all=True).astype(np.float64)
            self._last_logits = logits[-1].astype(np.float32)
            m = logits.max(axis=1, keepdims=True)  # NaN in a row makes its max NaN
            if not np.isfinite(m).all() or (prev is not None and not np.isfinite(prev.max())):
                raise NonFiniteError(f"the model's logits hold NaN or infinity (scoring {ids.size} tokens at "
                                     f"position {self.position - ids.size}): its weights or metadata are broken")
            logprobs = logits - m - np.log(np.exp(logits - m).sum(axis=1, keepdims=True))
            out = np.full(ids.size, np.nan)
            out[1:] = logprobs[np.arange(ids.size - 1), ids[1:]]
            if prev is not None:
                p = prev.astype(np.float64)
                out[0] = p[ids[0]] - p.max() - np.log(np.exp(p - p.max()).sum())
            return out
        finally:
            self._leave()

    def decode(self, token_id: int) -> np.ndarray:
        """Feeds one token; returns the logits for the next position."""
        return self.prefill([token_id])

    # ---- high level --------------------------------------------------------
    def generate(self, prompt: str | Sequence[int], max_tokens: int | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 min_p: float | None = None, repetition_penalty: float | None = None,
                 frequency_penalty: float | None = None, presence_penalty: float | None = None,
                 seed: int | None = None, stop: str | Sequence[str] = (), add_special_tokens: bool = True,
                 response_format: dict | None = None, regex: str | None = None, grammar: str | None = None
                 ) -> Iterator[str]:
        """Streams the continuation of `prompt` (text or token ids) as text pieces.

        Continues this session: tokens already in the cache that the prompt starts
        with are reused. Stops at an EOS token, a stop string (not included; a str is one
        stop string), after max_tokens (0: nothing is done), or when the context is full.
        An empty text prompt starts from BOS where the model has one. Stats land in
        `last_stats`. The session is busy until the generator ends or is closed.

        Constrained decoding (`pocketlm.constrain`, needs llguidance): response_format (OpenAI's:
        {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}}), regex, or
        grammar (Lark or GBNF): the output always matches it; it ends when the grammar is complete.

        Runs on the engine's scheduler: generations of other sessions running at the same time
        (from other threads, or `engine.submit`) share its executor steps, each row at its own
        position in its own cache, so they decode together at the cost of about one. Closing the
        generator early cancels the rest.
        """
        from pocketlm.constrain import make_constraint

        if self.logits_mode == "hidden":
            raise ValueError('a session made with logits="hidden" computes hidden states (embeddings); '
                             "it cannot generate")
        constraint = make_constraint(self.engine, response_format, regex, grammar)
        self._enter("generate")
        try:
            gen = Generation(self, prompt, max_tokens=max_tokens, stop=stop, add_special_tokens=add_special_tokens,
                             constraint=constraint,
                             temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                             repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                             presence_penalty=presence_penalty, seed=seed)
            self.last_stats = gen.stats
            self._last_generation = gen
            if self.logits_mode == "all":  # a program the scheduler does not run: one call at a time
                yield from self._drive(gen)
                return
            scheduler = self.engine.scheduler
            request = scheduler.submit(gen, attach=True)  # this thread consumes it (and runs its steps)
            try:
                yield from request
            finally:
                request.cancel()
                request.wait()
                scheduler._attach(request, -1)
        finally:
            self._leave()

    def _drive(self, gen: Generation) -> Iterator[str]:
        """Runs a generation on this thread, one executor call per chunk or token."""
        gen.start()
        try:
            while not gen.done:
                logits = self._run_feed(gen.feed, 1, keep_all=False)[-1]
                self._last_logits = logits
                yield from gen.on_logits(logits)
        finally:
            gen.cancel()

    def chat(self, messages: list[dict], **kwargs) -> Iterator[str]:
        """Renders the chat template over `messages` and streams the assistant's reply."""
        text = self.engine.apply_chat_template(messages, add_generation_prompt=True)
        # The template writes BOS itself where the model wants one (as HF's apply_chat_template).
        ids = self.engine.tokenizer.encode(text, add_special_tokens=False)
        if self._evicted and self._reusable(ids)[2]:
            # The tokens of the conversation so far part from the history before the last evicted one
            # (a reply re-tokenizes differently, a template trims it): continue its text instead.
            ids = self._text_continuation(text) or ids
        yield from self.generate(ids, **kwargs)

    def _text_continuation(self, text: str) -> list[int] | None:
        """The session's tokens followed by the tokens of what `text` adds to the text of its history
        (as llama.cpp's interactive chat adds each turn), or None if `text` does not extend it."""
        tok = self.engine.tokenizer
        seen = tok.decode(self.history, skip_special_tokens=False)
        if len(text) <= len(seen) or not text.startswith(seen):
            return None
        return self._tokens + tok.encode(text[len(seen):], add_special_tokens=False)

