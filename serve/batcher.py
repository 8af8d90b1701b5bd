"""The serving batcher: Parts from many calls become one ``Engine.recommend_batch`` call.

Triton's dynamic-batching rules, on one worker thread: the first waiting Part waits at most
``max_queue_delay_us`` for company; a batch closes at ``preferred_batch_size`` rows (never more than
``max_batch_size`` unless one Part alone is bigger); Parts of different (k, exclude_history) run as one
``recommend_batch`` call per pair (``columns.run_parts``). The queue is bounded in rows (``max_queue``): beyond it :meth:`submit` raises
``OverloadedError`` at once (the HTTP service answers 503 + Retry-After) instead of growing memory.

A batch that fails is re-run Part by Part so only the culprit fails. :meth:`swap` replaces the engine
between two batches (hot reload): queued Parts run on the new engine; none is lost.

An asyncio caller (:meth:`Batcher.run`, the HTTP service) gets an asyncio future: the scheduling thread hands a
batch's results to each caller loop with one ``call_soon_threadsafe``, and is itself woken only when a Part
completes what it waits for, so the hop costs ~6 us per single-request call instead of ~23 (README, "Load test").

A batch that hangs (a backend or retriever that never returns) must not stall the service: the scheduling
thread hands each batch to a runner thread and waits for it at most ``batch_timeout_s``. Past that, the
batch's requests fail with :class:`BatchTimeoutError` (the HTTP service answers 504), the stuck runner is
abandoned (it exits if its call ever returns; its late result is dropped) and a new runner serves the next
batches. Only the scheduling thread sets the callers' futures, so a late result can never reach a caller.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from dpr.engine import ClosedError, OverloadedError
from dpr.errors import InputError

from .columns import Part, run_parts

log = logging.getLogger("dpr.serve")


class BatchTimeoutError(RuntimeError):
    """A batch ran past ``batch_timeout_s``: its requests failed, the runner was replaced."""


class _Runner:
    """One thread that runs batches handed to it; abandoned (told to exit once free) when a batch hangs."""

    def __init__(self, n: int):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.engine = None                   # the engine of the batch it runs now (None: idle)
        self._close_after: list = []         # engines swapped out while it hung on them: closed when it returns
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, name=f"dpr-serve-runner-{n}", daemon=True)
        self.thread.start()

    def _loop(self):
        while True:
            job = self._jobs.get()
            if job is None:
                break
            fn, fut = job
            try:
                fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the scheduler
                fut.set_exception(exc)
            with self._lock:
                self.engine, done = None, self._close_after
                self._close_after = []
            for engine in done:              # swapped out while this thread was inside it: nobody else uses it
                engine.close()

    def close_when_done(self, engine) -> bool:
        """Close ``engine`` when the current call returns, if that call runs on it (True); else False."""
        with self._lock:
            if self.thread.is_alive() and self.engine is engine:
                self._close_after.append(engine)
                return True
        return False

    def run(self, engine, fn) -> Future:
        fut: Future = Future()
        self.engine = engine
        self._jobs.put((fn, fut))
        return fut

    def stop(self) -> None:
        self._jobs.put(None)


class _Waiter:
    """An asyncio caller's slot in the queue (:meth:`Batcher.submit_async`), in place of a concurrent Future:
    its result is buffered by the scheduling thread and handed to the caller's loop with the rest of its batch,
    one ``call_soon_threadsafe`` (one loop wake-up) per batch instead of one per request."""

    __slots__ = ("loop", "fut", "out")

    def __init__(self, loop, fut, out: list):
        self.loop, self.fut, self.out = loop, fut, out

    def set_running_or_notify_cancel(self) -> bool:
        return not self.fut.cancelled()      # read across threads: a later cancel is re-checked on the loop

    def set_result(self, value) -> None:
        self.out.append((self.loop, self.fut, value, None))

    def set_exception(self, exc) -> None:
        self.out.append((self.loop, self.fut, None, exc))


def _resolve(items: list) -> None:
    """On the caller's loop: set a batch's asyncio futures (a cancelled caller's is skipped)."""
    for _, fut, value, exc in items:
        if not fut.done():
            if exc is None:
                fut.set_result(value)
            else:
                fut.set_exception(exc)


class Batcher:
    def __init__(self, engine, max_batch_size: int = 512, preferred_batch_size: int = 512,
                 max_queue_delay_us: int = 0, max_queue: int = 4096, on_batch=None,
                 batch_timeout_s: float = 30.0, on_error=None):
        if (isinstance(batch_timeout_s, bool) or not isinstance(batch_timeout_s, (int, float))
                or not math.isfinite(batch_timeout_s) or batch_timeout_s <= 0):
            raise InputError(f"batch_timeout_s must be a finite number of seconds > 0, got {batch_timeout_s!r}")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.preferred = min(preferred_batch_size, max_batch_size)
        self.delay = max_queue_delay_us / 1e6
        self.max_queue = max_queue
        self.batch_timeout_s = float(batch_timeout_s)
        self.on_batch = on_batch             # callback(rows, seconds): metrics
        self.on_error = on_error             # callback(kind, requests): "exception" | "timeout", requests failed
        self._q: deque = deque()             # (arrival time, Part, Future | _Waiter)
        self._done: list = []                # _Waiter results of the batch just run (scheduling thread only)
        self._rows = 0                       # rows waiting
        self._cond = threading.Condition()
        self._run_lock = threading.Lock()    # held while a batch runs: swap waits for it
        self._closed = False
        self.replaced = 0                    # runners abandoned after a timeout
        self._abandoned: list[_Runner] = []
        self._runner = _Runner(0)
        self._worker = threading.Thread(target=self._loop, name="dpr-serve-batcher", daemon=True)
        self._worker.start()

    @property
    def queued_rows(self) -> int:
        return self._rows

    @property
    def runner_thread(self) -> threading.Thread:
        """The thread that runs the batches now (a new one after each timeout)."""
        return self._runner.thread

    def hung_on(self, engine) -> bool:
        """Whether an abandoned (timed-out) batch is still inside ``engine``: it must not be closed under it."""
        return any(r.thread.is_alive() and r.engine is engine for r in self._abandoned)

    # ---- intake ---------------------------------------------------------------------------------
    def submit(self, part: Part) -> Future:
        return self._put(part, Future())

    def submit_async(self, part: Part) -> asyncio.Future:
        """:meth:`submit` for a caller on an asyncio loop (call it there): an asyncio future, resolved on that
        loop together with the rest of its batch."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._put(part, _Waiter(loop, fut, self._done))
        return fut

    def _put(self, part: Part, fut):
        with self._cond:
            if self._closed:
                raise ClosedError("the server is shutting down")
            if self._rows and self._rows + len(part) > self.max_queue:
                raise OverloadedError(f"the batcher queue is full ({self._rows} requests waiting, the limit is "
                                      f"{self.max_queue}: --max-queue); retry later")
            # wake the scheduling thread only when it waits for this: the first Part (it sleeps on an empty
            # queue) or the preferred size reached (it sleeps out max_queue_delay_us); a wake-up per Part was a
            # thread switch per single-request call
            wake = not self._q or self._rows + len(part) >= self.preferred
            self._q.append((time.monotonic(), part, fut))
            self._rows += len(part)
            if wake:
                self._cond.notify()
        return fut

    async def run(self, part: Part):
        """Await one Part's ``(engine, ResultBatch slice)``."""
        return await self.submit_async(part)

    # ---- worker ---------------------------------------------------------------------------------
    def _take(self) -> list | None:
        with self._cond:
            while not self._q:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = self._q[0][0] + self.delay
            while self._rows < self.preferred and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            taken, rows = [], 0
            while self._q and rows < self.preferred:
                n = len(self._q[0][1])
                if taken and rows + n > self.max_batch_size:
                    break
                taken.append(self._q.popleft())
                rows += n
            self._rows -= rows
            return taken

    def _loop(self):
        try:
            while True:
                taken = self._take()
                if taken is None:
                    return
                live = [(p, f) for _, p, f in taken if f.set_running_or_notify_cancel()]
                if live:
                    try:
                        with self._run_lock:
                            self._run(live)
                    finally:
                        self._flush()
        finally:
            self._runner.stop()

    def _flush(self) -> None:
        """Hand the asyncio callers' results of the batch to their loops: one wake-up per loop per batch."""
        done, self._done[:] = list(self._done), []
        by_loop: dict = {}
        for item in done:
            by_loop.setdefault(item[0], []).append(item)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, items)
            except RuntimeError:             # that loop has closed: nobody is waiting there any more
                pass

    def _run(self, live):
        t0 = time.perf_counter()
        engine = self.engine
        parts = [p for p, _ in live]
        pending = self._runner.run(engine, lambda: run_parts(engine, parts))
        try:
            results = pending.result(timeout=self.batch_timeout_s)
        except FutureTimeout:
            self._abandon(live)
            return
        except BaseException as exc:  # noqa: BLE001 - run_parts returns errors; this is a bug in it: fail the batch
            results = [exc] * len(live)
        faults = 0                            # requests (rows), not Parts: the HTTP front merges calls into one Part
        for (p, f), r in zip(live, results):
            if isinstance(r, BaseException):
                f.set_exception(r)
                faults += 0 if isinstance(r, InputError) else len(p)
            else:
                f.set_result((engine, r))     # the engine that answered: its catalogue renders the ids
        if faults:
            log.error("dpr-serve: %d request(s) failed inside the engine: %s", faults,
                      next(r for r in results if isinstance(r, BaseException) and not isinstance(r, InputError)))
            if self.on_error is not None:
                self.on_error("exception", faults)
        if self.on_batch is not None:
            self.on_batch(sum(len(p) for p, _ in live), time.perf_counter() - t0)

    def _abandon(self, live) -> None:
        """The batch hung: fail its requests, leave its runner behind (told to exit once free), start another."""
        rows = sum(len(p) for p, _ in live)
        n = f"{rows} row" + "s" * (rows != 1)
        err = BatchTimeoutError(f"the engine did not answer this request's batch ({n}) within "
                                f"{self.batch_timeout_s:g} s (batch_timeout_s, --batch-timeout-s); the request "
                                f"failed and a new batcher worker serves the next ones")
        for _, f in live:
            f.set_exception(err)
        stuck = self._runner
        stuck.stop()
        self._abandoned = [r for r in self._abandoned if r.thread.is_alive()] + [stuck]
        self.replaced += 1
        self._runner = _Runner(self.replaced)
        log.error("dpr-serve: a batch of %d rows hung past batch_timeout_s=%g s; its requests failed, worker %s "
                  "abandoned, %s serves from now on", rows, self.batch_timeout_s, stuck.thread.name,
                  self._runner.thread.name)
        if self.on_error is not None:
            self.on_error("timeout", rows)

    # ---- lifecycle ------------------------------------------------------------------------------
    def swap(self, engine):
        """Use ``engine`` from the next batch on; returns the old one (no batch runs on it any more), or None
        when an abandoned batch is still inside it: that batch's thread closes it if its call ever returns."""
        with self._run_lock:
            old, self.engine = self.engine, engine
            if any(r.close_when_done(old) for r in self._abandoned):
                return None
        return old

    def close(self, timeout: float | None = None) -> None:
        """Refuse new Parts, finish the queued ones, stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._worker.is_alive() and threading.current_thread() is not self._worker:
            self._worker.join(timeout)
