"""The batching HTTP front (``dpr.serve.http_front``) on a real uvicorn: plain valid ``POST /recommend`` and v2
infer calls are answered a batch per event-loop turn ahead of ASGI, everything else by the ASGI routes. Checked
against a second service with ``http_front="asgi"`` (every call through ASGI) on the same export, byte for byte,
and against ``Engine.recommend``; plus what uvicorn's protocol guarantees and the front must keep: pipelined calls
answered in order, HTTP/1.0 and ``Connection: close``, ``Expect: 100-continue``, chunked bodies, and one bad call
among good ones failing alone."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx", reason='needs the [serve] extra: pip install -e ".[serve]"')
pytest.importorskip("uvicorn", reason='needs the [serve] extra: pip install -e ".[serve]"')
pytest.importorskip("httptools", reason="the batching front subclasses uvicorn's httptools protocol")

from dpr.errors import InputError  # noqa: E402
from dpr.serve.http_front import protocol_for  # noqa: E402

from dpr_tests_serve_answers import REQUESTS as SHARED_REQUESTS  # noqa: E402 - tests/serve_answers.py
from dpr_tests_serve_answers import assert_same, expected, live_service, metric, triton_inputs, v2_body  # noqa: E402

WAIT = 60

REQUESTS = SHARED_REQUESTS + [{"history": ["i3", "i1"], "prompt": "caf\u00e9 \u2603 \U0001f600", "k": 2}]


class Fronts(tuple):
    """(batched url, asgi url), and ``front``: the batching service's ``BatchFront``."""
    front = None


@pytest.fixture(scope="module")
def fronts(export_dir):
    """(batched url, asgi url): the same export behind each front."""
    with live_service(export_dir) as (svc_b, url_b), live_service(export_dir, http_front="asgi") as (svc_a, url_a):
        assert svc_b.test_app.batch_front is not None and svc_a.test_app.batch_front is None
        out = Fronts((url_b, url_a))
        out.front = svc_b.test_app.batch_front
        yield out


def post_json(url: str, body):
    """``POST /recommend`` of ``body`` on its own connection (calls from several threads at once)."""
    with httpx.Client(base_url=url, timeout=WAIT) as c:
        return c.post("/recommend", json=body)


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def post(path: str, body: bytes, ctype: str = "application/json", extra: str = "", version: str = "1.1") -> bytes:
    return (f"POST {path} HTTP/{version}\r\nhost: 127.0.0.1\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}"
            f"\r\n{extra}\r\n").encode() + body


def read_answers(sock: socket.socket, n: int) -> list[tuple[int, dict, bytes]]:
    """``n`` HTTP answers read off ``sock`` (each framed by its Content-Length): (status, headers, body)."""
    buf, out = b"", []
    deadline = time.monotonic() + WAIT
    while len(out) < n:
        head_end = buf.find(b"\r\n\r\n")
        if head_end >= 0:
            lines = buf[:head_end].decode("latin-1").split("\r\n")
            if lines[0].split()[1].startswith("1"):          # 100 Continue: no body, not an answer
                buf = buf[head_end + 4:]
                continue
            headers = dict(ln.lower().split(": ", 1) for ln in lines[1:])
            length = int(headers["content-length"])
            if len(buf) >= head_end + 4 + length:
                out.append((int(lines[0].split()[1]), headers, buf[head_end + 4:head_end + 4 + length]))
                buf = buf[head_end + 4 + length:]
                continue
        assert time.monotonic() < deadline, "no complete answer in time"
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        buf += chunk
    assert len(out) == n, f"{len(out)} answers of {n}"
    return out


def exchange(url: str, data: bytes, n: int) -> tuple[list, bool]:
    """Send ``data`` in one write, read ``n`` answers; also whether the server then closed the connection."""
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=WAIT) as s:
        s.sendall(data)
        got = read_answers(s, n)
        s.settimeout(0.5)
        try:
            closed = s.recv(1) == b""
        except TimeoutError:
            closed = False
        return got, closed


