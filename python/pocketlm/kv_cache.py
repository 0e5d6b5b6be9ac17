"""One sequence's KV cache: the executor's storage (a `_core.State`, C++) and what it holds.

The storage is per layer K and V, `[kv_head][slot][head_dim]`, f16, f32 or Q8_0 blocks (csrc/runtime/kv_cache.h);
a full-attention layer has a slot per position, a sliding-window layer a ring of `window + step
rows - 1` slots (position p in slot p % capacity). This object knows which positions are in it:

    cache.append(n, pos)     a step wrote positions pos..pos+n-1 (pos == cache.valid)
    cache.can_trim(p)        whether dropping every position >= p leaves what a step at p reads
    cache.trim(p)            drops them: True if it could (a plain truncation), False if a ring no
                             longer holds what p needs: then it is empty (valid = 0) and the
                             session feeds its kept tokens again from 0 on its next call
    cache.shift(keep, n)     context shift: drops positions [keep, keep + n) and moves the rest down
                             by n, keys re-rotated to their new positions (the executor's kv_shift)
    cache.copy_from(other)   holds what `other` holds (a conversation fork)
    cache.used_bytes(n)      bytes positions [0, n) occupy; cache.reserved_bytes for max_context

A ring holds the last `capacity` positions written, the highest being `end`: everything below
`end - capacity` is overwritten. A step's first row at position p reads [p - window + 1, p); the
step writes its own rows before any row reads, and the ring's spare `step rows - 1` slots keep
those writes off what its later rows still need. So a step at p finds what it reads iff
`end - capacity <= max(0, p - window + 1)` in every ring. Positions a later step wrote and a trim
dropped are above p, so they never count as held. A shift may leave a ring holding less than its
last `capacity` positions (what it held moved down, what it dropped left a hole below): its `floor`
is then the lowest position it holds, and it holds max(end - capacity, floor) and up.
"""

from __future__ import annotations


class KVCache:
    def __init__(self, state, layer_windows, max_context: int):
        self.state = state  # _core.State: the storage
        # (capacity, window) of each layer whose ring can wrap, both as the executor sized them
        self.rings = [(int(c), int(w)) for c, w in zip(state.kv_capacities, layer_windows) if c < max_context]
        self.valid = 0  # positions [0, valid) hold the keys and values of the sequence's first tokens
        self.end = 0    # highest position written (+1) since the cache was last emptied
        self.floors = [0] * len(self.rings)  # per ring: no position below it is held (after a shift)

    def append(self, n: int, pos: int) -> None:
        """Records that a step wrote positions pos..pos+n-1 (pos must be `valid`)."""
        if pos != self.valid:
            raise ValueError(f"KV cache: a step at position {pos} after {self.valid} cached positions")
        self.valid = pos + n
        self.end = max(self.end, self.valid)

    def can_trim(self, position: int) -> bool:
        return all(max(self.end - capacity, floor) <= max(0, position - window + 1)
                   for (capacity, window), floor in zip(self.rings, self.floors))

    def trim(self, position: int) -> bool:
        """Keeps positions [0, position) (no-op at or past `valid`). False when a ring cannot: the
        cache is then empty and every kept token must be fed again from position 0."""
        if position >= self.valid:
            return True
        if self.can_trim(position):
            self.valid = position
            return True
        self.clear()
        return False

    def clear(self) -> None:
        self.valid = self.end = 0
        self.floors = [0] * len(self.rings)

    def shift(self, keep: int, n: int) -> None:
        """Context shift: positions [keep, keep + n) leave the cache and [keep + n, valid) move down by n,
        their keys rotated to the new positions, so the next token goes at valid - n. A ring keeps
        what it held of the kept and moved positions; its floor rises past what the shift dropped."""
        self.state.kv_shift(keep, n, self.valid, self.end)
        floors = []
        for (capacity, _), floor in zip(self.rings, self.floors):
            low = max(self.end - capacity, floor)  # the lowest position the ring held
            floors.append(low if low < keep else max(low - n, keep))
        self.floors = floors
        self.valid -= n
        self.end = self.valid  # what a trim left above valid is not moved
        if not self.can_trim(self.valid):  # a ring lacks what the next step's window reads (the session
            self.clear()                   # avoids this, Session._make_room): fed again from position 0

    def copy_from(self, other: KVCache) -> None:
        """Holds what `other` holds: every position it wrote since it was last emptied (`end`, not
        only the `valid` ones), so the rings hold the same and can_trim answers alike. Both must be
        States of one program with the same max_context and KV type (the executor checks)."""
        self.state.copy_kv_from(other.state, other.end)
        self.valid, self.end, self.floors = other.valid, other.end, list(other.floors)

    def used_bytes(self, n_positions: int) -> int:
        """Bytes of K and V that positions [0, n_positions) occupy: per layer min(n, capacity) x 2 x
        n_kv_heads x head_dim x element size."""
        return int(self.state.kv_used_bytes(n_positions))

    @property
    def reserved_bytes(self) -> int:
        return int(self.state.kv_bytes)
