"""The soak's short form (dpr.bench.soak; ``make soak`` runs the long one): client threads send mixed valid and
invalid requests through the DynamicBatcher, and through the HTTP service (a dpr-serve subprocess), and every
answer is checked against its own request's. Plus the harness's own checks: an answer handed to the wrong
request, a lost answer and a leaked thread are caught, and the HTTP target's refusals are matched by field.

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


# ---- the HTTP service as the soak's target --------------------------------------------------------------------

def test_short_http_soak_loses_and_crosses_nothing(engine, export_dir, pool, tmp_path):
    """The same pool through dpr-serve: every answer its own request's, every invalid request a 4xx naming the
    engine's field, no 5xx; memory, fds and threads of the server process, not of the test."""
    pytest.importorskip("httpx", reason='needs the [serve] extra: pip install -e ".[serve]"')
    pytest.importorskip("fastapi", reason='needs the [serve] extra: pip install -e ".[serve]"')
    from dpr.bench.soak import ProcProbe
    from dpr.bench.soak_http import HttpTarget, http_server

    with http_server(export_dir, "onnxruntime", "onnxruntime", max_batch=32, max_delay_ms=1,
                     log_path=tmp_path / "server.log") as server:
        report = run_soak(lambda: HttpTarget(server.url, workers=16), pool, threads=4, requests_per_thread=250,
                          inflight=4, max_seconds=60, request_timeout_s=30, probe=ProcProbe(server.proc.pid))
        assert server.proc.poll() is None, server.log()
    assert report["not_sent"] == 0 and report["answered"] == report["requests"] == 4 * 250, report
    assert report["valid_sent"] > 0 and report["invalid_sent"] > 0
    codes = report["target_stats"]["http_status"]
    assert not [c for c in codes if c.startswith("5")], codes
    assert report["fds_before"] > 0 and report["threads_before"] > 1    # the server's /proc was read
    assert verdict(report) == [], (verdict(report), report["examples"])


def test_the_http_target_matches_refusals_by_field():
    from dpr.bench.soak_http import HttpTarget, encode_body, error_field

    assert error_field("request: history holds unknown item id 'x' at position 2") == "history"
    assert error_field("invalid request: history.3: Input should be a valid string") == "history"
    assert error_field("invalid request: negative_prompt: Input should be a valid string") == "negative prompt"
    assert error_field("row 0: negative prompt is empty or whitespace only") == "negative prompt"
    assert error_field("invalid request: hard_filter.include_tags: Input should be a valid list") == "hard filter"
    assert error_field("request has unknown field(s) ['surprise']") == "surprise"
    assert error_field("invalid request: surprise: Extra inputs are not permitted") == "surprise"
    assert error_field("k=401 is larger than the catalogue (400 items)") == "k"
    t = HttpTarget.__new__(HttpTarget)                  # same_error needs no connection
    want = Answer(False, error_type="InputError", message="request: k must be an integer, got '5'")
    http = lambda msg, status=422: Answer(False, error_type=f"HTTP {status}", message=msg)  # noqa: E731
    assert t.same_error(want, http("invalid request: k: Input should be a valid integer"))
    assert not t.same_error(want, http("invalid request: history: Field required"))
    assert not t.same_error(want, http("k: Internal Server Error", 500))
    assert not t.same_error(want, Answer(True, ["i1"], [1.0]))
    assert encode_body({"prompt": b"\xff", "k": 1}) == b'{"prompt": "\xff", "k": 1}'
