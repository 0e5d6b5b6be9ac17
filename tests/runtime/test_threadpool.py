"""The thread pool's life cycle: a Program (one pool, shared by its States) made, run and destroyed,
many times over, while States of another Program are made, run and destroyed in a second thread.

Regression: a worker woken for a job could make its task claim only after the caller had finished
the job alone and the pool's destructor had published its stop generation; the claim consumed that
generation, the worker went back to sleep and the destructor's join() waited forever (seen in CI,
where a test hung until the 90-minute limit). Before the fix this loop hung within seconds. The pool
now belongs to the Program (its States share it), so each cycle makes a Program whose pool dies right
after the run. Meanwhile a long-lived State of a shared Program runs in another thread, and States of
that Program are made and dropped beside it (its workspace is shared: they must not disturb its runs).
It runs in a child process so that a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

CHILD = textwrap.dedent("""
    import sys
    import threading
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
    toks = np.arange(40, dtype=np.int32)
    shared = b.program(x, n_threads=2)
    first = _core.State(shared, 64).run(toks, 0)
    stop, errors, runs = threading.Event(), [], [0]

    def background():  # one State of the shared Program, running all along
        st = _core.State(shared, 64)
        try:
            while not stop.is_set():
                assert np.array_equal(st.run(toks, 0), first)
                runs[0] += 1
        except BaseException as exc:
            errors.append(exc)

    bg = threading.Thread(target=background)
    bg.start()
    for i in range({cycles}):
        if i % 4 == 0:  # States of the shared Program made, run and dropped beside the background one
            out = _core.State(shared, 64 + i % 3).run(toks, 0)
        else:  # a Program of its own: its pool dies right after the run
            out = _core.State(b.program(x, n_threads=2), 64).run(toks, 0)
        assert np.array_equal(out, first), i
    stop.set()
    bg.join()
    assert not errors, errors
    print("ok", {cycles}, runs[0] > 0)
""")


def test_pool_destroyed_right_after_its_jobs_never_hangs():
    code = CHILD.format(helpers=str(Path(__file__).parent), cycles=4000)
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        raise AssertionError("a thread pool's destructor hung (make-run-destroy loop timed out)") from None
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ok", "4000", "True"]
