"""Graph passes. Each is a named function Graph -> Graph; PIPELINE is the order they run in.

`run_pipeline` returns the final graph and, on request, a snapshot after every
pass (shown by `pocketlm inspect MODEL --graph`).
"""

from __future__ import annotations

from typing import Callable

from pocketlm.ir.graph import Graph, validate
from pocketlm.passes.dce import eliminate_dead_code, last_position_only
from pocketlm.passes.fold import fold_constants
from pocketlm.passes.fuse import fuse_add_rms_norm, fuse_gate_up_swiglu, fuse_parallel_matmuls

Pass = Callable[[Graph], Graph]

PIPELINE: list[tuple[str, Pass]] = [
    ("fold_constants", fold_constants),
    ("last_position_only", last_position_only),
    ("eliminate_dead_code", eliminate_dead_code),
    ("fuse_gate_up_swiglu", fuse_gate_up_swiglu),
    ("fuse_parallel_matmuls", fuse_parallel_matmuls),
    ("fuse_add_rms_norm", fuse_add_rms_norm),
]


def run_pipeline(g: Graph, passes: list[tuple[str, Pass]] | None = None,
                 snapshots: list[tuple[str, Graph]] | None = None) -> Graph:
    validate(g)
    if snapshots is not None:
        snapshots.append(("built", g))
    for name, fn in passes or PIPELINE:
        g = fn(g)
        try:
            validate(g)
        except ValueError as e:
            raise RuntimeError(f"pass {name} produced an invalid graph: {e}") from e
        if snapshots is not None:
            snapshots.append((name, g))
    return g
