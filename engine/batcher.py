"""Dynamic batching for serving stacks (Triton-style ``max_batch_size`` / ``max_queue_delay``).

    with DynamicBatcher(engine, max_batch_size=512, max_delay_ms=5) as batcher:
        fut = batcher.submit({"history": ["1", "2"], "prompt": "more comedy", "k": 10})
        rec = fut.result()                       # a Recommendation
        rec = await batcher.submit_async(req)    # asyncio

Requests are validated in the caller's thread on ``submit`` (a bad request's future fails at once with
its InputError and never joins a batch) and appended to the queue's columns (:mod:`.request_queue`: one
history buffer, k and exclude columns; no Python object per queued request besides its Future). One worker
thread gathers valid requests until ``max_batch_size`` are waiting or ``max_delay_ms`` has passed since the
oldest arrived, takes them as one columnar batch, runs it through the engine's columnar core (the one
``recommend_batch`` runs) and resolves each future with its own row. Should a whole batch fail, its requests are
retried one by one so that only the culprit fails.

Pipelined (``pipeline=True``; the default on a GPU, ``None`` means: when the engine's device is CUDA): the core
runs in two halves on two threads. The intake thread
gathers a batch and runs its first half (prompt vectors, padding, exclusions, masks: ``Engine._prepare``);
a second thread runs the user encoder and retrieval and resolves the futures (``Engine._execute``). So the
host work of batch N + 1 overlaps the device work of batch N; at most two batches are between intake and
answer (a semaphore), and a lone request goes straight through both (one thread hand-off, no waiting). On the
CPU both halves compete for the same cores, so the overlap buys nothing and the queue grows: measured with
``dpr-bench``'s batcher section (2 cores, ONNX Runtime, 2,000 single requests/s) p99 112-124 ms pipelined
against 14 ms serial; hence off there by default. The queue is bounded: beyond ``max_queue`` waiting
requests ``submit`` raises :class:`OverloadedError`. ``close()`` stops intake and drains what is queued.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from concurrent.futures import Future

import numpy as np

from dpr.errors import InputError

from .errors import ClosedError, OverloadedError
from .request_queue import RequestQueue

# A batching delay is milliseconds; beyond a minute it is a mistake, and a huge one (1e308) overflows the
# worker's Condition.wait, which kills the worker thread and leaves every request hanging.
MAX_DELAY_MS = 60_000.0


class DynamicBatcher:
    def __init__(self, engine, max_batch_size: int = 512, max_delay_ms: float = 5.0, max_queue: int = 10000,
                 pipeline: bool | None = None):
        for name, v in (("max_batch_size", max_batch_size), ("max_queue", max_queue)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise InputError(f"{name} must be an integer, got {v!r}")
        if isinstance(max_delay_ms, bool) or not isinstance(max_delay_ms, (int, float, np.integer, np.floating)) \
                or not np.isfinite(max_delay_ms):
            raise InputError(f"max_delay_ms must be a finite number of milliseconds, got {max_delay_ms!r}")
        if max_batch_size < 1:
            raise InputError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if not 0 <= max_delay_ms <= MAX_DELAY_MS:
            raise InputError(f"max_delay_ms must be between 0 and {MAX_DELAY_MS:g} ms, got {max_delay_ms}")
        if max_queue < 1:
            raise InputError(f"max_queue must be >= 1, got {max_queue}")
        if pipeline is not None and not isinstance(pipeline, bool):
            raise InputError(f"pipeline must be True, False or None (on when the engine runs on CUDA), got {pipeline!r}")
        if pipeline is None:
            pipeline = str(getattr(engine, "device", "cpu")).startswith("cuda")
        self.engine = engine
        self.max_batch_size = int(max_batch_size)
        self.max_delay = float(max_delay_ms) / 1000.0
        self.max_queue = int(max_queue)
        self._queue = RequestQueue()
        self._cond = threading.Condition()
        self._closed = False
        self._stats = {"submitted": 0, "rejected_invalid": 0, "rejected_overload": 0, "batches": 0,
                       "completed": 0, "failed": 0, "max_batch_seen": 0}
        self.pipeline = pipeline
        self._in_flight = threading.Semaphore(2)        # batches between intake and answer (pipelined)
        self._handoff: queue.SimpleQueue = queue.SimpleQueue()
        self._finisher = None
        if pipeline:
            self._finisher = threading.Thread(target=self._finish_loop, name="dpr-dynamic-batcher-device", daemon=True)
            self._finisher.start()
        self._worker = threading.Thread(target=self._loop, name="dpr-dynamic-batcher", daemon=True)
        self._worker.start()

    # ---- intake -----------------------------------------------------------------------------------
    def submit(self, request) -> Future:
        """Queue one request (a :class:`~dpr.engine.Request` or a dict of its fields); returns a Future
        resolving to its :class:`~dpr.engine.Recommendation`. Raises OverloadedError when the queue is
        full and ClosedError after ``close()``."""
        fut: Future = Future()
        try:
            row = self.engine.validate_request(request)
        except InputError as exc:
            with self._cond:
                self._stats["rejected_invalid"] += 1
            fut.set_exception(exc)
            return fut
        with self._cond:
            if self._closed:
                raise ClosedError("the batcher is closed")
            if len(self._queue) >= self.max_queue:
                self._stats["rejected_overload"] += 1
                raise OverloadedError(f"the batcher queue is full ({self.max_queue} requests waiting); retry later")
            self._queue.append(row, fut, time.monotonic())
            self._stats["submitted"] += 1
            self._cond.notify()
        return fut

    async def submit_async(self, request):
        """asyncio variant of :meth:`submit`: awaits and returns the Recommendation."""
        return await asyncio.wrap_future(self.submit(request))

    # ---- worker -----------------------------------------------------------------------------------
    def _take_batch(self):
        with self._cond:
            while not len(self._queue):
                if self._closed:
                    return None
                self._cond.wait()
            deadline = self._queue.oldest_arrival() + self.max_delay
            while len(self._queue) < self.max_batch_size and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self._queue.take(min(self.max_batch_size, len(self._queue)))

    def _loop(self):
        try:
            while True:
                if self.pipeline:
                    self._in_flight.acquire()          # released when a batch is answered
                batch = self._take_batch()
                if batch is None:
                    return
                cols, futures = batch
                live = [i for i, f in enumerate(futures) if f.set_running_or_notify_cancel()]
                if len(live) < len(futures):           # cancelled while queued: not run
                    if not live:
                        if self.pipeline:
                            self._in_flight.release()
                        continue
                    cols, futures = cols.select(live), [futures[i] for i in live]
                if not self.pipeline:
                    self._run(cols, futures)
                    continue
                try:
                    prep, err = self.engine._prepare(cols), None
                except BaseException as exc:  # noqa: BLE001 - the finisher retries row by row
                    prep, err = None, exc
                self._handoff.put((cols, futures, prep, err))
        finally:
            if self.pipeline:
                self._handoff.put(None)                # the finisher drains what was handed off, then stops

    def _finish_loop(self):
        while True:
            item = self._handoff.get()
            if item is None:
                return
            cols, futures, prep, err = item
            try:
                if err is not None:
                    self._retry(cols, futures, err)
                else:
                    self._run(cols, futures, lambda: self.engine._finish(prep))
            finally:
                self._in_flight.release()

    def _run(self, cols, futures, call=None):
        """Run one batch (``call``: the pipelined second half; default the whole core) and answer it."""
        try:
            recs = call() if call is not None else self.engine._run_rows(cols)
        except BaseException as exc:  # noqa: BLE001 - isolate the culprit
            self._retry(cols, futures, exc)
            return
        self._answer(futures, recs)

    def _retry(self, cols, futures, exc: BaseException):
        """A batch failed with ``exc``: a lone request gets it; others run one by one, so only the culprit fails."""
        if len(futures) == 1:
            futures[0].set_exception(exc)
            with self._cond:
                self._stats["failed"] += 1
            return
        for i, fut in enumerate(futures):
            self._run_one(cols.select(np.array([i])), fut)

    def _answer(self, futures, recs):
        for i, fut in enumerate(futures):
            fut.set_result(recs[i])
        with self._cond:
            self._stats["batches"] += 1
            self._stats["completed"] += len(futures)
            self._stats["max_batch_seen"] = max(self._stats["max_batch_seen"], len(futures))

    def _run_one(self, cols, fut):
        try:
            rec = self.engine._run_rows(cols)[0]
        except BaseException as exc:  # noqa: BLE001
            fut.set_exception(exc)
            with self._cond:
                self._stats["failed"] += 1
            return
        fut.set_result(rec)
        with self._cond:
            self._stats["completed"] += 1

    # ---- lifecycle --------------------------------------------------------------------------------
    def stats(self) -> dict:
        with self._cond:
            return dict(self._stats, queued=len(self._queue))

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting requests, finish every queued one, stop the worker (idempotent)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        me = threading.current_thread()
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in (self._worker, self._finisher):
            if t is not None and t.is_alive() and me is not t:
                t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
