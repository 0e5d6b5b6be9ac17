"""Static memory planning: every intermediate tensor gets an offset in one arena.

Planned once for the worst case (the largest prefill chunk) and reused for every
call, so running the model allocates nothing per token. Tensors whose lifetimes
do not overlap share memory. Ops that may write in place (graph.INPLACE_OK) reuse
an input that dies at that op; such a pair is planned as one buffer.

Placement is greedy by size: largest tensors first, each at the lowest offset
where it overlaps no already-placed tensor that is alive at the same time (the
strategy of ggml-alloc and tinygrad's memory planner, on exact lifetimes).
"""

from __future__ import annotations

from dataclasses import dataclass

from pocketlm.ir.graph import INPLACE_OK, S, T, Graph

ALIGN = 64


@dataclass(frozen=True)
class Buffer:
    names: tuple[str, ...]   # values sharing this buffer (in-place chains)
    nbytes: int
    start: int               # index of the first node writing it
    end: int                 # index of the last node reading it (len(nodes) for outputs)
    offset: int


@dataclass(frozen=True)
class MemoryPlan:
    max_tokens: int
    max_seqs: int
    arena_bytes: int
    naive_bytes: int         # sum of every intermediate's size: what one-buffer-each would cost
    offsets: dict[str, int]  # value name -> arena offset
    buffers: tuple[Buffer, ...]

    def summary(self) -> str:
        saved = 1 - self.arena_bytes / self.naive_bytes if self.naive_bytes else 0.0
        return (f"arena {self.arena_bytes / 2**20:.2f} MiB for {len(self.offsets)} tensors "
                f"(naive sum {self.naive_bytes / 2**20:.2f} MiB, {saved:.0%} saved) "
                f"at max {self.max_tokens} tokens in {self.max_seqs} sequences per step")


def value_bytes(g: Graph, name: str, max_tokens: int, max_seqs: int = 1) -> int:
    v = g.values[name]
    rows = max_tokens if v.rows == T else max_seqs if v.rows == S else int(v.rows)
    return rows * v.cols * 4


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plan_memory(g: Graph, max_tokens: int, max_seqs: int = 1) -> MemoryPlan:
    """Offsets for the worst case: max_tokens rows per step (T) in up to max_seqs sequences (S)."""
    n_nodes = len(g.nodes)
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, n in enumerate(g.nodes):
        for x in n.inputs:
            if x in g.values:
                last[x] = i
        for o in n.outputs:
            first[o] = i
            last.setdefault(o, i)
    for o in g.outputs:
        last[o] = n_nodes

    # In-place: merge an output with an input that dies at this op (same size).
    parent: dict[str, str] = {v: v for v in first}

    def root(v: str) -> str:
        while parent[v] != v:
            parent[v] = parent[parent[v]]
            v = parent[v]
        return v

    for i, n in enumerate(g.nodes):
        for idx in INPLACE_OK.get(n.op, ()):
            x = n.inputs[idx]
            o = n.outputs[0]
            if (x in g.values and last.get(x) == i and x not in g.outputs
                    and value_bytes(g, x, max_tokens, max_seqs) == value_bytes(g, o, max_tokens, max_seqs)
                    and root(x) != root(o)):
                parent[root(o)] = root(x)
                break

    groups: dict[str, list[str]] = {}
    for v in first:
        groups.setdefault(root(v), []).append(v)
    raw = []
    for members in groups.values():
        nbytes = _align(max(value_bytes(g, v, max_tokens, max_seqs) for v in members))
        raw.append((tuple(members), nbytes, min(first[v] for v in members), max(last[v] for v in members)))

    placed: list[Buffer] = []
    for members, nbytes, start, end in sorted(raw, key=lambda b: (-b[1], b[2])):
        conflicts = sorted((b.offset, b.offset + b.nbytes) for b in placed
                           if not (b.end < start or end < b.start))
        offset = 0
        for lo, hi in conflicts:
            if offset + nbytes <= lo:
                break
            offset = max(offset, hi)
        placed.append(Buffer(members, nbytes, start, end, offset))

    offsets = {v: b.offset for b in placed for v in b.names}
    arena = max((b.offset + b.nbytes for b in placed), default=0)
    naive = sum(_align(value_bytes(g, v, max_tokens, max_seqs)) for v in first)
    return MemoryPlan(max_tokens, max_seqs, arena, naive, offsets, tuple(sorted(placed, key=lambda b: b.start)))


def check_plan(plan: MemoryPlan) -> None:
    """Raise if two buffers that are alive at the same time overlap in memory."""
    bufs = plan.buffers
    for i, a in enumerate(bufs):
        if a.offset % ALIGN or a.offset + a.nbytes > plan.arena_bytes:
            raise AssertionError(f"buffer {a.names} misplaced")
        for b in bufs[i + 1:]:
            live_together = not (a.end < b.start or b.end < a.start)
            overlap = a.offset < b.offset + b.nbytes and b.offset < a.offset + a.nbytes
            if live_together and overlap:
                raise AssertionError(f"{a.names} and {b.names} are live together and overlap")
