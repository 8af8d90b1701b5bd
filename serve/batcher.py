"""The serving batcher: Parts from many calls become one ``Engine.recommend_batch`` call.

Triton's dynamic-batching rules, on one worker thread: the first waiting Part waits at most
``max_queue_delay_us`` for company; a batch closes at ``preferred_batch_size`` rows (never more than
``max_batch_size`` unless one Part alone is bigger); Parts of different (k, exclude_history) run as one
``recommend_batch`` call per pair (``columns.run_parts``). The queue is bounded in rows (``max_queue``): beyond it :meth:`submit` raises
``OverloadedError`` at once (the HTTP service answers 503 + Retry-After) instead of growing memory.

A batch that fails is re-run Part by Part so only the culprit fails. :meth:`swap` replaces the engine
between two batches (hot reload): queued Parts run on the new engine; none is lost.

An asyncio caller (:meth:`Batcher.run`, the HTTP service) gets an asyncio future: the worker hands a batch's
results to each caller loop with one ``call_soon_threadsafe``, so the hop costs ~6 us per single-request call
instead of ~23 (docs/LOAD_TEST.md).

The worker thread both takes the batches and runs them, back to back: a batch's results are handed over and
the next batch starts on the same thread, with the GIL it already holds. (A scheduling thread that handed each
batch to a runner thread put a thread wake-up and a GIL hand-off between every two batches: with 64
single-request clients the engine call started a median 0.7 ms after its batch was taken, in a 3.4 ms cycle.
Without it the cycle's engine work starts at once; 4 single-request clients get 3-5% more requests/s, 64 about the
same, where the cores are the limit; docs/LOAD_TEST.md.)

A batch that hangs (a backend or retriever that never returns) must not stall the service: a watchdog thread
looks at the batch in flight a few times a second and, past ``batch_timeout_s``, fails its requests with
:class:`BatchTimeoutError` (the HTTP service answers 504), abandons the stuck worker (it exits if its call ever
returns; its late result is dropped) and starts a new worker for the next batches. A batch's requests are
settled once, by whichever of its worker and the watchdog claims it first, so a late result can never reach a
caller.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future

from dpr.engine import ClosedError, OverloadedError
from dpr.errors import InputError

from .columns import Part, run_parts

log = logging.getLogger("dpr.serve")


class BatchTimeoutError(RuntimeError):
    """A batch ran past ``batch_timeout_s``: its requests failed, the worker was replaced."""


class _Flight:
    """A batch in flight: its live (Part, future) pairs, the engine it runs on, when it started, and whether its
    requests have been settled (by its worker, or failed by the watchdog)."""

    __slots__ = ("live", "engine", "t0", "settled")

    def __init__(self, live: list, engine, t0: float):
        self.live, self.engine, self.t0, self.settled = live, engine, t0, False


class _Worker:
    """The thread that takes and runs batches; abandoned (it exits once its call returns) when a batch hangs."""

    def __init__(self, batcher: "Batcher", n: int):
        self.flight: _Flight | None = None   # the batch it runs now (an abandoned worker: the one it hangs in)
        self.close_after: list = []          # engines swapped out while it hung on them: closed when it returns
        self.thread = threading.Thread(target=batcher._work, args=(self,), name=f"dpr-serve-runner-{n}",
                                       daemon=True)


class _Waiter:
    """An asyncio caller's slot in the queue (:meth:`Batcher.submit_async`), in place of a concurrent Future:
    its result is buffered by the worker and handed to the caller's loop with the rest of its batch,
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
        self._done: list = []                # _Waiter results of the batch being settled (under _settle_lock)
        self._rows = 0                       # rows waiting
        self._cond = threading.Condition()   # the queue: submitters notify the worker
        self._state = threading.Condition()  # flights, workers and the engine: the watchdog, swap and close
        self._settle_lock = threading.Lock() # one batch's futures set and handed to the loops at a time
        self._closed = False
        self.replaced = 0                    # workers abandoned after a timeout
        self._abandoned: list[_Worker] = []
        self._watch_stop = threading.Event()
        self._runner = self._start_worker(0)
        self._watchdog = threading.Thread(target=self._watch, name="dpr-serve-watchdog", daemon=True)
        self._watchdog.start()

    def _start_worker(self, n: int) -> _Worker:
        w = _Worker(self, n)
        w.thread.start()
        return w

    @property
    def queued_rows(self) -> int:
        return self._rows

    @property
    def runner_thread(self) -> threading.Thread:
        """The thread that runs the batches now (a new one after each timeout)."""
        return self._runner.thread

    def hung_on(self, engine) -> bool:
        """Whether an abandoned (timed-out) batch is still inside ``engine``: it must not be closed under it."""
        with self._state:
            return any(w.thread.is_alive() and w.flight is not None and w.flight.engine is engine
                       for w in self._abandoned)

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
            # wake the worker only when it waits for this: the first Part (it sleeps on an empty
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

    def _work(self, me: _Worker) -> None:
        """A worker's loop: take a batch, run it, settle it (unless the watchdog did), take the next."""
        while True:
            taken = self._take()
            if taken is None:
                return
            live = [(p, f) for _, p, f in taken if f.set_running_or_notify_cancel()]
            if not live:
                continue
            with self._state:
                flight = me.flight = _Flight(live, self.engine, time.monotonic())
            t0 = time.perf_counter()
            engine = flight.engine
            try:
                results = run_parts(engine, [p for p, _ in live])
            except BaseException as exc:  # noqa: BLE001 - run_parts returns errors; this is a bug in it
                results = [exc] * len(live)
            with self._state:
                mine = not flight.settled
                flight.settled = True
                me.flight = None
                close, me.close_after = me.close_after, []
                self._state.notify_all()     # swap may wait for this batch
            for old in close:                # swapped out while this worker hung inside it: nobody else uses it
                old.close()
            if not mine:                     # the watchdog failed this batch and replaced this worker
                return
            self._settle(live, engine, results, t0)

    def _settle(self, live: list, engine, results: list, t0: float) -> None:
        faults = 0                            # requests (rows), not Parts: the HTTP front merges calls into one Part
        with self._settle_lock:
            for (p, f), r in zip(live, results):
                if isinstance(r, BaseException):
                    f.set_exception(r)
                    faults += 0 if isinstance(r, InputError) else len(p)
                else:
                    f.set_result((engine, r))     # the engine that answered: its catalogue renders the ids
            self._flush()
        if faults:
            log.error("dpr-serve: %d request(s) failed inside the engine: %s", faults,
                      next(r for r in results if isinstance(r, BaseException) and not isinstance(r, InputError)))
            if self.on_error is not None:
                self.on_error("exception", faults)
        if self.on_batch is not None:
            self.on_batch(sum(len(p) for p, _ in live), time.perf_counter() - t0)

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

    def _watch(self) -> None:
        """The watchdog: a few looks a second at the batch in flight (a wake-up per batch would put a thread
        switch between every two batches again); fails one that ran past ``batch_timeout_s``."""
        poll = min(0.1, self.batch_timeout_s / 10)
        while not self._watch_stop.wait(poll):
            with self._state:
                w = self._runner
                f = w.flight
                if f is None or f.settled or time.monotonic() - f.t0 <= self.batch_timeout_s:
                    continue
                f.settled = True
                self._abandoned = [a for a in self._abandoned if a.thread.is_alive()] + [w]
                self.replaced += 1
                self._runner = self._start_worker(self.replaced)
                self._state.notify_all()
            self._abandon(f, w)

    def _abandon(self, f: _Flight, stuck: _Worker) -> None:
        """The batch hung: fail its requests (its worker is already replaced; it exits once its call returns)."""
        rows = sum(len(p) for p, _ in f.live)
        n = f"{rows} row" + "s" * (rows != 1)
        err = BatchTimeoutError(f"the engine did not answer this request's batch ({n}) within "
                                f"{self.batch_timeout_s:g} s (batch_timeout_s, --batch-timeout-s); the request "
                                f"failed and a new batcher worker serves the next ones")
        with self._settle_lock:
            for _, fut in f.live:
                fut.set_exception(err)
            self._flush()
        log.error("dpr-serve: a batch of %d rows hung past batch_timeout_s=%g s; its requests failed, worker %s "
                  "abandoned, %s serves from now on", rows, self.batch_timeout_s, stuck.thread.name,
                  self._runner.thread.name)
        if self.on_error is not None:
            self.on_error("timeout", rows)

    # ---- lifecycle ------------------------------------------------------------------------------
    def swap(self, engine):
        """Use ``engine`` from the next batch on; returns the old one (no batch runs on it any more), or None
        when an abandoned batch is still inside it: that batch's worker closes it if its call ever returns."""
        with self._state:
            old, self.engine = self.engine, engine
            # the batch in flight may still run on the old engine: wait for it (or for the watchdog to fail it)
            self._state.wait_for(lambda: self._runner.flight is None or self._runner.flight.engine is not old)
            for w in self._abandoned:
                if w.thread.is_alive() and w.flight is not None and w.flight.engine is old:
                    w.close_after.append(old)
                    return None
        return old

    def close(self, timeout: float | None = None) -> None:
        """Refuse new Parts, finish the queued ones, stop the worker (and, once it has stopped, the watchdog)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:                           # the worker of the moment: a timeout may replace it meanwhile
            w = self._runner
            if threading.current_thread() is w.thread:
                return
            w.thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if w is self._runner or (deadline is not None and time.monotonic() >= deadline):
                break
        if not self._runner.thread.is_alive():
            self._watch_stop.set()
