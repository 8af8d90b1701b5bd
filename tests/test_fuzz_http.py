"""Generated bad input (hypothesis) against the real HTTP service (``dpr-serve``: a uvicorn subprocess on 127.0.0.1).

Malformed JSON, bodies cut short, raw NUL bytes and invalid UTF-8, one field of a valid ``/recommend`` request
given a wrong type or an impossible value (enormous k, unknown and non-string ids, blank and oversized
prompts, bad filters, unknown fields), and broken KServe v2 tensors. Every one must get a 4xx whose JSON
``error`` says what is wrong (naming the field, for a broken field), never a 5xx, a dropped connection or a hang
(every call has a timeout); and the service must answer a valid request right after, with the same answer as
before the fuzz. At the end the service's own ``/metrics`` must count no 5xx.

CI: derandomized, bounded example counts (about 1,000 bad requests, each followed by a valid one);
``DPR_FUZZ=long`` (``make fuzz``) multiplies the counts and draws new examples each run.
"""

from __future__ import annotations

import json
import re
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

httpx = pytest.importorskip("httpx", reason='needs the [serve] extra: pip install -e ".[serve]"')
pytest.importorskip("fastapi", reason='needs the [serve] extra: pip install -e ".[serve]"')

from dpr.serve.procs import Server, free_port  # noqa: E402




import dpr_tests_fuzz_strategies as fz  # noqa: E402 - tests/fuzz_strategies.py (conftest.py)

# small limits, so that generated values cross them cheaply
MAX_K, MAX_HISTORY, MAX_PROMPT, MAX_BODY, MAX_CALL = 50, 100, 512, 65536, 8
TIMEOUT_S = 15                       # one call; a hang fails the example instead of stalling CI
N_CUT, N_MUTATE, N_BYTES, N_FIELD, N_LIST, N_V2 = 120, 150, 100, 400, 80, 150
VALID = {"history": ["i1", "i2", "i3"], "prompt": "something funny", "k": 5}
FIELDS = ("history", "prompt", "negative_prompt", "k", "exclude_history", "hard_filter")


@pytest.fixture(scope="module")
def service(export_dir, tmp_path_factory):
    port = free_port()
    cmd = [sys.executable, "-P", "-m", "dpr.serve.cli", str(export_dir), "--port", str(port),
           "--log-level", "warning", "--backend", "onnxruntime", "--retriever", "onnxruntime",
           "--max-k", str(MAX_K), "--max-history", str(MAX_HISTORY), "--max-prompt-bytes", str(MAX_PROMPT),
           "--max-body-bytes", str(MAX_BODY), "--max-requests-per-call", str(MAX_CALL)]
    s = Server(cmd, port, log_path=tmp_path_factory.mktemp("fuzz-http") / "server.log").start()
    try:
        with httpx.Client(base_url=s.url, timeout=TIMEOUT_S) as c:
            r = c.post("/recommend", json=VALID)
            assert r.status_code == 200, r.text
            yield c, r.json(), s
            text = c.get("/metrics").text
        # (the readiness route answers 503 while the engine loads: the fixture polled it)
        fives = [ln for ln in text.splitlines() if ln.startswith("dpr_http_requests_total{")
                 and "/health/" not in ln and re.search(r'status="5\d\d"', ln) and float(ln.rsplit(" ", 1)[1]) > 0]
        assert not fives, fives
    finally:
        code = s.stop()
    assert code == 0, s.log()


@pytest.fixture(scope="module")
def catalogue(engine):
    return set(engine.item_ids), set(engine.tag_names)


def _post(c, route: str, body: bytes, ctype: str = "application/json"):
    return c.post(route, content=body, headers={"content-type": ctype})


def refused(r, route: str, body) -> str:
    """The refusal's message; fails unless the answer is a 4xx with a JSON ``error`` that says something."""
    assert 400 <= r.status_code < 500, (route, repr(body)[:300], r.status_code, r.text[:300])
    msg = r.json().get("error")
    assert isinstance(msg, str) and len(msg) >= 8, (route, repr(body)[:300], r.text[:300])
    return msg