def test_protocol_choice(fronts):
    class NoFront:
        batch_front = None
    assert protocol_for(NoFront()) == "auto"          # http_front="asgi": uvicorn's own protocol


def test_same_bytes_as_the_asgi_route_and_the_engine(fronts, engine):
    url_b, url_a = fronts
    with httpx.Client(base_url=url_b, timeout=WAIT) as cb, httpx.Client(base_url=url_a, timeout=WAIT) as ca:
        for r in REQUESTS:
            b, a = cb.post("/recommend", json=r), ca.post("/recommend", json=r)
            assert b.status_code == a.status_code == 200
            assert b.content == a.content
            assert b.headers["content-type"] == a.headers["content-type"] == "application/json"
            assert_same(b.json(), expected(engine, r))
        b, a = cb.post("/recommend", json=REQUESTS), ca.post("/recommend", json=REQUESTS)       # a list
        assert b.status_code == 200 and b.content == a.content
        for got, r in zip(b.json(), REQUESTS):
            assert_same(got, expected(engine, r))


def test_concurrent_calls_share_batches_and_get_their_own_rows(fronts, engine):
    """64 calls at once (single and list ones, different k: several Parts of one turn), each answered with its
    own rows; one call with an unknown id among them fails alone, naming the id."""
    url_b, _ = fronts
    calls = []
    for j in range(64):
        r = dict(REQUESTS[j % len(REQUESTS)])
        calls.append([r, REQUESTS[(j + 1) % len(REQUESTS)]] if j % 5 == 0 else r)
    calls[17] = {"history": ["i1", "no-such-item"], "k": 3}

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda body: post_json(url_b, body), calls))
    for body, ans in zip(calls, answers):
        if body is calls[17]:
            assert ans.status_code == 422 and "no-such-item" in ans.json()["error"]
        elif isinstance(body, list):
            assert ans.status_code == 200
            for got, r in zip(ans.json(), body):
                assert_same(got, expected(engine, r))
        else:
            assert ans.status_code == 200
            assert_same(ans.json(), expected(engine, body))


def test_pipelined_calls_answered_in_order(fronts, engine):
    """Four calls in one write on one connection: fast, ASGI (a GET), a body the fast path leaves to the route
    (its 422), fast again; answered in that order, the connection kept."""
    url_b, _ = fronts
    data = (post("/recommend", json.dumps(REQUESTS[0]).encode())
            + b"GET /v2/health/live HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"
            + post("/recommend", b'{"history": ["i1"], "k": "5"}')
            + post("/recommend", json.dumps(REQUESTS[2]).encode()))
    got, closed = exchange(url_b, data, 4)
    assert [g[0] for g in got] == [200, 200, 422, 200]
    assert_same(json.loads(got[0][2]), expected(engine, REQUESTS[0]))
    assert json.loads(got[1][2]) == {"live": True}
    assert "k" in json.loads(got[2][2])["error"]
    assert_same(json.loads(got[3][2]), expected(engine, REQUESTS[2]))
    assert not closed


def test_connection_close_and_http_1_0(fronts, engine):
    url_b, url_a = fronts
    for extra, version in (("connection: close\r\n", "1.1"), ("", "1.0")):
        data = post("/recommend", json.dumps(REQUESTS[1]).encode(), extra=extra, version=version)
        (b,), closed_b = exchange(url_b, data, 1)
        (a,), closed_a = exchange(url_a, data, 1)
        assert b[0] == a[0] == 200 and b[2] == a[2]
        assert b[1].get("connection") == a[1].get("connection") == "close"
        assert closed_b and closed_a
        assert_same(json.loads(b[2]), expected(engine, REQUESTS[1]))


