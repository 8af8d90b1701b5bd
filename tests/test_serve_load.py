"""The load test's pieces (``dpr.serve.load``) and the lean inference path it measures (``dpr.serve.lean``).

``lean.parse`` may only ever accept what the FastAPI route's strict pydantic model accepts, with the same
values (checked on generated near-valid bodies); on a live ``dpr-serve`` the lean path (``application/json``)
and the FastAPI route (any other JSON content type) give the same answers and the same refusals, and
``/metrics`` counts both under ``/recommend``. The hand-written keep-alive client of the load test reads
uvicorn's answers on one connection, and the warm-up covers every distinct prompt.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import sys
from typing import Union

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

httpx = pytest.importorskip("httpx", reason='needs the [serve] extra: pip install -e ".[serve]"')
pytest.importorskip("fastapi", reason='needs the [serve] extra: pip install -e ".[serve]"')

from pydantic import TypeAdapter  # noqa: E402

from dpr.serve import lean  # noqa: E402
from dpr.serve.http_app import RecommendRequest  # noqa: E402
from dpr.serve.load import RawHTTP, post_head, warm_calls  # noqa: E402
from dpr.serve.procs import Server, free_port  # noqa: E402




import dpr_tests_fuzz_strategies as fz  # noqa: E402 - tests/fuzz_strategies.py (conftest.py)
ROUTE = TypeAdapter(Union[RecommendRequest, list[RecommendRequest]])
FASTAPI_JSON = "application/json; charset=utf-8"       # a JSON type lean.parse leaves to the FastAPI route
VALID = [
    {"history": ["i1", "i2", "i3"], "prompt": "something funny", "k": 5},
    {"history": ["i10"], "negative_prompt": "no horror", "k": 3, "prompt": None},
    {"history": ["i5", "i6"], "hard_filter": {"include_tags": ["comedy"], "exclude_items": ["i47"]}, "k": 4},
    {"history": ["i8", "i20", "i21"], "k": 7, "exclude_history": False, "hard_filter": None},
    {"history": ["i2"], "prompt": "comédie légère"},
]


def fields(r) -> tuple:
    return (r.history, r.prompt, r.negative_prompt, r.k, r.exclude_history, r.hard_filter)


# ---- lean.parse against the route's pydantic model ---------------------------------------------------------
def near_valid():
    """Requests whose every field is valid (mostly) or one of the values the strict model must refuse."""
    ok_text = st.one_of(st.sampled_from(["i1", "i2", "a b"]), st.text(max_size=6))
    text = st.one_of(ok_text, ok_text, fz.WEIRD_TEXT, fz.LONE_SURROGATE)

    def mostly(good, bad):                       # valid 3 times in 4
        return st.one_of(good, good, good, bad)
    ok_filter = st.dictionaries(st.sampled_from(["include_tags", "exclude_tags", "exclude_items"]),
                                st.lists(ok_text, max_size=2), max_size=3)
    value = {
        "prompt": mostly(st.one_of(st.none(), ok_text), st.one_of(text, fz.NOT_A_STRING)),
        "negative_prompt": mostly(st.one_of(st.none(), ok_text), st.one_of(text, fz.NOT_A_STRING)),
        "k": mostly(st.integers(-3, 30), st.one_of(st.integers(-2 ** 70, 2 ** 70), fz.NOT_A_STRING)),
        "exclude_history": mostly(st.booleans(), fz.NOT_A_BOOL),
        "hard_filter": mostly(st.one_of(st.none(), ok_filter), st.one_of(fz.JSON_VALUES, st.dictionaries(
            st.sampled_from(["include_tags", "exclude_items", "tags"]),
            st.one_of(st.lists(text, max_size=2), fz.JSON_VALUES), max_size=3))),
    }
    history = mostly(st.lists(ok_text, max_size=3), st.one_of(st.lists(text, max_size=3), fz.JSON_VALUES))
    one = st.fixed_dictionaries({"history": history}, optional=value)
    one = st.one_of(one, one, one, st.fixed_dictionaries({"surprise": fz.JSON_VALUES}, optional={
        "history": history, **value}))
    return st.one_of(one, one, st.lists(one, max_size=3), fz.JSON_VALUES)


@fz.fuzz_settings(300)
@given(obj=near_valid())
def test_lean_parse_accepts_only_what_the_route_accepts(obj):
    body = json.dumps(obj).encode()
    got = lean.parse(body, b"application/json")
    if got is None:
        return                                   # left to the FastAPI route: nothing to compare
    reqs, single = got
    models = ROUTE.validate_python(json.loads(body))   # must not raise: the route would accept it
    models = [models] if single else models
    assert single == (not isinstance(obj, list))
    assert [fields(r) for r in reqs] == [fields(lean.Req.from_model(m)) for m in models]


def test_lean_parse_takes_the_plain_valid_bodies_and_leaves_the_rest():
    for obj in VALID + [VALID]:
        assert lean.parse(json.dumps(obj).encode(), b"application/json") is not None, obj
    base = VALID[0]
    refused = [dict(base, k=True), dict(base, k="5"), dict(base, k=5.0), dict(base, history=["i1", 2]),
               dict(base, history=[]) | {"history": None}, dict(base, prompt="\ud800"), dict(base, surprise=1),
               dict(base, hard_filter={"tags": []}), dict(base, exclude_history=1), {"prompt": "x"}, [], 3]
    for obj in refused:
        assert lean.parse(json.dumps(obj).encode(), b"application/json") is None, obj
    assert lean.parse(json.dumps(base).encode(), FASTAPI_JSON.encode()) is None
    assert lean.parse(json.dumps(base).encode(), None) is None
    assert lean.parse(b"{bad json", b"application/json") is None


# ---- live: the lean path and the FastAPI route side by side -------------------------------------------------
@pytest.fixture(scope="module")
def server(export_dir, tmp_path_factory):
    port = free_port()
    cmd = [sys.executable, "-P", "-m", "dpr.serve.cli", str(export_dir), "--port", str(port), "--log-level",
           "warning", "--backend", "onnxruntime", "--retriever", "onnxruntime", "--max-k", "20"]
    s = Server(cmd, port, log_path=tmp_path_factory.mktemp("serve-lean") / "server.log").start()
    yield s
    assert s.stop() == 0, s.log()


def same_answer(a: dict, b: dict) -> None:
    assert {k: a[k] for k in ("k", "count", "short_reason")} == {k: b[k] for k in ("k", "count", "short_reason")}
    assert [(i["rank"], i["id"], i["title"], i["tags"]) for i in a["items"]] == \
           [(i["rank"], i["id"], i["title"], i["tags"]) for i in b["items"]]
    np.testing.assert_allclose([i["score"] for i in a["items"]], [i["score"] for i in b["items"]], rtol=1e-5,
                               atol=1e-5)


def test_lean_path_answers_as_the_fastapi_route(server):
    base = VALID[0]
    bad = [dict(base, history=["nope"]), dict(base, k=21), dict(base, k=0), dict(base, prompt="  "),
           [base, dict(base, history=["i1", "nope"])]]
    with httpx.Client(base_url=server.url, timeout=60) as c:
        def both(obj):
            body = json.dumps(obj).encode()
            return [c.post("/recommend", content=body, headers={"content-type": t})
                    for t in ("application/json", FASTAPI_JSON)]
        for obj in VALID + [VALID]:
            a, b = both(obj)
            assert a.status_code == b.status_code == 200, (a.text, b.text)
            for x, y in zip(*(([r.json()] if isinstance(obj, dict) else r.json()) for r in (a, b))):
                same_answer(x, y)
        for obj in bad:
            a, b = both(obj)
            assert a.status_code == 422 and (a.status_code, a.json()) == (b.status_code, b.json()), obj
        text = c.get("/metrics").text
    # both paths are counted under the route's template
    counts = {ln.split("status=")[1].split('"')[1]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
              if ln.startswith('dpr_http_requests_total{route="/recommend"')}
    assert counts.get("200", 0) >= 2 * (len(VALID) + 1) and counts.get("422", 0) >= 2 * len(bad), counts


def test_rows_per_engine_call_come_from_the_services_metrics(server):
    """The load test's diagnostic column: the rows and engine calls the service counted between two reads of its
    /metrics (one call of 3 requests: 3 rows in 1 engine call)."""
    from dpr.serve.load import _rows_per_call, service_engine_counts

    before = service_engine_counts(server.url)
    assert before is not None
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.post("/recommend", json=[VALID[0]] * 3).status_code == 200     # one k: one engine call
    after = service_engine_counts(server.url)
    assert (after[0] - before[0], after[1] - before[1]) == (3, 1)
    assert _rows_per_call(before, after) == 3.0
    assert _rows_per_call(after, after) is None and _rows_per_call(None, after) is None
    assert service_engine_counts("http://127.0.0.1:9") is None      # nothing listens: no count, no crash


def test_raw_load_client_keeps_its_connection(server):
    host, port = server.url.split("://")[1].split(":")
    ok = json.dumps(VALID[0]).encode()
    refused = json.dumps(dict(VALID[0], k=True)).encode()

    async def go():
        conn = RawHTTP(host, int(port), timeout_s=60)
        try:
            out, writers = [], set()
            for body in (ok, refused, ok):
                out.append(await conn.post(post_head(server.url, "/recommend", len(body)), body))
                writers.add(id(conn.writer))
            return out, len(writers) == 1
        finally:
            conn.close()
    (a, b, c), kept = asyncio.run(go())
    assert kept, "the connection was not kept alive across calls"
    assert a[0] == c[0] == 200 and json.loads(a[1]) == json.loads(c[1])
    assert json.loads(a[1])["count"] == 5
    assert b[0] == 422 and "k" in json.loads(b[1])["error"]


def test_warm_up_covers_every_distinct_prompt():
    chunks = [[(["i1"], p, n)] for p, n in [("a", None), ("a", None), (None, "b"), ("a", "b"), ("c", None),
                                             (None, None), ("c", "b")]]
    got = warm_calls(chunks, first=1)
    assert got == [0, 2, 4]
    seen = {t for i in got for _, p, n in chunks[i] for t in (p, n)} - {None}
    assert seen == {"a", "b", "c"}


def test_lean_parse_of_a_list_checks_every_id_even_on_the_fast_path():
    """A list body without a surrogate escape has its ids checked by type only; one with such an escape (or an
    escaped backslash before "ud8") by the exact per-string check. Either way a bad id leaves the body to the
    route."""
    ok = [{"history": ["i1", "é"], "k": 2}, {"history": ["i3"], "prompt": "x"}]
    got = lean.parse(json.dumps(ok, ensure_ascii=False).encode(), b"application/json")
    assert got is not None and [r.history for r in got[0]] == [["i1", "é"], ["i3"]] and got[1] is False
    for bad in ([{"history": ["i1", 7]}, {"history": ["i2"]}],                 # not a string
                [{"history": ["i1"]}, {"history": ["i2", None]}],
                [{"history": ["i1"]}, {"history": [["i2"]]}]):
        assert lean.parse(json.dumps(bad).encode(), b"application/json") is None, bad
    lone = b'[{"history": ["i1"]}, {"history": ["i2", "\\ud800"]}]'            # a lone surrogate after json.loads
    assert lean.parse(lone, b"application/json") is None
    pair = b'[{"history": ["i1"]}, {"history": ["\\ud83d\\ude00"]}]'            # a valid pair: one code point
    got = lean.parse(pair, b"application/json")
    assert got is not None and got[0][1].history == ["\U0001F600"]
    slash = b'[{"history": ["a\\\\ud800"]}, {"history": ["i2"]}]'              # an escaped backslash, then text
    got = lean.parse(slash, b"application/json")
    assert got is not None and got[0][0].history == ["a\\ud800"]


def test_free_ports_are_distinct_and_bindable(monkeypatch):
    """A server's ports are chosen together: never the same port twice, even from a kernel that hands out the
    lowest free port again as soon as it is released (three free_port calls in a row then repeat one, and
    tritonserver fails to bind its second front end); and each is free to bind."""
    import socket

    from dpr.serve import procs

    real = procs.free_ports(3)
    assert len(set(real)) == 3
    for p in real:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))

    class LowestFirst:                         # bind(port 0) -> the lowest port not bound now
        bound: set = set()

        def __init__(self, *a):
            self.port = None

        def bind(self, addr):
            self.port = min(set(range(40000, 40010)) - LowestFirst.bound)
            LowestFirst.bound.add(self.port)

        def getsockname(self):
            return ("127.0.0.1", self.port)

        def close(self):
            LowestFirst.bound.discard(self.port)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.close()

    monkeypatch.setattr(procs.socket, "socket", LowestFirst)
    assert (procs.free_port(), procs.free_port()) == (40000, 40000)       # what a port chosen alone risks
    assert procs.free_ports(3) == (40000, 40001, 40002)
    assert not LowestFirst.bound                                            # every socket released


# ---- rounds: the in-process engine and the server measured in turn --------------------------------------------
class _Recorder:
    """A meter that checks drive() runs its hooks with no call in flight and every call inside a round."""

    def __init__(self, inflight):
        self.inflight, self.events = inflight, []

    def start(self, r):
        assert self.inflight[0] == 0
        self.events.append(("start", r))

    def stop(self, r):
        assert self.inflight[0] == 0
        self.events.append(("stop", r))


def _fake_call(inflight, seen, events, delay=0.0, bad=()):
    async def call(payload):
        assert events and events[-1][0] == "start"            # inside a round
        inflight[0] += 1
        try:
            await asyncio.sleep(delay)
            seen.append((events[-1][1], payload))
            return payload not in bad
        finally:
            inflight[0] -= 1
    return call


@pytest.mark.parametrize("requests,rows,rounds,conc", [(64, 1, 4, 8), (10, 1, 3, 4), (3, 1, 8, 2), (1024, 512, 4, 2),
                                                       (700, 1, 1, 64)])
def test_drive_measures_in_rounds_with_nothing_in_flight_between(requests, rows, rounds, conc):
    from dpr.serve.load import LoadConfig, drive

    inflight, seen = [0], []
    meter = _Recorder(inflight)
    call = _fake_call(inflight, seen, meter.events, bad={5})
    payloads = list(range(7))
    meter.events.append(("start", -1))                        # the warm-up runs before the first round
    out = asyncio.run(drive(call, payloads, rows, conc, LoadConfig(requests=requests, rounds=rounds, duration_s=60),
                            warm=[0, 1], meter=meter))
    calls = max(1, requests // rows)
    made = min(rounds, calls)                                 # never more rounds than calls
    assert meter.events[1:] == [(e, r) for r in range(made) for e in ("start", "stop")]
    measured = [(r, p) for r, p in seen if r >= 0]
    assert len(measured) == calls == out["calls"] and out["requests"] == calls * rows
    per_round = [sum(1 for r, _ in measured if r == i) for i in range(made)]
    assert max(per_round) - min(per_round) <= 1               # equal rounds
    assert [p for _, p in measured] == [i % 7 for i in range(calls)]   # the payloads in order, across rounds
    assert out["errors"] == sum(1 for _, p in measured if p == 5)
    assert len(out["round_rps"]) == made and all(x > 0 for x in out["round_rps"])


def test_drive_bounds_each_round_by_its_share_of_the_duration():
    from dpr.serve.load import LoadConfig, drive

    inflight, seen = [0], []
    meter = _Recorder(inflight)
    meter.events.append(("start", -1))
    call = _fake_call(inflight, seen, meter.events, delay=0.02)
    t0 = time.perf_counter()
    out = asyncio.run(drive(call, list(range(3)), 1, 2, LoadConfig(requests=10_000, rounds=4, duration_s=0.4),
                            warm=[], meter=meter))
    took = time.perf_counter() - t0
    assert took < 2.0, took                                   # 4 rounds of 0.1 s, not 10,000 calls of 20 ms
    assert 4 <= out["calls"] < 200 and len(out["round_rps"]) == 4
    assert meter.events[-1] == ("stop", 3)


class _FakeInProcess:
    def __init__(self, rps):
        self.rps, self.parts = rps, []

    def measure(self, part=0, parts=1):
        self.parts.append((part, parts))
        r = self.rps[part]
        return {"requests": 1000, "rps": r, "seconds": round(1000 / r, 3)}


def test_interleaved_ratio_is_total_over_total_and_shows_each_round():
    from dpr.serve.load import Interleaved

    counts = iter([(0, 0), (64, 2), (64, 2), (160, 5), None, None])
    inproc = _FakeInProcess([20000.0, 10000.0, 20000.0])
    m = Interleaved(inproc, 3, os.getpgid(0), lambda: next(counts))
    for r in range(3):
        m.start(r)
        m.stop(r)
    assert inproc.parts == [(0, 3), (1, 3), (2, 3)]
    rep = m.report({"requests": 3000, "rps": 5000.0, "round_rps": [6000.0, 3000.0, 8000.0]})
    # 3,000 in-process requests in 0.05 + 0.1 + 0.05 s: 15,000 requests/s, not the mean of the three rates
    assert rep["in_process_rps"] == 15000.0
    assert rep["vs_in_process"] == round(5000 / 15000, 3)
    assert rep["round_ratios"] == [0.3, 0.3, 0.4] and rep["rounds"] == 3
    assert rep["in_process_round_rps"] == [20000.0, 10000.0, 20000.0]
    assert rep["rows_per_engine_call"] is None                # the third round could not be counted
    assert rep["server_cpu_ms_per_1k"] >= 0 and rep["client_cpu_ms_per_1k"] >= 0

    counts = iter([(0, 0), (64, 2), (100, 2), (196, 5)])
    m = Interleaved(_FakeInProcess([1.0, 1.0]), 2, os.getpgid(0), lambda: next(counts))
    for r in range(2):
        m.start(r)
        m.stop(r)
    # rows and calls summed over the rounds only: what ran between them (another scenario's warm-up) is left out
    assert m.report({"requests": 2, "rps": 1.0, "round_rps": [1.0, 1.0]})["rows_per_engine_call"] == round(160 / 5, 1)


def test_the_load_test_interleaves_the_in_process_engine_with_a_live_server(server, export_dir):
    """One scenario of the real load test against the live service: the in-process engine (the same export, the
    same workload) runs its share before each of the rounds, and the row holds the ratio and each round's."""
    from dpr.serve.load import InProcess, Interleaved, LoadConfig, _scenario, service_engine_counts, workload

    cfg = LoadConfig(model=str(export_dir), requests=96, batch=16, rounds=3, clients=8, duration_s=60)
    batches = workload(export_dir, cfg)
    inproc = InProcess(export_dir, batches, cfg)
    try:
        meter = Interleaved(inproc, cfg.rounds, server.proc.pid, lambda: service_engine_counts(server.url))
        r = _scenario("http", "single", server.url, batches, cfg, meter)
        rep = meter.report(r)
    finally:
        inproc.close()
    assert r["errors"] == 0 and r["requests"] == 96, r
    assert rep["rounds"] == 3 and len(rep["round_ratios"]) == 3 and len(r["round_rps"]) == 3
    assert all(m["requests"] == 32 for m in meter.base)       # 6 batches of 16: two per round
    assert rep["vs_in_process"] == round(r["rps"] / rep["in_process_rps"], 3)
    assert 1 <= rep["rows_per_engine_call"] <= 8              # 8 clients: at most 8 rows per engine call
    assert rep["server_cpu_ms_per_1k"] > 0


