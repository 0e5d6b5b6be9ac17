"""The engine's scheduler: continuous batching of generations into shared executor steps.

Every generation on an engine's generation program (`Session.generate`, `Engine.chat`,
`Engine.submit`) becomes a `Request` on the engine's one scheduler. A background thread runs steps
while there is work: each step takes one row from every decoding sequence (its last sampled token)
and fills the rest of the step's token budget (the engine's prefill chunk) with prompt tokens of
sequences still prefilling, oldest first, so a long prompt is prefilled in chunks between decode
rows and never stalls the others for more than one chunk. One `_core.run_batch` call runs the rows
of all of them at once (each at its own position in its own session's KV cache), reading every
weight once; then each sequence that finished feeding its tokens samples its next one with its own
parameters. Sequences join and leave at every step (continuous batching, as llama-server and vLLM).

Who runs the steps: a thread blocked on a request (iterating it, or in `wait`) runs them itself
while no other thread does, so a single `Session.generate` runs on its own thread with no hand-off
per token (on a machine whose cores all run the step, waking a second thread per token costs ~5 %),
and among several waiting threads one runs each step for all. A background thread runs them only
for requests no thread consumes synchronously (`async for`, or not consumed yet), and only while
no thread waits.

Limits: at most `max_batch` sequences run at once (the program is planned for that many output
rows); up to `max_queue` more wait, in order, and a request beyond that gets QueueFullError; with a
`kv_budget`, a request waits until the KV bytes of the running ones plus its own (at its full
length: prompt + max_tokens) fit. A request that fails (bad logits, a sampling error) fails alone;
cancelling one (`Request.cancel`, or closing `Session.generate`'s generator) takes it out at the
next step. The background thread ends after a second without work and starts again with the next
request.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import itertools
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator

import numpy as np

from pocketlm.errors import InvalidInputError, QueueFullError

IDLE_EXIT_SECONDS = 1.0
_ids = itertools.count(1)
_live: weakref.WeakSet[Scheduler] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """At exit, lets every scheduler thread finish its step and end, so that no thread still holds
    the executor while the interpreter tears it down."""
    for scheduler in list(_live):
        scheduler.close()


class Request:
    """One generation in the scheduler: iterate it (blocking, or `async for`) for its text pieces.

    Iterating yields the pieces as they are generated and ends when the request finishes; a failed
    request raises its error there after the pieces before it. One consumer at a time. After it
    finishes: `finish_reason` ("stop", "length", "context", "cancelled" or "error"), `stats`
    (GenerationStats), `token_ids` (the generated tokens), `error`."""

    def __init__(self, scheduler: Scheduler, generation, on_done: Callable[[], None] | None = None):
        self.id = next(_ids)
        self.generation = generation
        self.session = generation.session
        self.error: BaseException | None = None
        self._scheduler = scheduler
        self._on_done = on_done
        # Guarded by the scheduler's lock:
        self._pieces: collections.deque[str] = collections.deque()
        self._done = False
        self._cancel = False
        self._attached = 0   # threads consuming it synchronously (they run the steps it needs)
        self._async_wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    @property
    def done(self) -> bool:
        return self._done

    @property
    def finish_reason(self) -> str | None:
        return self.generation.stats.finish_reason if self._done else None

    @property
    def stats(self):
        return self.generation.stats

    @property
    def token_ids(self) -> list[int]:
        return list(self.generation.token_ids)

    @property
    def logprobs(self) -> list[tuple[int, float, list[tuple[int, float]]]]:
        """With `logprobs=k` at submit: per generated token (token, log-probability, the k most likely
        (id, log-probability)), so far."""
        return list(self.generation.logprobs)

    def cancel(self) -> None:
        """Stops the request at the next step (its session keeps what was generated so far).
        Idempotent; a finished request stays as it finished."""
        self._scheduler._cancel(self)

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until the request finishes (running steps meanwhile, see the module's doc); True if
        it did within `timeout` seconds."""
        scheduler = self._scheduler
        scheduler._attach(self, 1)
        try:
            return scheduler._wait(lambda: self._done, timeout)
        finally:
            scheduler._attach(self, -1)

    def result(self, timeout: float | None = None) -> str:
        """All of the text not consumed yet, once the request has finished. Raises the request's
        error, or TimeoutError."""
        if not self.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        return "".join(self)

    def __iter__(self) -> Iterator[str]:
        scheduler = self._scheduler
        scheduler._attach(self, 1)
        try:
            while True:
                scheduler._wait(lambda: self._pieces or self._done)
                with scheduler._lock:
                    piece = self._pieces.popleft() if self._pieces else None
                if piece is None:
                    break
                yield piece
        finally:
            scheduler._attach(self, -1)
        if self.error is not None:
            raise self.error

    async def __aiter__(self) -> AsyncIterator[str]:
        scheduler = self._scheduler
        waker = (asyncio.get_running_loop(), asyncio.Event())
        with scheduler._lock:
            self._async_wakers.append(waker)
        try:
            while True:
                with scheduler._lock:
                    piece = self._pieces.popleft() if self._pieces else None
                    done = self._done
                if piece is not None:
                    yield piece
                    continue
                if done:
                    break
                await waker[1].wait()
                waker[1].clear()
        finally:
            with scheduler._lock:
                self._async_wakers.remove(waker)
        if self.error is not None:
            raise self.error