def still_serving(c, want: dict) -> None:
    r = c.post("/recommend", json=VALID)
    assert r.status_code == 200 and r.json() == want, r.text[:300]


def names_field(msg: str, field: str) -> bool:
    """The message names ``field`` ("negative_prompt" and "negative prompt" alike, ``k`` as a word)."""
    m, f = msg.lower().replace("_", " "), field.lower().replace("_", " ")
    return re.search(rf"(^|[^a-z]){re.escape(f)}([^a-z]|$)", m) is not None


def dumps(obj) -> bytes:
    """JSON as a client sends it (lone surrogates escaped as \\udxxx: valid JSON text, a str the server must check)."""
    return json.dumps(obj, ensure_ascii=True).encode()


def v2_body(k: int = 5) -> dict:
    return {"id": "fuzz", "inputs": [
        {"name": "history", "datatype": "BYTES", "shape": [2, 2], "data": ["i1", "i2", "i3", ""]},
        {"name": "prompt", "datatype": "BYTES", "shape": [2, 1], "data": ["something funny", ""]},
        {"name": "k", "datatype": "INT32", "shape": [2, 1], "data": [k, k]}]}


ROUTES = st.sampled_from([("/recommend", dumps(VALID)), ("/recommend", dumps([VALID, dict(VALID, k=3)])),
                          ("/v2/models/dpr/infer", dumps(v2_body()))])


# ---- malformed bodies ----------------------------------------------------------------------------------------

def test_bodies_cut_short_are_refused(service):
    c, want, _ = service

    @fz.fuzz_settings(N_CUT)
    @given(route=ROUTES, frac=st.floats(0, 1, exclude_max=True))
    def run(route, frac):
        path, body = route
        cut = body[: int(len(body) * frac)]              # every proper prefix of a JSON object is not JSON
        refused(_post(c, path, cut), path, cut)
        still_serving(c, want)

    run()


def test_mutated_bodies_never_fail_the_server(service):
    """A byte replaced, inserted or removed (NUL, 0xff, quotes, brackets, digits...): the body may still be a
    valid request (200) or not (a 4xx with a message); never a 5xx or a hang."""
    c, want, _ = service
    byte = st.one_of(st.integers(0, 255), st.sampled_from(list(b'\x00\xff"{}[],:\\0123456789-e.')))

    @fz.fuzz_settings(N_MUTATE)
    @given(route=ROUTES, op=st.sampled_from(["replace", "insert", "delete"]), pos=st.floats(0, 1, exclude_max=True),
           b=byte)
    def run(route, op, pos, b):
        path, body = route
        i = int(len(body) * pos)
        new = {"replace": body[:i] + bytes([b]) + body[i + 1:], "insert": body[:i] + bytes([b]) + body[i:],
               "delete": body[:i] + body[i + 1:]}[op]
        r = _post(c, path, new)
        if r.status_code != 200:
            refused(r, path, new)
        still_serving(c, want)

    run()