def test_what_the_fast_path_leaves_to_the_routes(fronts, engine):
    """Each answered as through ASGI: a charset in the content type, Expect: 100-continue, a chunked body, a query
    string, a body over the limit, a list mixing k values, an empty list, bad JSON."""
    url_b, url_a = fronts
    body = json.dumps(REQUESTS[0]).encode()
    cases = [
        post("/recommend", body, ctype="application/json; charset=utf-8"),
        post("/recommend", body, extra="expect: 100-continue\r\n"),
        (b"POST /recommend HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
         + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"),
        post("/recommend?x=1", body),
        post("/recommend", json.dumps([REQUESTS[0], REQUESTS[1]]).encode()),
        post("/recommend", b"[]"),
        post("/recommend", b'{"history": ["i1"],'),
        post("/recommend", b'{"history": ["i1"], "k": 0}'),
    ]
    # over max_body_bytes by its Content-Length (refused before the body is read)
    cases.append(b"POST /recommend HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: "
                 + str((8 << 20) + 1).encode() + b"\r\n\r\n")
    statuses = []
    for data in cases:
        (b,), _ = exchange(url_b, data, 1)
        (a,), _ = exchange(url_a, data, 1)
        assert (b[0], b[2]) == (a[0], a[2]), data[:80]
        statuses.append(b[0])
    assert statuses == [200, 200, 200, 200, 200, 422, 422, 422, 413]
    for got in (json.loads(exchange(url_b, cases[i], 1)[0][0][2]) for i in (0, 1, 2, 3)):
        assert_same(got, expected(engine, REQUESTS[0]))


def test_fast_calls_are_counted(fronts):
    url_b, _ = fronts
    name = 'dpr_http_requests_total{route="/recommend",status="200"}'
    with httpx.Client(base_url=url_b, timeout=WAIT) as c:
        before = metric(c, name)
        for r in REQUESTS[:3]:
            assert c.post("/recommend", json=r).status_code == 200
        assert metric(c, name) == before + 3


def test_a_failure_while_answering_is_a_500_not_a_hang(fronts, engine, monkeypatch):
    """A fault in the front's own answer step (here: the renderer raising) answers that batch's calls with a 500
    naming it, and the next calls are served as before."""
    import dpr.serve.http_front as front_mod

    url_b, _ = fronts

    def broken(engine, res):
        raise RuntimeError("renderer fault injected by the test")
    monkeypatch.setattr(front_mod, "recommend_rows", broken)
    with httpx.Client(base_url=url_b, timeout=WAIT) as c:
        r = c.post("/recommend", json=REQUESTS[0])
        assert r.status_code == 500 and "renderer fault injected" in r.json()["error"]
        monkeypatch.undo()
        r = c.post("/recommend", json=REQUESTS[0])
        assert r.status_code == 200
        assert_same(r.json(), expected(engine, REQUESTS[0]))


def test_config_checks_its_front_fields():
    from dpr.serve.config import ServeConfig

    assert ServeConfig().check().http_front == "batched"
    with pytest.raises(InputError, match="http_front must be 'batched' or 'asgi'"):
        ServeConfig(http_front="fast").check()
    with pytest.raises(InputError, match="http_body_parser must be 'native' or 'python'"):
        ServeConfig(http_body_parser="rust").check()
    with pytest.raises(InputError, match="switch_interval_us must be >= 0"):
        ServeConfig(switch_interval_us=-1).check()


def _big(requests: list, k: int = 5) -> list:
    """Requests enough for a body over body_columns.MIN_BYTES (the native parser's), all with one k and
    exclude_history (a call mixing them is split by the Python path)."""
    from dpr.serve import body_columns

    out = [{**{f: v for f, v in r.items() if f != "exclude_history"}, "k": k} for r in requests
           if "hard_filter" not in r]
    while len(json.dumps(out, separators=(",", ":"))) < body_columns.MIN_BYTES:     # as httpx writes it
        out = out + out
    return out


@pytest.fixture
def native_reads(monkeypatch):
    """What ``body_columns.read`` answered for each call the front read (Cols or None), in order."""
    import dpr.serve.http_front as front_mod

    seen, real = [], front_mod.body_columns.read

    def spy(body, engine, cfg):
        got = real(body, engine, cfg)
        seen.append(got)
        return got
    monkeypatch.setattr(front_mod.body_columns, "read", spy)
    return seen


def test_large_bodies_are_read_natively_and_answered_as_the_asgi_route(fronts, engine, native_reads):
    """A large list is read by the native parser (no Python object per id; the Part in catalogue indices): the same
    bytes as the ASGI route, each row the engine's answer. Several at once, with small calls among them, share
    batches and each gets its own rows."""
    url_b, url_a = fronts
    big = _big(REQUESTS)
    with httpx.Client(base_url=url_b, timeout=WAIT) as cb, httpx.Client(base_url=url_a, timeout=WAIT) as ca:
        b, a = cb.post("/recommend", json=big), ca.post("/recommend", json=big)
    assert b.status_code == a.status_code == 200 and b.content == a.content
    assert len(native_reads) == 1 and native_reads[0] is not None and len(native_reads[0]) == len(big)
    assert native_reads[0].part.form == "indices"
    for got, r in zip(b.json(), big):
        assert_same(got, expected(engine, r))
    keep = [dict(r, exclude_history=False) for r in big]          # the history's items may come back
    with httpx.Client(base_url=url_b, timeout=WAIT) as cb, httpx.Client(base_url=url_a, timeout=WAIT) as ca:
        b, a = cb.post("/recommend", json=keep), ca.post("/recommend", json=keep)
    assert b.status_code == 200 and b.content == a.content and native_reads[-1] is not None
    assert native_reads[-1].part.exclude_history is False
    for got, r in zip(b.json(), keep):
        assert_same(got, expected(engine, r))
    del native_reads[:]
    calls = [big if j % 3 == 0 else (big[:7] if j % 3 == 1 else REQUESTS[j % len(REQUESTS)]) for j in range(24)]

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda body: post_json(url_b, body), calls))
    for body, ans in zip(calls, answers):
        assert ans.status_code == 200, ans.text
        for got, r in zip(ans.json() if isinstance(body, list) else [ans.json()], body if isinstance(body, list)
                          else [body]):
            assert_same(got, expected(engine, r))
    assert sum(r is not None for r in native_reads) == 8          # the 8 large bodies; the small ones never asked


