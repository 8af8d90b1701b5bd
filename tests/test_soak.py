"""The soak's short form (dpr.bench.soak; ``make soak`` runs the long one): client threads send mixed valid and
invalid requests through the DynamicBatcher and every answer is checked against its own request's. Plus the
harness's own checks: an answer handed to the wrong request, a lost answer and a leaked thread are caught.

Bounded: a few thousand requests, ``max_seconds`` per run; no latency is asserted (the 2-core machine is shared).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest

from dpr.bench.soak import Answer, BatcherTarget, make_pool, run_soak, same_ranking, verdict


@pytest.fixture(scope="module")
def pool(engine):
    return make_pool(engine, valid=96, invalid=32, seed=1)


def test_short_soak_loses_and_crosses_nothing(engine, pool):
    report = run_soak(lambda: BatcherTarget(engine, max_batch_size=32, max_delay_ms=1), pool, threads=6,
                      requests_per_thread=600, inflight=12, max_seconds=60, request_timeout_s=30)
    assert report["not_sent"] == 0, report                 # the bound was not what ended it
    assert report["answered"] == report["requests"] == 6 * 600
    assert report["valid_sent"] > 0 and report["invalid_sent"] > 0
    assert report["target_stats"]["max_batch_seen"] > 1     # requests really shared batches
    assert verdict(report) == [], (verdict(report), report["examples"])


class _Crossing:
    """A broken front end: every 25th request gets the answer of the request submitted just before it."""
    name = "crossing"

    def __init__(self, engine):
        self.inner = BatcherTarget(engine, max_batch_size=16, max_delay_ms=1)
        self.lock = threading.Lock()
        self.n = 0
        self.prev: Future | None = None

    def submit(self, request):
        out = self.inner.submit(request)
        with self.lock:
            self.n += 1
            prev, self.prev = self.prev, out
        return prev if self.n % 25 == 0 and prev is not None else out

    def close(self):
        self.inner.close()


def test_the_harness_catches_crossed_answers(engine, pool):
    report = run_soak(lambda: _Crossing(engine), pool, threads=2, requests_per_thread=300, inflight=4,
                      max_seconds=60, request_timeout_s=30, warm_up=False)
    assert report["crossed"] > 0, report
    assert any(line.startswith("crossed") for line in verdict(report))


class _Dropping:
    """A broken front end: every 40th request's answer never comes."""
    name = "dropping"

    def __init__(self, engine):
        self.inner = BatcherTarget(engine, max_batch_size=16, max_delay_ms=1)
        self.n = 0
        self.lock = threading.Lock()

    def submit(self, request):
        with self.lock:
            self.n += 1
            drop = self.n % 40 == 0
        return Future() if drop else self.inner.submit(request)

    def close(self):
        self.inner.close()


def test_the_harness_catches_lost_answers(engine, pool):
    report = run_soak(lambda: _Dropping(engine), pool, threads=2, requests_per_thread=100, inflight=4,
                      max_seconds=60, request_timeout_s=0.5, warm_up=False)
    assert report["lost"] >= 200 // 40, report          # at least the dropped ones (a slow answer on a loaded VM too)
    assert report["answered"] + report["lost"] == report["requests"]
    assert any(line.startswith("lost") for line in verdict(report))


class _Leaking:
    """A broken front end: starts a thread per target that close() forgets."""
    name = "leaking"

    def __init__(self, engine):
        self.inner = BatcherTarget(engine, max_batch_size=16, max_delay_ms=1)
        self.stop = threading.Event()
        threading.Thread(target=self.stop.wait, args=(30,), daemon=True).start()

    def submit(self, request):
        return self.inner.submit(request)

    def close(self):
        self.inner.close()


def test_the_harness_catches_a_leaked_thread(engine, pool):
    targets = []

    def make():
        targets.append(_Leaking(engine))
        return targets[-1]
    try:
        report = run_soak(make, pool, threads=2, requests_per_thread=50, inflight=4, max_seconds=60,
                          request_timeout_s=30, warm_up=False)
    finally:
        for t in targets:
            t.stop.set()
    assert report["threads_after"] > report["threads_before"]
    assert any("threads leaked" in line for line in verdict(report))


def test_same_ranking_allows_ties_only():
    ids, sc = ["a", "b", "c"], [3.0, 2.0, 1.0]
    assert same_ranking(ids, sc, ids, sc)
    assert same_ranking(["a", "b", "d"], [3.0, 2.0, 1.0], ids, sc)        # d ties c at the k-th place
    assert same_ranking(["b", "a", "c"], [2.5, 2.5, 1.0], ["a", "b", "c"], [2.5, 2.5, 1.0])
    assert not same_ranking(["a", "d", "c"], [3.0, 2.0, 1.0], ids, sc)    # d outranks the k-th: not a tie
    assert not same_ranking(["a", "b"], [3.0, 2.0], ids, sc)
    assert not same_ranking(["a", "a", "c"], sc, ids, sc)
    assert not same_ranking(ids, [3.0, 2.0, 1.5], ids, sc)
    assert Answer(True, ids, sc).ok