def test_targets_hold_the_issues_rows_and_report_the_others_beside_them():
    from dpr.serve.load import _other_rows, _targets, table

    def row(t, sc, rps, base, errors=0, p99=10.0):
        return {"target": t, "scenario": sc, "clients": 64, "requests_per_call": 1, "rps": rps, "in_process_rps": base,
                "vs_in_process": round(rps / base, 3), "errors": errors, "p50_ms": 1, "p90_ms": 2, "p99_ms": p99,
                "round_ratios": [0.3, 0.35]}
    results = [{"target": "in-process", "scenario": "batched", "clients": 1, "requests_per_call": 512, "rps": 100.0,
                "p50_ms": 1, "p90_ms": 1, "p99_ms": 1, "errors": 0},
               row("http", "single", 31, 100), row("http", "batched", 79, 100),
               row("http-v2", "single", 20, 100), row("http-v2-binary", "batched", 90, 100),
               row("triton-http", "single", 40, 100, errors=1), row("triton-grpc", "single", 24, 100),
               row("triton-grpc", "batched", 85, 100, p99=500.0)]
    got = _targets(results)
    assert got == {"http single >= 30% of in-process, 0 errors, p99 <= 100 ms": True,
                   "http batched >= 80% of in-process": False,
                   "triton-http single >= 30% of in-process, 0 errors, p99 <= 100 ms": False,     # an error
                   "triton-grpc single >= 30% of in-process, 0 errors, p99 <= 100 ms": False,
                   "triton-grpc batched >= 80% of in-process": True,          # p99 is a single-request target
                   "triton-http single within 20% of http": True,
                   "triton-grpc single within 20% of http": False,            # 24 / 31 < 0.8
                   "triton-grpc batched within 20% of http": True}
    assert _other_rows(results) == {"http-v2 single >= 30% of in-process, 0 errors, p99 <= 100 ms": False,
                                    "http-v2-binary batched >= 80% of in-process": True}
    text = table({"results": results})
    assert "| 0.30-0.35 |" in text and "in-process, interleaved" in text