def test_large_bodies_the_parser_declines_are_answered_as_the_asgi_route(fronts, native_reads):
    """Each refused or left to the Python path exactly as through ASGI (status and bytes): an unknown id, a k over
    the limit, a blank prompt, a history over the limit, a filter, k mixed within the call, a malformed body."""
    url_b, url_a = fronts
    big = _big(REQUESTS)
    cases = {
        "unknown id": [*big[:-1], {"history": ["i1", "no-such-item"], "k": 5}],
        "k over max_k": [dict(r, k=5000) for r in big],
        "blank prompt": [*big[:-1], {"history": ["i1"], "prompt": "   ", "k": 5}],
        "history over max_history": [*big[:-1], {"history": ["i1"] * 5000, "k": 5}],
        "a filter": [*big[:-1], {"history": ["i1"], "k": 5, "hard_filter": {"exclude_tags": ["comedy"]}}],
        "mixed k": [*big[:-1], {"history": ["i1"], "k": 2}],
        "malformed": None,
    }
    want_status = {"unknown id": 422, "k over max_k": 422, "blank prompt": 422, "history over max_history": 422,
                   "a filter": 200, "mixed k": 200, "malformed": 422}
    for name, body in cases.items():
        data = json.dumps(body).encode() if body is not None else json.dumps(big).encode()[:-1]
        (b,), _ = exchange(url_b, post("/recommend", data), 1)
        (a,), _ = exchange(url_a, post("/recommend", data), 1)
        assert (b[0], b[2]) == (a[0], a[2]), name
        assert b[0] == want_status[name], (name, b[2][:300])
        assert native_reads[-1] is None, name
    assert b"no-such-item" in exchange(url_b, post("/recommend", json.dumps(cases["unknown id"]).encode()), 1)[0][0][2]


