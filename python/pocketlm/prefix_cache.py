"""The engine's shared prefix cache: sessions reuse the KV of prompt prefixes other sessions computed.

A radix tree over blocks of BLOCK tokens. Each node is one block of a prompt that some generation
prefilled: its BLOCK tokens (the key under its parent) and the keys and values of those positions, all
layers (`State.kv_export_range`). The keys and values of positions [0, k) depend on tokens [0, k) only,
so a node serves every prompt whose blocks down to it are the same, whatever came after; prompts that
share a system prompt share its nodes, stored once.

After a generation on an empty session has prefilled its prompt, `insert` walks the prompt's whole
blocks down the tree and adds the nodes it lacks. A generation that starts on an empty session walks
its prompt down as far as its blocks match (at least MIN_REUSE tokens, and leaving one token of the
prompt to feed) and copies those blocks into its session (`kv_import_range`), which prefills only the
rest (`stats.reused_tokens` counts them).

Memory: every node holds BLOCK positions of KV (bytes counted in `bytes`); while they exceed the budget
(`Engine(prefix_cache_mb=...)`, 0 turns the cache off) the least recently used leaf goes first, so a
shared prefix outlives the prompts that branched from it. A walk marks each node it passes as used. The
blocks are immutable arrays: a session copying from a node that is evicted meanwhile keeps its array
alive until the copy ends (Python's reference count is the node's). Models with sliding-window layers do
not use the cache: a ring that wrapped no longer holds a prompt's early positions.
"""

from __future__ import annotations

import heapq
import threading

import numpy as np

BLOCK = 32         # tokens per node
MIN_REUSE = 32     # shorter shared prefixes are cheaper to prefill than to look up and copy
MIN_ENTRY = 64     # prompts shorter than this are not kept


class _Node:
    __slots__ = ("key", "parent", "children", "kv", "used")

    def __init__(self, key: tuple, parent, kv: np.ndarray | None, used: int):
        self.key = key
        self.parent = parent
        self.children: dict[tuple, _Node] = {}
        self.kv = kv      # the block's KV, packed (State.kv_export_range)
        self.used = used  # the cache's clock when a walk last passed it


class PrefixCache:
    def __init__(self, budget_bytes: int):
        self.budget = int(budget_bytes)
        self._lock = threading.Lock()
        self._root = _Node((), None, None, 0)
        self._clock = 0
        self._nodes = 0
        self.bytes = 0
        self.hits = 0
        self.reused_tokens = 0

    def __len__(self) -> int:
        """Nodes (blocks of BLOCK tokens) held."""
        return self._nodes

    def _walk(self, ids: list[int], limit: int) -> list[_Node]:
        """The nodes of the longest chain of whole blocks of ids[:limit] in the tree (lock held)."""
        node, path = self._root, []
        self._clock += 1
        for b in range(limit // BLOCK):
            node = node.children.get(tuple(ids[b * BLOCK:(b + 1) * BLOCK]))
            if node is None:
                break
            node.used = self._clock
            path.append(node)
        return path

    def adopt(self, session, ids: list[int]) -> int:
        """Fills an empty `session` with the KV of the longest cached prefix of `ids` (whole blocks,
        leaving at least one token of `ids` to feed); returns how many tokens it holds now (0: none)."""
        if session._tokens or session.kv_cache.rings or len(ids) <= MIN_REUSE or session.logits_mode != "last":
            return 0
        with self._lock:
            path = self._walk(ids, min(len(ids) - 1, session.max_context))
        k = len(path) * BLOCK
        if k < MIN_REUSE:
            return 0
        state = session._state
        for b, node in enumerate(path):  # outside the lock: the arrays stay alive while we copy them
            state.kv_import_range(b * BLOCK, (b + 1) * BLOCK, node.kv)
        session._tokens[:] = ids[:k]
        session.kv_cache.valid = session.kv_cache.end = k
        with self._lock:
            self.hits += 1
            self.reused_tokens += k
        return k

    def insert(self, session) -> None:
        """Adds the blocks of the prompt `session` holds now (its whole history) that the tree lacks."""
        n = session.kv_cache.valid
        if n < MIN_ENTRY or session.kv_cache.rings or n != len(session._tokens) or session.logits_mode != "last":
            return
        tokens = list(session._tokens[:n])
        with self._lock:
            have = len(self._walk(tokens, n))
        blocks = n // BLOCK
        if have == blocks:
            return
        state = session._state
        block_bytes = int(state.kv_range_bytes(0, BLOCK))
        if (blocks - have) * block_bytes > self.budget:
            return
        # the missing blocks' KV, copied outside the lock (the session is the caller's, unchanged meanwhile)
        kv = [state.kv_export_range(b * BLOCK, (b + 1) * BLOCK) for b in range(have, blocks)]
        with self._lock:
            node = self._root
            self._clock += 1
            for b in range(blocks):
                key = tuple(tokens[b * BLOCK:(b + 1) * BLOCK])
                child = node.children.get(key)
                if child is None:  # (another insert may have added some meanwhile)
                    if b < have:  # evicted meanwhile, and its KV not copied: stop here
                        break
                    child = node.children[key] = _Node(key, node, kv[b - have], self._clock)
                    self._nodes += 1
                    self.bytes += block_bytes
                child.used = self._clock
                node = child
            self._evict_locked(block_bytes)

    def _evict_locked(self, block_bytes: int) -> None:
        """Least recently used leaves first, until the blocks fit the budget."""
        if self.bytes <= self.budget:
            return
        leaves = []
        stack = [self._root]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if not node.children and node is not self._root:
                leaves.append(node)
        heap = [(leaf.used, id(leaf), leaf) for leaf in leaves]
        heapq.heapify(heap)
        while self.bytes > self.budget and heap:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            del parent.children[leaf.key]
            self._nodes -= 1
            self.bytes -= block_bytes
            if parent is not self._root and not parent.children:  # the parent is a leaf now
                heapq.heappush(heap, (parent.used, id(parent), parent))