def test_nul_bytes_invalid_utf8_and_odd_json_are_refused(service):
    """Raw bytes in a string value (invalid UTF-8, a raw NUL or control character), bare NaN / Infinity for k, a
    number of 5,000 digits, nesting 10^5 deep, a body that is not JSON at all: all a 4xx naming the problem."""
    c, want, _ = service
    raw = st.one_of(fz.BAD_UTF8.map(bytes), st.sampled_from([b"\x00", b"a\x00b", b"\x01", b"\n", b"\x1f"]))

    @fz.fuzz_settings(N_BYTES)
    @given(where=st.sampled_from(["prompt", "history", "negative_prompt", "v2-history"]), junk=raw)
    def run(where, junk):
        if where == "v2-history":
            path, body = "/v2/models/dpr/infer", dumps(v2_body()).replace(b'"i2"', b'"i2' + junk + b'"')
        elif where == "history":
            path, body = "/recommend", dumps(VALID).replace(b'"i2"', b'"i2' + junk + b'"')
        else:
            path, body = "/recommend", dumps(dict(VALID, **{where: "PLACE"})).replace(b"PLACE", junk)
        msg = refused(_post(c, path, body), path, body)
        # json.loads reads a UTF-8-encoded surrogate (ED A0 80) as a lone surrogate: then the field is refused
        assert re.search(r"JSON|UTF-8|utf-8|decode", msg) or names_field(msg, where.removeprefix("v2-")), msg
        still_serving(c, want)

    run()
    fixed = [
        (dumps(VALID).replace(b'"k": 5', b'"k": ' + w.encode()), "k") for w in ["NaN", "Infinity", "-Infinity", "1e999"]
    ] + [
        (dumps(VALID).replace(b'"k": 5', b'"k": 1' + b"0" * 5000), "JSON"),
        (b"[" * 60_000, "JSON"), (b'{"a":' * 12_000, "JSON"), (b"\x00" * 64, "JSON"), (b"\xef\xbb\xbf\xff", "JSON"),
        (b"null", "body"), (b"3", "body"), (b'"history"', "body"), (b"{}", "history"),
    ]
    for body, word in fixed:
        for path in ("/recommend", "/v2/models/dpr/infer"):
            msg = refused(_post(c, path, body), path, body)
            if path == "/recommend":
                assert word in msg, (body[:60], msg)
            still_serving(c, want)
    msg = refused(_post(c, "/recommend", dumps(VALID), "text/plain"), "/recommend", "text/plain")
    still_serving(c, want)


# ---- one field of a valid /recommend request broken ----------------------------------------------------------