def test_a_part_read_against_another_catalogue_is_mapped_again(engine):
    """A Part in indices of the engine that read it, run on another (a reload swapped them while it queued): its ids
    are mapped again, so it gets the answers its ids would (here the other catalogue lists the ids in another
    order, so the same indices would name other items)."""
    import numpy as np

    from dpr.serve.columns import Part, run_parts

    class Other:                                   # the old engine: only its catalogue matters
        item_ids = list(reversed(engine.item_ids))
    ids = [["i3", "i7", "i100"], ["i250"]]
    flat = [x for h in ids for x in h]
    other_index = {x: i + 1 for i, x in enumerate(Other.item_ids)}
    stale = Part(np.array([other_index[x] for x in flat], np.int64), [3, 1], ["something funny", None], None, 4,
                 form="indices", origin=Other())
    plain = Part(flat, [3, 1], ["something funny", None], None, 4)
    (got,), (want,) = run_parts(engine, [stale]), run_parts(engine, [plain])
    assert got.indices.tolist() == want.indices.tolist()
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-6)
    mine = Part(np.array([engine.item_ids.index(x) + 1 for x in flat], np.int64), [3, 1], ["something funny", None],
                None, 4, form="indices", origin=engine)
    assert run_parts(engine, [mine])[0].indices.tolist() == want.indices.tolist()


# ---- the v2 infer route ---------------------------------------------------------------------------------------
def _v2_binary(rows: list, prompts=None, k=None, outputs=None) -> tuple[bytes, str]:
    """The body tritonclient.http sends (binary tensors) and its Inference-Header-Content-Length."""
    th = pytest.importorskip("tritonclient.http")
    outs = [th.InferRequestedOutput(n, binary_data=b) for n, b in outputs] if outputs else None
    body, json_size = th.InferenceServerClient.generate_request_body(triton_inputs(th, rows, prompts, k),
                                                                     outputs=outs)
    return bytes(body), str(json_size if json_size is not None else len(body))


@pytest.fixture
def fast_v2(fronts, monkeypatch):
    """The v2 calls the batching front answers itself (its ``count`` callback, route and status), listed."""
    front = fronts.front
    seen = []
    inner = front.count

    def spy(metrics, route, code, t0):
        seen.append((route, code))
        inner(metrics, route, code, t0)
    monkeypatch.setattr(front, "count", spy)
    return seen


def _v2_cases():
    hist = [["i1", "i2", "i3"], ["i10"], ["i4", "i9", "i33", "i120", "i7"]]
    many = [[f"i{1 + (7 * r + j) % 400}" for j in range(1 + r % 30)] for r in range(120)]
    js = lambda b: (json.dumps(b).encode(), None)          # noqa: E731
    return [  # (what, body, inference-header-content-length, answered by the front)
        ("json, one row", *js(v2_body([["i1", "i2"]])), True),
        ("json, rows with prompts, one k", *js(v2_body(hist, ["something funny", None, "caf\u00e9 \u2603"],
                                                        k=[4, 4, 4])), True),
        ("json, outputs asked for, one binary", *js(v2_body(hist, k=[3, 3, 3], outputs=[
            {"name": "counts"}, {"name": "item_ids", "parameters": {"binary_data": True}}])), True),
        ("json, binary_data_output", *js(v2_body(hist, parameters={"binary_data_output": True})), True),
        ("binary, small", *_v2_binary(hist, ["more comedy", None, "no horror"], k=[5, 5, 5]), True),
        ("binary, large (the native reader)", *_v2_binary(many, [None, "something funny"] * 60), True),
        ("json, large (the native reader)", *js(v2_body(many, [None, "something funny"] * 60, k=[6] * 120)), True),
        ("binary, json outputs", *_v2_binary(hist, outputs=[("item_ids", False), ("scores", False)]), True),
        ("json, mixed k (the route splits it)", *js(v2_body(hist, k=[2, 3, 4])), False),
        ("json, an unknown id", *js(v2_body([["i1", "no-such-item"]])), False),
        ("json, k over max_k", *js(v2_body(hist, k=[5000] * 3)), False),
        ("json, an unknown output", *js(v2_body(hist, outputs=[{"name": "nope"}])), False),
        ("json, malformed", b'{"inputs": [', None, False),
    ]