class _Running:
    """A request admitted to the batch, with the KV bytes counted for it in the budget."""
    __slots__ = ("gen", "kv_need", "request", "session")

    def __init__(self, request: Request, kv_need: int):
        self.request = request
        self.gen = request.generation
        self.session = request.session
        self.kv_need = kv_need


class Scheduler:
    def __init__(self, program, max_batch: int, max_queue: int, kv_budget: int | None = None,
                 speculator=None):
        self.program = program
        self.speculator = speculator  # pocketlm.speculative: guesses checked in the decode steps
        self.max_out = int(program.max_seqs)      # output (logits) rows of one step
        self.max_batch = int(max_batch)
        self.max_queue = int(max_queue)
        self.kv_budget = kv_budget
        self.max_rows = int(program.max_tokens)   # the token budget of one step
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)     # threads waiting on requests
        self._bg_cond = threading.Condition(self._lock)  # the background thread
        self._waiting: collections.deque[tuple[Request, int]] = collections.deque()
        self._running: list[_Running] = []
        self._driving = False     # a thread is running a step
        self._sync_waiters = 0    # threads blocked in _wait (any of them may run steps)
        self._thread: threading.Thread | None = None
        self._closed = False
        self.steps = 0            # executor steps run
        _live.add(self)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def close(self, timeout: float = 10.0) -> None:
        """Cancels every request and ends the background thread (waiting up to `timeout` s)."""
        with self._lock:
            self._closed = True
            for request, _ in self._waiting:
                request._cancel = True
            for r in self._running:
                r.request._cancel = True
            thread = self._thread
            self._cond.notify_all()
            self._bg_cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # ---- submitting ------------------------------------------------------------
    def submit(self, generation, on_done: Callable[[], None] | None = None, attach: bool = False) -> Request:
        """Queues a Generation made on a session of this scheduler's program. Starts it (prefix reuse
        on its session), so an error in the request (a prompt longer than the context) raises here;
        QueueFullError when `max_queue` requests already wait. on_done runs when it finishes.
        attach: the caller will consume it synchronously (then `_attach(request, -1)` when done), so
        the background thread leaves its steps to the caller."""
        session = generation.session
        if session._chunk != self.max_rows or session.logits_mode != "last":
            raise InvalidInputError("the scheduler runs sessions of the engine's generation program only")
        with self._lock:  # refused before start() changes the session (a rewind, a context shift)
            self._refuse_locked()
        generation.start()
        kv_need = self._kv_need(generation)
        if self.kv_budget is not None and kv_need > self.kv_budget:
            raise InvalidInputError(
                f"the request needs {kv_need} bytes of KV cache at its full length (prompt + max_tokens), "
                f"more than the engine's kv_budget of {self.kv_budget}; lower max_tokens or raise kv_budget")
        request = Request(self, generation, on_done)
        request._attached = int(attach)
        if generation.done:  # max_tokens=0: nothing to run
            self._finish([(request, None)])
            return request
        with self._lock:
            self._refuse_locked()
            self._waiting.append((request, kv_need))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="pocketlm-scheduler", daemon=True)
                self._thread.start()
            self._cond.notify_all()
            if self._sync_waiters == 0 and not attach:
                self._bg_cond.notify()
        return request

    def _refuse_locked(self) -> None:
        if self._closed:
            raise RuntimeError("the engine's scheduler is closed")
        if len(self._waiting) >= self.max_queue:
            raise QueueFullError(f"the engine's queue is full ({self.max_queue} requests wait for "
                                 f"{self.max_batch} running ones); retry later")

    def _kv_need(self, gen) -> int:
        if self.kv_budget is None:
            return 0
        session = gen.session
        length = min(session.max_context, session.cached_tokens + int(gen.feed.size) + gen.max_tokens)
        return int(session._state.kv_used_bytes(length))

    def _attach(self, request: Request, delta: int) -> None:
        with self._lock:
            request._attached += delta
            if request._attached == 0 and not request._done and self._sync_waiters == 0:
                self._bg_cond.notify()  # nobody consumes it synchronously any more

    def _orphans(self) -> bool:
        """Whether a request has no thread consuming it synchronously (the background thread's work)."""
        return any(r.request._attached == 0 for r in self._running) or \
            any(request._attached == 0 for request, _ in self._waiting)

    def _cancel(self, request: Request) -> None:
        with self._lock:
            if request._done:
                return
            request._cancel = True
            self._cond.notify_all()
            if self._sync_waiters == 0:
                self._bg_cond.notify()

    # ---- who runs the steps ----------------------------------------------------
    def _has_work(self) -> bool:
        return bool(self._running or self._waiting)

    def _wait(self, ready: Callable[[], bool], timeout: float | None = None) -> bool:
        """Blocks until ready() (read under the lock), running steps while no other thread does."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._sync_waiters += 1
            try:
                while not ready():
                    if not self._driving and self._has_work():
                        self._driving = True
                        self._lock.release()
                        try:
                            self._step()
                        finally:
                            self._lock.acquire()
                            self._driving = False
                            self._cond.notify_all()  # the step is free for another waiter
                        continue
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._cond.wait(remaining)
                return True
            finally:
                self._sync_waiters -= 1
                if self._sync_waiters == 0 and self._orphans():
                    self._bg_cond.notify()

    def _loop(self) -> None:
        """The background thread: runs steps while requests nobody consumes synchronously need them and
        no thread waits to run them."""
        while True:
            with self._lock:
                while not (self._orphans() and not self._driving and self._sync_waiters == 0):
                    if not self._bg_cond.wait(IDLE_EXIT_SECONDS) and not self._has_work() or \
                            self._closed and not self._has_work():
                        self._thread = None
                        return
                self._driving = True
            try:
                self._step()
            finally:
                with self._lock:
                    self._driving = False
                    self._cond.notify_all()

    # ---- one step ------------------------------------------------------------------
    def _step(self) -> None:
        """Admits what fits, runs one executor step over every running sequence and hands out what
        it produced. Called by one thread at a time (_driving), without the lock."""
        from pocketlm import _core

        with self._lock:
            finished: list[tuple[Request, BaseException | None]] = self._reap_locked()
            self._admit_locked()
            running = list(self._running)
        if self.speculator is not None:
            finished += self._draft(running)
        with self._lock:
            batch = self._plan_locked()
        if batch:
            # Logits rows per sequence: all of a token and its guesses (verification), else the last.
            n_outs = [n if n > 1 and n == r.gen.n_out else 1 for r, n, _ in batch]
            t0 = time.perf_counter()
            try:
                out = _core.run_batch(self.program, [(r.session._state, r.gen.feed[:n], pos, o)
                                                     for (r, n, pos), o in zip(batch, n_outs)])
            except Exception as e:  # noqa: BLE001 - an input the checks missed: these caches are suspect
                out = None
                finished += [(r.request, e) for r, _, _ in batch]
            if out is not None and self.speculator is not None and \
                    all(n == o for (_, n, _), o in zip(batch, n_outs)):  # decode and verification rows only
                self.speculator.costs.step(sum(n_outs), time.perf_counter() - t0)
            pushed: list[tuple[Request, list[str]]] = []
            row = 0
            for (r, n, pos), n_out in zip(batch if out is not None else (), n_outs):
                gen, session = r.gen, r.session
                rows, row = out[row:row + n_out], row + n_out
                session._advance(gen.feed[:n], pos)
                gen.feed = gen.feed[n:]
                if gen.feed.size:
                    continue  # still prefilling: this row's logits are not the next token's
                session._last_logits = rows[-1]
                try:
                    pieces = gen.on_verify(rows, pos) if n_out > 1 else gen.on_logits(rows[0])
                except Exception as e:  # noqa: BLE001 - it fails this request alone
                    finished.append((r.request, e))
                    continue
                if pieces:
                    pushed.append((r.request, pieces))
                if gen.done:
                    finished.append((r.request, None))
            self.steps += 1
            if pushed:
                self._push(pushed)
        if finished:
            self._finish(finished)

    def _push(self, pushed: list[tuple[Request, list[str]]]) -> None:
        wakers = []
        with self._lock:
            for request, pieces in pushed:
                request._pieces.extend(pieces)
                wakers += request._async_wakers
            self._cond.notify_all()
        for loop, event in wakers:
            loop.call_soon_threadsafe(event.set)

    def _finish(self, finished: list[tuple[Request, BaseException | None]]) -> None:
        for request, error in finished:
            gen = request.generation
            last = request.session._last_logits
            if last is not None and last.base is not None:
                # a row of a step's output: keep a copy, not the whole batch's logits alive
                request.session._last_logits = last.copy()
            if error is not None:
                request.error = error
                gen.cancel("error")
            elif not gen.done:
                gen.cancel("cancelled")
            callback, request._on_done = request._on_done, None
            if callback is not None:
                callback()  # before it is marked done: the session is free when wait() returns
        wakers = []
        with self._lock:
            done = {id(request) for request, _ in finished}
            self._running = [r for r in self._running if id(r.request) not in done]
            for request, _ in finished:
                request._done = True
                wakers += request._async_wakers
            self._cond.notify_all()
        for loop, event in wakers:
            loop.call_soon_threadsafe(event.set)

    def _reap_locked(self) -> list[tuple[Request, BaseException | None]]:
        """Takes cancelled requests out of the queue and the batch."""
        finished = [(request, None) for request, _ in self._waiting if request._cancel]
        if finished:
            self._waiting = collections.deque(w for w in self._waiting if not w[0]._cancel)
        finished += [(r.request, None) for r in self._running if r.request._cancel]
        self._running = [r for r in self._running if not r.request._cancel]
        return finished

    def _admit_locked(self) -> None:
        used = sum(r.kv_need for r in self._running)
        while self._waiting and len(self._running) < self.max_batch:
            request, need = self._waiting[0]
            if self.kv_budget is not None and self._running and used + need > self.kv_budget:
                break  # first come, first served: later requests wait behind it
            self._waiting.popleft()
            self._running.append(_Running(request, need))
            used += need

    def _draft(self, running: list[_Running]) -> list[tuple[Request, BaseException | None]]:
        """Makes the guesses of every decoding sequence for this step (the speculator's drafts, in
        shared steps of a draft model), within the step's row and output budgets, and puts them
        after the token each feeds. A drafter's failure fails the requests it drafted for."""
        rows_left = self.max_rows - sum(int(r.gen.feed.size) for r in running if r.gen.feed.size == 1)
        out_left = self.max_out - len(running)
        entries = []
        for r in running:
            gen, session = r.gen, r.session
            if gen.spec is None or gen.done or gen.feed is None or gen.feed.size != 1:
                continue
            gen.spec.choose(self.speculator.costs)
            room = session.max_context - session.cached_tokens - 1  # guesses that still fit the context
            k = min(gen.spec.k, rows_left, out_left, room, gen.max_tokens - gen.stats.generated_tokens)
            if k < 1:
                continue
            rows_left -= k
            out_left -= k
            entries.append((gen, session._tokens + [int(gen.feed[0])], k))
        if not entries:
            return []
        try:
            self.speculator.draft(entries)
        except Exception as e:  # noqa: BLE001 - fails the requests drafted for, alone
            for gen, _, _ in entries:
                gen.spec.drafts, gen.spec.q = [], []
            return [(r.request, e) for r in running if any(r.gen is g for g, _, _ in entries)]
        for gen, _, _ in entries:
            if gen.spec.drafts:
                gen.feed = np.concatenate([gen.feed, np.asarray(gen.spec.drafts, dtype=np.int32)])
        return []

    def _plan_locked(self) -> list[tuple[_Running, int, int]]:
        """(sequence, rows, position) of the next step (plan_step over the running sequences)."""
        first = [r.gen.spec is not None and bool(r.gen.spec.drafts) for r in self._running]
        return [(self._running[i], n, self._running[i].session.cached_tokens)
                for i, n in plan_step([int(r.gen.feed.size) for r in self._running], self.max_rows, first)]


def plan_step(pending: list[int], budget: int, first: list[bool] | None = None) -> list[tuple[int, int]]:
    """The rows of one step, as (index, rows) over sequences with `pending` tokens each to feed:
    every decoding sequence's one token first, then those marked `first` (a token and its guesses,
    which the scheduler budgeted to fit whole), then prompt chunks, in order, up to `budget` rows in
    all (a sequence with nothing pending takes none)."""
    first = first or [False] * len(pending)
    order = [i for i, n in enumerate(pending) if n == 1] + \
        [i for i, n in enumerate(pending) if n > 1 and first[i]] + \
        [i for i, n in enumerate(pending) if n > 1 and not first[i]]
    step = []
    for i in order:
        if budget == 0:
            break
        n = min(pending[i], budget)
        step.append((i, n))
        budget -= n
    return step
