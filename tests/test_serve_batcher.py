"""The HTTP service's batcher (``dpr.serve.batcher.Batcher``) on the real engine, driven directly: batches run
back to back on the thread that takes them, within the size limits; ``swap`` waits for the batch in flight; a
batch that hangs is failed by the watchdog and a new worker serves the queue behind it; ``close`` drains."""

from __future__ import annotations

import threading
import time

import pytest

from dpr.engine import ClosedError
from dpr.serve.batcher import Batcher, BatchTimeoutError
from dpr.serve.columns import Part

WAIT = 30.0


class GatedEngine:
    """The real engine; records each batch (rows, thread) and, while ``gate`` is clear, holds the next
    ``hold`` batches inside ``recommend_batch``. ``close`` is recorded, not done (the engine is the session's)."""

    def __init__(self, inner, hold: int = 0):
        self._inner = inner
        self.hold = hold
        self.gate = threading.Event()
        self.inside = threading.Event()
        self.batches: list[tuple[int, threading.Thread]] = []
        self.closed_by: threading.Thread | None = None
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def recommend_batch(self, batch, timings=None):
        with self._lock:
            self.batches.append((len(batch), threading.current_thread()))
            held = self.hold > 0
            self.hold -= held
        if held:
            self.inside.set()
            assert self.gate.wait(WAIT), "the test never opened the gate"
        return self._inner.recommend_batch(batch, timings)

    def close(self):
        self.closed_by = threading.current_thread()


def part(engine, i: int, k: int = 3) -> Part:
    ids = engine.item_ids
    hist = [ids[(i * 7 + j) % len(ids)] for j in range(1 + i % 4)]
    return Part(flat=hist, lens=[len(hist)], prompts=None, negatives=None, k=k)


def wait_until(cond, what: str) -> None:
    t = time.monotonic()
    while not cond():
        assert time.monotonic() - t < WAIT, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_batches_run_back_to_back_on_the_thread_that_takes_them(engine):
    gated = GatedEngine(engine, hold=1)
    b = Batcher(gated, max_batch_size=8, preferred_batch_size=8)
    try:
        takers = set()
        take = b._take                                  # noqa: SLF001 - which thread takes the batches

        def recorded_take():
            takers.add(threading.current_thread())
            return take()
        b._take = recorded_take                         # noqa: SLF001 - the worker's next takes go through it
        first = b.submit(part(engine, 0))
        assert gated.inside.wait(WAIT)
        parts = [part(engine, i) for i in range(1, 21)]
        futs = [b.submit(p) for p in parts]          # queued behind the held batch
        assert b.queued_rows == 20
        gated.gate.set()
        got = [f.result(WAIT) for f in [first] + futs]
        # rows per batch: the held one alone, then the queue in batches of at most max_batch_size
        assert [n for n, _ in gated.batches] == [1, 8, 8, 4]
        # every batch ran on the worker that took it: no hand-off to another thread between two batches
        assert {t for _, t in gated.batches} == {b.runner_thread} == takers
        for p, (eng, res) in zip([part(engine, 0)] + parts, got):
            assert eng is gated
            assert list(res.ids[0]) == engine.recommend([p.flat], k=p.k)[0].item_ids
    finally:
        gated.gate.set()
        b.close(WAIT)


def test_swap_waits_for_the_batch_in_flight(engine):
    old, new = GatedEngine(engine, hold=1), GatedEngine(engine)
    b = Batcher(old)
    try:
        in_flight = b.submit(part(engine, 1))
        assert old.inside.wait(WAIT)
        swapped = {}
        t = threading.Thread(target=lambda: swapped.setdefault("old", b.swap(new)))
        t.start()
        t.join(0.3)
        assert t.is_alive(), "swap returned while a batch still ran on the old engine"
        old.gate.set()
        t.join(WAIT)
        assert swapped["old"] is old
        assert in_flight.result(WAIT)[0] is old       # the batch in flight finished on the engine it started on
        assert b.submit(part(engine, 2)).result(WAIT)[0] is new
    finally:
        old.gate.set()
        b.close(WAIT)


def test_a_hung_batch_times_out_and_a_new_worker_serves_the_queue(engine):
    old, new = GatedEngine(engine, hold=1), GatedEngine(engine)
    b = Batcher(old, batch_timeout_s=0.5)
    try:
        first_worker = b.runner_thread
        t0 = time.monotonic()
        stuck = b.submit(part(engine, 3))
        assert old.inside.wait(WAIT)
        behind = b.submit(part(engine, 4))
        with pytest.raises(BatchTimeoutError, match=r"within 0\.5 s .*batch_timeout_s"):
            stuck.result(WAIT)
        assert 0.5 <= time.monotonic() - t0 < 0.5 + WAIT / 2
        eng, res = behind.result(WAIT)                 # served by a new worker while the old one is still stuck
        assert eng is old and len(res) == 1
        assert b.replaced == 1 and b.runner_thread is not first_worker and first_worker.is_alive()
        assert old.batches[-1][1] is b.runner_thread
        assert b.hung_on(old)
        # a reload while the abandoned batch is inside the old engine: swapped, but not closed under it
        assert b.swap(new) is None
        assert old.closed_by is None
        old.gate.set()                                 # the hung call returns: its late result is dropped
        first_worker.join(WAIT)
        assert not first_worker.is_alive()
        assert old.closed_by is first_worker           # the stuck worker closed the engine it hung on
        assert not b.hung_on(old)
        with pytest.raises(BatchTimeoutError):
            stuck.result(0)
        assert b.submit(part(engine, 5)).result(WAIT)[0] is new
    finally:
        old.gate.set()
        b.close(WAIT)


def test_close_drains_the_queue_then_stops_its_threads(engine):
    gated = GatedEngine(engine, hold=1)
    b = Batcher(gated, max_batch_size=4, preferred_batch_size=4)
    first = b.submit(part(engine, 6))
    assert gated.inside.wait(WAIT)
    queued = [b.submit(part(engine, i)) for i in range(7, 17)]
    closer = threading.Thread(target=b.close, args=(WAIT,))
    closer.start()
    wait_until(lambda: b._closed, "close() to refuse new Parts")          # noqa: SLF001
    with pytest.raises(ClosedError):
        b.submit(part(engine, 17))
    gated.gate.set()
    closer.join(WAIT)
    assert not closer.is_alive()
    assert all(f.result(0)[0] is gated for f in [first] + queued)          # every queued Part was answered
    assert not b.runner_thread.is_alive()
    wait_until(lambda: not b._watchdog.is_alive(), "the watchdog to stop")  # noqa: SLF001