def test_v2_calls_are_answered_by_the_front_as_by_the_asgi_route(fronts, engine, fast_v2, monkeypatch):
    """Each v2 call: the same status, headers and bytes from both fronts; the plain ones answered by the batching
    front itself (a refusal, a call the tensors split, an unknown output: by the route, as before)."""
    from dpr.serve import v2_columns

    url_b, url_a = fronts
    path = "/v2/models/dpr/infer"
    statuses = []
    json_reads = []                                  # the native JSON reader's calls that it took
    inner = v2_columns.read_json

    def read_json(*args):
        got = inner(*args)
        json_reads.append(got is not None)
        return got
    monkeypatch.setattr(v2_columns, "read_json", read_json)
    for what, body, hl, fast in _v2_cases():
        extra = f"inference-header-content-length: {hl}\r\n" if hl is not None else ""
        ctype = "application/octet-stream" if hl is not None else "application/json"
        before = len(fast_v2)
        json_reads.clear()
        (b,), _ = exchange(url_b, post(path, body, ctype, extra), 1)
        (a,), _ = exchange(url_a, post(path, body, ctype, extra), 1)
        assert (b[0], b[2]) == (a[0], a[2]), what
        for h in ("content-type", "inference-header-content-length", "content-length"):
            assert b[1].get(h) == a[1].get(h), (what, h)
        assert fast_v2[before:] == ([("/v2/models/{model}/infer", 200)] if fast else []), what
        # the native JSON reader takes every plain JSON call, small or large, through each front; it leaves the
        # others to the checked path (one whose unknown output only the answer finds is read by the batching front,
        # then again by the route it hands the call to)
        taken = 3 if what == "json, an unknown output" else 2 if hl is None and fast else 0
        assert json_reads.count(True) == taken, (what, json_reads)
        statuses.append(b[0])
    assert statuses == [200] * 9 + [422] * 4, statuses
    # the answers are the engine's: the JSON case with prompts
    hist, prompts = [["i1", "i2", "i3"], ["i10"], ["i4", "i9", "i33", "i120", "i7"]], ["something funny", None,
                                                                                     "caf\u00e9 \u2603"]
    with httpx.Client(base_url=url_b, timeout=WAIT) as c:
        out = {o["name"]: o for o in c.post(path, json=v2_body(hist, prompts, k=[4, 4, 4])).json()["outputs"]}
    for i, (h, p) in enumerate(zip(hist, prompts)):
        want = engine.recommend([h], prompts=[p], k=4)[0]
        assert out["item_ids"]["data"][4 * i:4 * i + 4] == want.item_ids


