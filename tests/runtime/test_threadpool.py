"""The thread pool's life cycle: a State (one pool each) made, run and destroyed, many times over.

Regression: a worker woken for a job could make its task claim only after the caller had finished
the job alone and the pool's destructor had published its stop generation; the claim consumed that
generation, the worker went back to sleep and the destructor's join() waited forever (seen in CI,
where a test hung until the 90-minute limit). Before the fix this loop hung within seconds. It runs
in a child process so that a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    sys.path.insert(0, {helpers!r})
    from runtime_helpers import ProgramBuilder
    from pocketlm import _core
    from pocketlm.dtypes import DType

    rng = np.random.default_rng(0)
    b = ProgramBuilder(max_tokens=64)
    e, _ = b.weight(rng.standard_normal((300, 64)).astype(np.float32))
    tok = b.tokens()
    x = b.arena(64)
    b.op("embed", [e, tok], [x])
    for _ in range(8):  # a chain of small parallel jobs, as in a prefill
        w, _ = b.weight((rng.standard_normal((64, 64)) * 0.1).astype(np.float32), DType.Q8_0)
        y = b.arena(64)
        b.op("matmul", [x, w, -1], [y])
        x = y
    prog = b.program(x, n_threads=2)
    toks = np.arange(40, dtype=np.int32)
    first = _core.State(prog, 64).run(toks, 0)
    for i in range({cycles}):
        out = _core.State(prog, 64).run(toks, 0)  # the State, and its pool, die right after the run
        assert np.array_equal(out, first), i
    print("ok", {cycles})
""")


def test_pool_destroyed_right_after_its_jobs_never_hangs():
    code = CHILD.format(helpers=str(Path(__file__).parent), cycles=8000)
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        raise AssertionError("a thread pool's destructor hung (make-run-destroy loop timed out)") from None
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ok", "8000"]