def bad_fields(known_ids: set, known_tags: set):
    """(field, value) pairs: each value is one no request may carry in that field."""
    ids = sorted(known_ids)
    unknown_id = fz.WEIRD_TEXT.filter(lambda s: s not in known_ids)
    not_string = fz.NOT_A_STRING.filter(lambda v: v is not None)
    history = st.one_of(
        fz.NOT_A_LIST, st.just([]),
        st.tuples(st.lists(st.sampled_from(ids), max_size=4), fz.NOT_A_STRING, st.integers(0, 4)).map(
            lambda t: t[0][:t[2]] + [t[1]] + t[0][t[2]:]),
        st.tuples(st.lists(st.sampled_from(ids), max_size=4), unknown_id).map(lambda t: t[0] + [t[1]]),
        st.integers(MAX_HISTORY + 1, MAX_HISTORY + 40).map(lambda n: [ids[i % len(ids)] for i in range(n)]))
    prompt = st.one_of(not_string, fz.BLANK, fz.LONE_SURROGATE,
                       st.integers(MAX_PROMPT + 1, 3 * MAX_PROMPT).map(lambda n: "é" * (n // 2 + 1)))
    unknown_tag = fz.WEIRD_TEXT.filter(lambda s: s not in known_tags)
    hard_filter = st.one_of(
        not_string.filter(lambda v: not isinstance(v, dict)), fz.WEIRD_TEXT,
        st.sampled_from(["include_tags", "exclude_tags", "exclude_items"]).flatmap(lambda key: st.one_of(
            fz.NOT_A_LIST.filter(lambda v: not isinstance(v, list)).map(lambda v: {key: v}),
            st.lists(not_string, min_size=1, max_size=2).map(lambda v: {key: v}),
            (unknown_id if key == "exclude_items" else unknown_tag).map(lambda v: {key: [v]}))),
        st.dictionaries(st.text(max_size=8).filter(
            lambda s: s not in ("include_tags", "exclude_tags", "exclude_items")), st.lists(st.text(max_size=3)),
            min_size=1, max_size=2))
    return st.one_of(
        history.map(lambda v: ("history", v)), fz.bad_json_k(MAX_K).map(lambda v: ("k", v)),
        fz.NOT_A_BOOL.map(lambda v: ("exclude_history", v)), prompt.map(lambda v: ("prompt", v)),
        prompt.map(lambda v: ("negative_prompt", v)), hard_filter.map(lambda v: ("hard_filter", v)),
        st.tuples(st.text(min_size=1, max_size=8).filter(lambda s: s not in FIELDS), fz.JSON_VALUES))


def test_a_broken_field_is_refused_naming_it(service, catalogue):
    c, want, _ = service
    seen = set()

    @fz.fuzz_settings(N_FIELD)
    @given(broken=bad_fields(*catalogue))
    def run(broken):
        field, value = broken
        body = dumps(dict(VALID, **{field: value}))
        msg = refused(_post(c, "/recommend", body), "/recommend", body)
        if len(body) <= MAX_BODY:
            assert names_field(msg, field), (field, repr(value)[:200], msg)
        seen.add(field if field in FIELDS else "unknown field")
        still_serving(c, want)

    run()
    assert seen == set(FIELDS) | {"unknown field"}, seen


def test_a_broken_request_in_a_list_is_refused_naming_it(service, catalogue):
    c, want, _ = service

    @fz.fuzz_settings(N_LIST)
    @given(broken=bad_fields(*catalogue), n=st.integers(2, MAX_CALL), row=st.integers(0, MAX_CALL - 1))
    def run(broken, n, row):
        field, value = broken
        row = row % n
        reqs = [dict(VALID, k=1 + i % 5) for i in range(n)]
        reqs[row] = dict(reqs[row], **{field: value})
        body = dumps(reqs)
        msg = refused(_post(c, "/recommend", body), "/recommend", body)
        assert names_field(msg, field) and str(row) in msg, (row, field, repr(value)[:200], msg)
        still_serving(c, want)

    run()
    body = dumps([VALID] * (MAX_CALL + 1))
    assert "--max-requests-per-call" in refused(_post(c, "/recommend", body), "/recommend", body)


# ---- KServe v2 tensors broken -----------------------------------------------------------------------------------

def test_broken_v2_tensors_are_refused(service, catalogue):
    c, want, _ = service
    known_ids, _ = catalogue
    member = st.sampled_from(["name", "datatype", "shape", "data", "drop"])
    bad = {
        "name": st.one_of(fz.NOT_A_STRING, fz.WEIRD_TEXT.filter(lambda s: s not in ("history", "prompt", "k"))),
        "datatype": st.one_of(fz.NOT_A_STRING, st.sampled_from(["FP32", "INT8", "BOOL", "FP16", "STRING", ""])),
        "shape": st.one_of(fz.NOT_A_LIST, st.lists(st.integers(-3, 10 ** 12), max_size=4),
                           st.lists(fz.JSON_SCALARS, min_size=1, max_size=3)),
        "data": st.one_of(fz.NOT_A_LIST, st.lists(fz.JSON_SCALARS, max_size=5),
                          st.lists(fz.WEIRD_TEXT.filter(lambda s: s and s not in known_ids), min_size=4,
                                   max_size=4)),
    }

    @fz.fuzz_settings(N_V2)
    @given(which=st.integers(0, 2), part=member, data=st.data(), k=st.one_of(
        st.integers(max_value=0), st.integers(MAX_K + 1, 2 ** 31 - 1)))
    def run(which, part, data, k):
        body = v2_body()
        inp = body["inputs"][which]
        if part == "drop":
            if inp["name"] == "k":                  # k is optional: an impossible k instead
                inp["data"] = [k, k]
            else:
                del body["inputs"][which]
                if inp["name"] == "prompt":         # prompt is optional: drop history instead
                    body["inputs"] = [i for i in body["inputs"] if i["name"] != "history"]
        else:
            value = fz.never_valid(inp, part, data.draw(bad[part]))
            inp[part] = value
        raw = dumps(body)
        r = _post(c, "/v2/models/dpr/infer", raw)
        if r.status_code == 200:   # a change the protocol allows (k as INT8, a BOOL prompt mask...) is an answer
            assert part in ("datatype", "shape", "data"), raw[:300]
        else:
            refused(r, "/v2/models/dpr/infer", raw)
        still_serving(c, want)

    run()
