"""The engine's shared prefix cache: sessions reuse the KV of prompt prefixes other sessions computed.

After a generation has prefilled its prompt, the cache keeps a copy of the prompt's KV (an executor
State of its own, whose pages are committed only for the positions copied). A generation that starts
on an empty session looks for the entry sharing the longest prefix with its prompt and, if that is
at least MIN_REUSE tokens, copies the KV of those positions into its session and prefills only the
rest (`stats.reused_tokens` counts them). The keys and values of positions [0, k) depend on tokens
[0, k) only, so any entry whose tokens start with the same k tokens serves, whatever came after.

Entries are evicted least recently used first while their KV bytes exceed the budget
(`Engine(prefix_cache_mb=...)`, 0 turns the cache off). An entry is read only by copying from it
(State.copy_kv_from holds both States' locks), so an eviction while a copy runs frees its State only
when the copy is done. Models with sliding-window layers do not use the cache: a ring that wrapped
no longer holds the early positions a shorter prefix needs.
"""

from __future__ import annotations

import collections
import threading

import numpy as np

MIN_REUSE = 32     # shorter shared prefixes are cheaper to prefill than to look up and copy
MIN_ENTRY = 64     # prompts shorter than this are not kept


class PrefixCache:
    def __init__(self, budget_bytes: int):
        self.budget = int(budget_bytes)
        self._lock = threading.Lock()
        # key -> (tokens, State, KV bytes, max_context): sessions of another max_context cannot copy from it
        self._entries: collections.OrderedDict[int, tuple] = collections.OrderedDict()
        self._next = 0
        self.bytes = 0
        self.hits = 0
        self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _longest(self, ids: np.ndarray, max_context: int) -> tuple[int | None, int]:
        best, best_k = None, 0
        for key, (tokens, _state, _n, ctx) in self._entries.items():
            if ctx != max_context:
                continue
            n = min(tokens.size, ids.size)
            if n <= best_k:
                continue
            diff = np.flatnonzero(tokens[:n] != ids[:n])
            k = int(diff[0]) if diff.size else n
            if k > best_k:
                best, best_k = key, k
        return best, best_k

    def adopt(self, session, ids: list[int]) -> int:
        """Fills an empty `session` with the KV of the longest cached prefix of `ids` (leaving at
        least one token of `ids` to feed); returns how many tokens it holds now (0: none)."""
        if session._tokens or session.kv_cache.rings or len(ids) <= MIN_REUSE or session.logits_mode != "last":
            return 0
        arr = np.asarray(ids, dtype=np.int32)
        with self._lock:
            key, k = self._longest(arr, session.max_context)
            if key is None or k < MIN_REUSE:
                return 0
            self._entries.move_to_end(key)
            state = self._entries[key][1]
        k = min(k, len(ids) - 1)
        session._state.copy_kv_from(state, k)  # outside the lock: an eviction meanwhile keeps `state` alive
        session._tokens[:] = ids[:k]
        session.kv_cache.valid = session.kv_cache.end = k
        with self._lock:
            self.hits += 1
            self.reused_tokens += k
        return k

    def insert(self, session) -> None:
        """Keeps a copy of the KV of the prompt `session` holds now (its whole history)."""
        from pocketlm import _core

        n = session.kv_cache.valid
        if n < MIN_ENTRY or session.kv_cache.rings or n != len(session._tokens) or session.logits_mode != "last":
            return
        tokens = np.asarray(session._tokens[:n], dtype=np.int32)
        with self._lock:
            key, k = self._longest(tokens, session.max_context)
            if key is not None and k == n:  # an entry holds this prefix already
                self._entries.move_to_end(key)
                return
        need = int(session._state.kv_used_bytes(n))
        if need > self.budget:
            return
        state = _core.State(session.engine.compiled.program, session.max_context, session.engine.kv_type)
        state.copy_kv_from(session._state, n)
        with self._lock:
            self._entries[self._next] = (tokens, state, need, session.max_context)
            self._next += 1
            self.bytes += need
            while self.bytes > self.budget and self._entries:
                _key, (_t, _s, nbytes, _c) = self._entries.popitem(last=False)
                self.bytes -= nbytes
