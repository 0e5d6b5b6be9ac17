"""Session: one conversation's state (KV cache, position, token history) over a shared Engine.

Explicit steps (`prefill`, `decode`) under a high-level `generate`, which is a
generator yielding text pieces as tokens arrive. A session remembers the tokens
it has processed; a new prompt that starts with them reuses the cached prefix
(multi-turn chat re-renders the whole conversation but only prefills the new turn).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from pocketlm.errors import ContextOverflowError
from pocketlm.sampling import Sampler, SamplingParams
from pocketlm.tokenizer import StreamDecoder


@dataclass
class GenerationStats:
    prompt_tokens: int = 0          # tokens prefilled for this request (after prefix reuse)
    reused_tokens: int = 0          # prompt tokens served from the session's cache
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    ttft_seconds: float = 0.0       # request start -> first generated token
    finish_reason: str = ""         # "stop" (EOS or stop string), "length", "context"

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        # the first token comes out of prefill; the rest from decode steps
        n = max(self.generated_tokens - 1, 0)
        return n / self.decode_seconds if self.decode_seconds > 0 else 0.0


class Session:
    def __init__(self, engine, max_context: int, logits: str = "last"):
        from pocketlm import _core

        self.engine = engine
        self.max_context = int(max_context)
        compiled = engine.compiled_for(logits)
        self.logits_mode = logits
        self._chunk = compiled.plan.max_tokens
        self._state = _core.State(compiled.program, self.max_context, engine.kv_type)
        self._tokens: list[int] = []
        self._last_logits: np.ndarray | None = None
        self.last_stats = GenerationStats()

    # ---- low level ---------------------------------------------------------
    @property
    def position(self) -> int:
        """Number of tokens in the KV cache (the position of the next token)."""
        return len(self._tokens)

    @property
    def tokens(self) -> list[int]:
        return list(self._tokens)

    def reset(self) -> None:
        self._tokens.clear()
        self._last_logits = None

    def rewind(self, position: int) -> None:
        """Forget every token at or after `position` (their cache entries are overwritten later)."""
        if not 0 <= position <= len(self._tokens):
            raise ValueError(f"cannot rewind to {position}: session holds {len(self._tokens)} tokens")
        del self._tokens[position:]
        self._last_logits = None

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        """Feeds tokens (in chunks of the engine's prefill size); returns the last position's logits."""
        ids = self._checked(token_ids, "prefill")
        logits = self._run(ids, keep_all=False)
        self._last_logits = logits[-1]
        return self._last_logits

    def _checked(self, token_ids: Sequence[int], what: str) -> np.ndarray:
        """token_ids as int32, after checking they are valid ids and fit in the context."""
        ids = np.asarray(list(token_ids), dtype=np.int32)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"{what} needs a non-empty sequence of token ids")
        vocab = self.engine.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab})")
        if self.position + ids.size > self.max_context:
            raise ContextOverflowError(
                f"{ids.size} tokens at position {self.position} exceed the context of {self.max_context} "
                f"tokens; shorten the prompt, reset the session or raise max_context")
        return ids

    def _run(self, ids: np.ndarray, keep_all: bool) -> np.ndarray:
        chunk = self._chunk
        parts = []
        for s in range(0, ids.size, chunk):
            part = ids[s:s + chunk]
            out = self._state.run(part, self.position)
            self._tokens.extend(int(t) for t in part)
            parts.append(out if keep_all else out[-1:])
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    @property
    def chunk_tokens(self) -> int:
        """Tokens per executor call (the prefill chunk the session's program was planned for)."""
        return self._chunk

    def forward(self, token_ids: Sequence[int]) -> np.ndarray:
        """Feeds tokens and returns their logits as a float32 [n, vocab] array: one row per
        token for a session made with logits="all" (evaluation, KL divergence); only the last
        row ([1, vocab]) otherwise. Call it with at most `chunk_tokens` ids to bound memory."""
        ids = self._checked(token_ids, "forward")
        logits = self._run(ids, keep_all=self.logits_mode == "all")
        self._last_logits = logits[-1]
        return logits

    def score(self, token_ids: Sequence[int]) -> np.ndarray:
        """Feeds `token_ids` and returns log P(token_i | everything before it) for each, as
        float64. The first value is NaN when the session held no tokens before (nothing
        predicts it). Needs a session made with `engine.create_session(logits="all")`."""
        if self.logits_mode != "all":
            raise ValueError('score() needs a session created with logits="all"')
        ids = self._checked(token_ids, "score")
        prev = self._last_logits
        logits = self._run(ids, keep_all=True).astype(np.float64)
        self._last_logits = logits[-1].astype(np.float32)
        m = logits.max(axis=1, keepdims=True)
        logprobs = logits - m - np.log(np.exp(logits - m).sum(axis=1, keepdims=True))
        out = np.full(ids.size, np.nan)
        out[1:] = logprobs[np.arange(ids.size - 1), ids[1:]]
        if prev is not None:
            p = prev.astype(np.float64)
            out[0] = p[ids[0]] - p.max() - np.log(np.exp(p - p.max()).sum())
        return out

    def decode(self, token_id: int) -> np.ndarray:
        """Feeds one token; returns the logits for the next position."""
        return self.prefill([token_id])

    # ---- high level --------------------------------------------------------
    def _sampling(self, kwargs: dict) -> SamplingParams:
        d = {**self.engine.generation_defaults}
        names = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
        params = {k: d[k] for k in names if d.get(k) is not None}
        params.update({k: v for k, v in kwargs.items() if v is not None})
        return SamplingParams(**params)

    def generate(self, prompt: str | Sequence[int], max_tokens: int | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 min_p: float | None = None, repetition_penalty: float | None = None,
                 seed: int | None = None, stop: Sequence[str] = (), add_special_tokens: bool = True
                 ) -> Iterator[str]:
        """Streams the continuation of `prompt` (text or token ids) as text pieces.

        Continues this session: tokens already in the cache that the prompt starts
        with are reused. Stops at an EOS token, a stop string (not included), after
        max_tokens, or when the context is full. Stats land in `last_stats`.
        """
        t0 = time.perf_counter()
        tok = self.engine.tokenizer
        if isinstance(prompt, str):
            ids = tok.encode(prompt, add_special_tokens=add_special_tokens and self.position == 0)
        else:
            ids = [int(t) for t in prompt]
        params = self._sampling(dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                     repetition_penalty=repetition_penalty, seed=seed))
        if max_tokens is None:
            max_tokens = int(self.engine.generation_defaults.get("max_tokens") or 512)
        stats = GenerationStats()
        self.last_stats = stats

        # Prefix reuse: keep the cached tokens the new prompt starts with.
        history = self._tokens
        if ids[:len(history)] == history and len(ids) > len(history):
            new = ids[len(history):]
            stats.reused_tokens = len(history)
        else:
            common = 0
            for a, b in zip(history, ids):
                if a != b:
                    break
                common += 1
            common = min(common, len(ids) - 1)  # at least one token to prefill for fresh logits
            self.rewind(common)
            new = ids[common:]
            stats.reused_tokens = common
        if not new:
            raise ValueError("empty prompt")
        if self.position + len(new) > self.max_context:
            raise ContextOverflowError(
                f"the prompt needs {self.position + len(new)} tokens of context but the session has "
                f"{self.max_context}; shorten it or raise max_context")
        logits = self.prefill(new)
        stats.prompt_tokens = len(new)
        stats.prefill_seconds = time.perf_counter() - t0

        sampler = Sampler(params, vocab_size=self.engine.vocab_size)
        stream = StreamDecoder(tok, skip_special_tokens=True)
        eos = set(tok.eos_ids)
        stops = [s for s in stop if s]
        pending = ""
        hit_stop = False
        t_dec = time.perf_counter()
        stats.finish_reason = "length"
        while stats.generated_tokens < max_tokens:
            recent = self._tokens[-params.repeat_last_n:] if params.repeat_last_n else self._tokens
            token = sampler.sample(logits, recent)
            stats.generated_tokens += 1
            if stats.generated_tokens == 1:
                stats.ttft_seconds = time.perf_counter() - t0
                t_dec = time.perf_counter()
            if token in eos:
                stats.finish_reason = "stop"
                break
            pending += stream.push(token)
            emit, hit_stop = _split_stop(pending, stops) if stops else (pending, False)
            if emit:
                yield emit
            pending = pending[len(emit):]
            if hit_stop:
                stats.finish_reason = "stop"
                break
            if stats.generated_tokens >= max_tokens:
                break  # the last token is not fed back: a follow-up prompt prefills it if needed
            if self.position >= self.max_context:
                stats.finish_reason = "context"
                break
            logits = self.decode(token)
        stats.decode_seconds = time.perf_counter() - t_dec
        if not hit_stop:
            tail, _ = _split_stop(pending + stream.flush(), stops, final=True)
            if tail:
                yield tail

    def chat(self, messages: list[dict], **kwargs) -> Iterator[str]:
        """Renders the chat template over `messages` and streams the assistant's reply."""
        text = self.engine.apply_chat_template(messages, add_generation_prompt=True)
        # The template writes BOS itself where the model wants one (as HF's apply_chat_template).
        ids = self.engine.tokenizer.encode(text, add_special_tokens=False)
        yield from self.generate(ids, **kwargs)


def _split_stop(text: str, stops: list[str], final: bool = False) -> tuple[str, bool]:
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
