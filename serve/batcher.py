"""The serving batcher: Parts from many calls become one ``Engine.recommend_batch`` call.

Triton's dynamic-batching rules, on one worker thread: the first waiting Part waits at most
``max_queue_delay_us`` for company; a batch closes at ``preferred_batch_size`` rows (never more than
``max_batch_size`` unless one Part alone is bigger); Parts of different (k, exclude_history) run as one
``recommend_batch`` call per pair (``columns.run_parts``). The queue is bounded in rows (``max_queue``): beyond it :meth:`submit` raises
``OverloadedError`` at once (the HTTP service answers 503 + Retry-After) instead of growing memory.

A batch that fails is re-run Part by Part so only the culprit fails. :meth:`swap` replaces the engine
between two batches (hot reload): queued Parts run on the new engine; none is lost.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from concurrent.futures import Future

from dpr.engine import ClosedError, OverloadedError

from .columns import Part, run_parts


class Batcher:
    def __init__(self, engine, max_batch_size: int = 512, preferred_batch_size: int = 512,
                 max_queue_delay_us: int = 2000, max_queue: int = 4096, on_batch=None):
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.preferred = min(preferred_batch_size, max_batch_size)
        self.delay = max_queue_delay_us / 1e6
        self.max_queue = max_queue
        self.on_batch = on_batch             # callback(rows, seconds): metrics
        self._q: deque = deque()             # (arrival time, Part, Future)
        self._rows = 0                       # rows waiting
        self._cond = threading.Condition()
        self._run_lock = threading.Lock()    # held while a batch runs: swap waits for it
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name="dpr-serve-batcher", daemon=True)
        self._worker.start()

    @property
    def queued_rows(self) -> int:
        return self._rows

    # ---- intake ---------------------------------------------------------------------------------
    def submit(self, part: Part) -> Future:
        fut: Future = Future()
        with self._cond:
            if self._closed:
                raise ClosedError("the server is shutting down")
            if self._rows and self._rows + len(part) > self.max_queue:
                raise OverloadedError(f"the batcher queue is full ({self._rows} requests waiting, the limit is "
                                      f"{self.max_queue}: --max-queue); retry later")
            self._q.append((time.monotonic(), part, fut))
            self._rows += len(part)
            self._cond.notify()
        return fut

    async def run(self, part: Part):
        """Await one Part's ``(engine, ResultBatch slice)``."""
        return await asyncio.wrap_future(self.submit(part))

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
        while True:
            taken = self._take()
            if taken is None:
                return
            live = [(p, f) for _, p, f in taken if f.set_running_or_notify_cancel()]
            if live:
                with self._run_lock:
                    self._run(live)

    def _run(self, live):
        t0 = time.perf_counter()
        engine = self.engine
        results = run_parts(engine, [p for p, _ in live])
        for (_, f), r in zip(live, results):
            if isinstance(r, BaseException):
                f.set_exception(r)
            else:
                f.set_result((engine, r))     # the engine that answered: its catalogue renders the ids
        if self.on_batch is not None:
            self.on_batch(sum(len(p) for p, _ in live), time.perf_counter() - t0)

    # ---- lifecycle ------------------------------------------------------------------------------
    def swap(self, engine):
        """Use ``engine`` from the next batch on; returns the old one (no batch runs on it any more)."""
        with self._run_lock:
            old, self.engine = self.engine, engine
        return old

    def close(self, timeout: float | None = None) -> None:
        """Refuse new Parts, finish the queued ones, stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._worker.is_alive() and threading.current_thread() is not self._worker:
            self._worker.join(timeout)