def test_concurrent_v2_and_recommend_calls_share_turns_and_get_their_own_rows(fronts, engine, fast_v2, monkeypatch):
    """v2 and /recommend calls arriving together (one turn may hold both: two Parts, two batches) each get their
    own rows; an unknown id in one v2 call fails that call alone."""
    url_b, _ = fronts
    front = fronts.front
    refused = []                  # the batches the engine refused (the unknown id's): their calls go to the route
    inner = front._answer

    def answer(calls, fut):
        if not fut.cancelled() and isinstance(fut.exception(), InputError):
            refused.append(len(calls))
        inner(calls, fut)
    monkeypatch.setattr(front, "_answer", answer)
    hist = [[f"i{1 + (5 * j + t) % 400}" for t in range(1 + j % 6)] for j in range(48)]

    def call(j):
        with httpx.Client(base_url=url_b, timeout=WAIT) as c:
            if j % 3 == 0:
                return c.post("/recommend", json={"history": hist[j], "k": 4})
            h = hist[j] if j != 20 else ["i1", "missing-id"]
            return c.post("/v2/models/dpr/infer", json=v2_body([h], k=[4]))
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(call, range(48)))
    for j, r in enumerate(answers):
        want = engine.recommend([hist[j]], k=4)[0].item_ids
        if j == 20:
            assert r.status_code == 422 and "missing-id" in r.json()["error"]
        elif j % 3 == 0:
            assert r.status_code == 200 and [i["id"] for i in r.json()["items"]] == want
        else:
            assert r.status_code == 200
            assert {o["name"]: o for o in r.json()["outputs"]}["item_ids"]["data"] == want
    # one batch failed, the unknown id's; which calls shared it is timing: they (and it) went to the route, which
    # answered each alone, and every other v2 call was answered by the front
    assert len(refused) == 1 and refused[0] >= 1
    assert sum(1 for route, code in fast_v2 if route == "/v2/models/{model}/infer" and code == 200) == 32 - refused[0]


def test_calls_merged_in_one_turn_never_make_a_batch_over_max_batch_size(export_dir, engine):
    """The front merges the calls of one event-loop turn into one Part, but never past ``max_batch_size`` rows (the
    batcher's rule: only one call alone may be bigger), so an engine call stays within the bound the operator set.
    Under max_batch_size 4, 12 one-row calls, 2 calls of 3 rows and one of 6 reach the service's loop in one turn
    (it is held busy while they are sent): the one-row calls are merged 4 at a time, the others go alone."""
    import asyncio

    body = [dict(REQUESTS[0], k=4), dict(REQUESTS[1], k=4), dict(REQUESTS[2], k=4)]
    calls = [dict(REQUESTS[j % 3], k=4) for j in range(12)] + [body, body, body + body]
    with live_service(export_dir, max_batch_size=4, preferred_batch_size=4) as (svc, url):
        parts, batches, loops = [], [], []
        submit, on_batch = svc.batcher.submit_async, svc.batcher.on_batch

        def spy_submit(part):
            parts.append(len(part))
            loops.append(asyncio.get_running_loop())
            return submit(part)

        def spy_batch(rows, seconds):
            batches.append(rows)
            on_batch(rows, seconds)
        svc.batcher.submit_async, svc.batcher.on_batch = spy_submit, spy_batch
        assert post_json(url, body).status_code == 200           # the service's loop, seen from inside
        parts.clear()
        batches.clear()
        socks = [socket.create_connection(("127.0.0.1", _port(url)), timeout=WAIT) for _ in calls]
        try:
            time.sleep(0.2)                                        # every connection accepted
            loops[0].call_soon_threadsafe(time.sleep, 0.5)         # the loop busy while the calls arrive
            time.sleep(0.05)
            for sock, b in zip(socks, calls):
                sock.sendall(post("/recommend", json.dumps(b).encode()))
            answers = [read_answers(sock, 1)[0] for sock in socks]
        finally:
            for sock in socks:
                sock.close()
    assert [a[0] for a in answers] == [200] * len(calls)
    for b, a in zip(calls, answers):
        got = json.loads(a[2])
        for g, r in zip(got if isinstance(b, list) else [got], b if isinstance(b, list) else [b]):
            assert_same(g, expected(engine, r))
    assert sum(parts) == 12 + 3 + 3 + 6
    assert 4 in parts                                              # calls were merged: the turn held several
    assert 6 in parts and all(n <= 4 for n in parts if n != 6), parts
    assert all(n <= 4 for n in batches if n != 6), batches
