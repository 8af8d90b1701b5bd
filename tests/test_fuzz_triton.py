"""Generated bad input (hypothesis) against a real tritonserver (nvidia-pytriton's, in .venv-triton, started as
tests/test_serve_triton.py does, once for the module, on 127.0.0.1) serving the tiny export through the backend
``dpr-serve --triton`` picks (the native one, ``libtriton_dpr.so``, where it builds; else ``dpr.serve.triton_python``). KServe v2 bodies, JSON and binary (tritonclient's form): cut short, a byte changed;
tensors with a wrong name, datatype, shape or data, ragged data, batch sizes that disagree, BYTES length prefixes
that overrun or split; invalid UTF-8, NUL and control bytes in BYTES tensors; one row of a request broken (k out of
range, unknown ids and tags, empty, over-long or holed histories, blank or oversized prompts, too many rows).
Each must get an error saying what is wrong: a 4xx, or for a body Triton's C++ front end cannot parse its 500 with
the parser's words (nothing of ours runs); never another 5xx, never a hang (every call has a timeout); a valid
request right after is answered exactly as before; valid generated requests get the in-process engine's answer.
CI: derandomized, about 350 bad requests; ``DPR_FUZZ=long`` multiplies the counts and draws new ones.
"""

from __future__ import annotations

import json
import os
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dpr.serve.procs import Server, free_ports

REPO = Path(__file__).resolve().parents[1]
TRITON_PY = Path(os.environ.get("DPR_TRITON_PYTHON", REPO / ".venv-triton" / "bin" / "python"))
pytestmark = pytest.mark.skipif(not TRITON_PY.exists(), reason=f"no Triton environment at {TRITON_PY}: `make "
                                "triton-env` builds it (needs Debian's python3.11; README Serving)")
httpx = pytest.importorskip("httpx", reason='needs the [serve] extra: pip install -e ".[serve]"')
th = pytest.importorskip("tritonclient.http", reason='needs the [serve] extra (tritonclient)')




import dpr_tests_fuzz_strategies as fz  # noqa: E402 - tests/fuzz_strategies.py (conftest.py)

# small limits, so that generated values cross them cheaply; Triton's max_batch_size above the model's row limit,
# so that both refusals are reached
MAX_K, MAX_HISTORY, MAX_PROMPT, MAX_CALL, MAX_BATCH = 50, 100, 512, 8, 16
TIMEOUT_S = 15                       # one call; a hang fails the example instead of stalling CI
N_CUT, N_MUTATE, N_BYTES, N_TENSOR, N_ROW, N_VALID, N_MIXED = 50, 60, 60, 90, 70, 30, 8
# Triton's HTTP front end (C++) answers a body it cannot parse with 500 and the parser's words; the model never saw it
PARSER_500 = re.compile(r"^(failed to parse the request JSON buffer|Unable to parse |failed to get request params)")
PROMPT = "something funny"
VALID_ROWS = (["i1", "i2", "i3"], ["i10"])
STATUS: dict = {}                    # status code -> count, printed at the end (the docs' figures)


def v2_json(k: int = 5) -> dict:
    return {"inputs": [
        {"name": "history", "datatype": "BYTES", "shape": [2, 3], "data": ["i1", "i2", "i3", "i10", "", ""]},
        {"name": "prompt", "datatype": "BYTES", "shape": [2, 1], "data": [PROMPT, ""]},
        {"name": "k", "datatype": "INT32", "shape": [2, 1], "data": [k, k]}]}


def bytes_data(elems) -> bytes:
    """Triton's serialized BYTES: a little-endian uint32 length before each element."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elems)


def binary_body(tensors: list) -> tuple[bytes, int]:
    """(body, header length) of Triton's binary tensor extension; ``tensors``: (name, datatype, shape, raw data)."""
    header = {"inputs": [{"name": n, "datatype": dt, "shape": shape, "parameters": {"binary_data_size": len(raw)}}
                         for n, dt, shape, raw in tensors]}
    h = json.dumps(header).encode()
    return h + b"".join(raw for *_, raw in tensors), len(h)


def v2_binary() -> list:
    return [("history", "BYTES", [2, 3], bytes_data([b"i1", b"i2", b"i3", b"i10", b"", b""])),
            ("prompt", "BYTES", [2, 1], bytes_data([PROMPT.encode(), b""])),
            ("k", "INT32", [2, 1], np.array([5, 5], np.int32).tobytes())]


def start_triton(export_dir, d):
    """tritonserver on a repository pointing at the tests' export (ONNX Runtime, as the ``engine`` fixture), with
    the small limits, ready."""
    from dpr.serve.config import ServeConfig
    from dpr.serve.triton_repo import write_repository

    cfg = ServeConfig(backend="onnxruntime", retriever="onnxruntime", max_k=MAX_K, max_history=MAX_HISTORY,
                      max_prompt_bytes=MAX_PROMPT, max_requests_per_call=MAX_CALL, max_batch_size=MAX_BATCH,
                      preferred_batch_size=MAX_BATCH)
    write_repository(d / "repo", export_dir, cfg, copy_export=False, python=TRITON_PY)
    http, grpc, metrics = free_ports(3)
    cmd = [str(TRITON_PY), "-P", "-m", "dpr.serve.triton_server", str(d / "repo"), "--port", str(http),
           "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return Server(cmd, http, env=env, log_path=d / "triton.log", ports=(grpc, metrics)).start(180)


@pytest.fixture(scope="module")
def triton(export_dir, engine, tmp_path_factory):
    """Yields (httpx client on the model's routes, the valid request's JSON answer, the Server)."""
    s = start_triton(export_dir, tmp_path_factory.mktemp("fuzz-triton"))
    try:
        with httpx.Client(base_url=s.url + "/v2/models/dpr", timeout=TIMEOUT_S) as c:
            r = c.post("/infer", content=json.dumps(v2_json()))
            assert r.status_code == 200, r.text
            want = r.json()
            out = {o["name"]: o["data"] for o in want["outputs"]}
            exp = engine.recommend(list(VALID_ROWS), prompts=[PROMPT, None], k=5)
            assert out["item_ids"] == [i for row in exp.item_ids for i in row]
            np.testing.assert_allclose(out["scores"], np.ravel(exp.scores), rtol=1e-5, atol=1e-5)
            yield c, want, s
    finally:
        code = s.stop()
        print(f"\nTriton fuzz: HTTP statuses {dict(sorted(STATUS.items()))}")
    assert code == 0, s.log()
    assert "Traceback" not in s.log(10 ** 7), s.log()       # no exception escaped the model


def post(c, body: bytes, header_len: int | None = None):
    headers = {"content-type": "application/octet-stream" if header_len is not None else "application/json"}
    if header_len is not None:
        headers["Inference-Header-Content-Length"] = str(header_len)
    if os.environ.get("DPR_FUZZ_TRACE"):             # a body that kills the server is on disk (hypothesis cannot
        Path(os.environ["DPR_FUZZ_TRACE"]).write_bytes(f"{header_len}\n".encode() + body)   # replay it then)
    r = c.post("/infer", content=body, headers=headers)
    STATUS[r.status_code] = STATUS.get(r.status_code, 0) + 1
    return r


def refused(r, body) -> str:
    """The refusal's message: a 4xx with a JSON ``error`` that says something, or Triton's parser 500."""
    # Triton echoes a bad input name as it came, invalid UTF-8 included: its error body is then not UTF-8 JSON
    text = r.content.decode("utf-8", "replace")
    msg = json.loads(text).get("error") if r.headers.get("content-type", "").startswith("application/json") else text
    assert isinstance(msg, str) and len(msg) >= 8, (repr(body)[:300], r.status_code, r.text[:300])
    if r.status_code == 500:
        assert PARSER_500.match(msg), ("a 5xx that is not Triton's parser", repr(body)[:300], msg)
    else:
        assert 400 <= r.status_code < 500, (repr(body)[:300], r.status_code, msg)
    return msg


def still_serving(c, want: dict) -> None:
    r = c.post("/infer", content=json.dumps(v2_json()))
    assert r.status_code == 200 and r.json() == want, r.text[:300]


def ranking_matches(result, engine, histories, prompts, k, **options) -> None:
    from dpr.bench.soak import same_ranking

    exp = engine.recommend(histories, prompts=prompts, k=k, **options)
    ids, scores = result.as_numpy("item_ids"), result.as_numpy("scores")
    counts = result.as_numpy("counts").ravel().tolist()
    assert counts == list(exp.counts)
    for r, n in enumerate(counts):
        got = [x.decode() for x in ids[r, :n]]
        assert same_ranking(got, scores[r, :n].tolist(), exp.item_ids[r], list(exp.scores[r])), \
            (r, got, exp.item_ids[r])


# ---- malformed bodies -------------------------------------------------------------------------------------------

FORMS = st.sampled_from(["json", "binary"])


def valid_body(form: str) -> tuple[bytes, int | None]:
    return (json.dumps(v2_json()).encode(), None) if form == "json" else binary_body(v2_binary())


def test_bodies_cut_short_or_mutated_never_fail_the_model(triton):
    """A body cut at any byte (refused), or a byte replaced, inserted or removed anywhere (JSON or binary, length
    prefixes included: an answer or a refusal); never a 5xx of the model or a hang."""
    c, want, _ = triton
    byte = st.one_of(st.integers(0, 255), st.sampled_from(list(b'\x00\xff"{}[],:\\0123456789-e.')))

    @fz.fuzz_settings(N_CUT + N_MUTATE)
    @given(form=FORMS, op=st.sampled_from(["cut", "replace", "insert", "delete"]),
           pos=st.floats(0, 1, exclude_max=True), b=byte)
    def run(form, op, pos, b):
        body, hl = valid_body(form)
        i = int(len(body) * pos)
        new = {"cut": body[:i], "replace": body[:i] + bytes([b]) + body[i + 1:],
               "insert": body[:i] + bytes([b]) + body[i:], "delete": body[:i] + body[i + 1:]}[op]
        r = post(c, new, hl)
        if r.status_code != 200 or op == "cut":      # every proper prefix of a body is refused
            refused(r, new)
        still_serving(c, want)

    run()


# ---- raw bytes in BYTES tensors ---------------------------------------------------------------------------------

def test_invalid_utf8_nul_and_control_bytes_in_bytes_tensors(triton, engine):
    """Invalid UTF-8 anywhere: refused naming the input (or, in JSON, Triton's parser). A NUL or control
    character in a prompt is text: answered as the engine answers it; in an item id or a tag it is unknown."""
    c, want, _ = triton
    junk = st.one_of(fz.BAD_UTF8.map(bytes), st.sampled_from([b"\x00", b"a\x00b", b"\x01", b"\n", b"\x1f"]))
    where = st.sampled_from(["prompt", "negative_prompt", "history", "include_tags", "exclude_items"])

    @fz.fuzz_settings(N_BYTES)
    @given(where=where, junk=junk, form=FORMS)
    def run(where, junk, form):
        text = {"prompt": b"some" + junk, "negative_prompt": b"no" + junk, "history": b"i2" + junk,
                "include_tags": b"comedy" + junk, "exclude_items": b"i7" + junk}[where]
        if form == "binary":
            tensors = v2_binary()
            if where == "history":
                tensors[0] = ("history", "BYTES", [2, 3], bytes_data([b"i1", text, b"i3", b"i10", b"", b""]))
            elif where == "prompt":
                tensors[1] = ("prompt", "BYTES", [2, 1], bytes_data([text, b""]))
            else:
                tensors.append((where, "BYTES", [2, 1], bytes_data([b"", text])))
            body, hl = binary_body(tensors)
        else:
            doc = v2_json()
            if where == "history":
                doc["inputs"][0]["data"][1] = "@@X@@"
            elif where == "prompt":
                doc["inputs"][1]["data"][0] = "@@X@@"
            else:
                doc["inputs"].append({"name": where, "datatype": "BYTES", "shape": [2, 1], "data": ["", "@@X@@"]})
            body, hl = json.dumps(doc).encode().replace(b"@@X@@", text), None
        r = post(c, body, hl)
        if fz.decodes(text) and where in ("prompt", "negative_prompt") and (form == "binary" or r.status_code == 200):
            # text with a NUL or control character is a prompt (JSON carries one raw only if its parser lets it)
            assert r.status_code == 200, (where, text, r.text[:300])
            pr = [text.decode(), None] if where == "prompt" else [PROMPT, None]
            ng = [None, text.decode()] if where == "negative_prompt" else None
            exp = engine.recommend(list(VALID_ROWS), prompts=pr, negative_prompts=ng, k=5)
            out = {o["name"]: o["data"] for o in r.json()["outputs"]}
            assert out["item_ids"] == [i for row in exp.item_ids for i in row], (text, out["item_ids"])
        else:
            msg = refused(r, body)
            row = "row 1" if where in ("include_tags", "exclude_items") else "row 0"
            assert re.search(r"UTF-8|JSON|parse", msg) or where in msg or \
                (row in msg and re.search(r"unknown (item id|tag)", msg)), (where, text, msg)
        still_serving(c, want)

    run()


# ---- tensors broken ---------------------------------------------------------------------------------------------

def test_broken_tensors_are_refused(triton, catalogue):
    """One input's name, datatype, shape or data wrong, an input dropped or repeated, batch sizes that disagree; in
    the binary form, length prefixes that overrun or split and sizes that disagree with the data."""
    c, want, _ = triton
    known_ids, _ = catalogue
    bad = {
        "name": st.one_of(fz.NOT_A_STRING, fz.WEIRD_TEXT.filter(lambda s: s not in ("history", "prompt", "k"))),
        "datatype": st.one_of(fz.NOT_A_STRING, st.sampled_from(["FP32", "INT8", "INT64", "BOOL", "FP16", "STRING",
                                                                "UINT32", "BF16", ""])),
        "shape": st.one_of(fz.NOT_A_LIST, st.lists(st.integers(-3, 10 ** 12), max_size=4),
                           st.lists(fz.JSON_SCALARS, min_size=1, max_size=3)),
        "data": st.one_of(fz.NOT_A_LIST, st.lists(fz.JSON_SCALARS, max_size=7),
                          st.lists(fz.WEIRD_TEXT.filter(lambda s: s and s not in known_ids), min_size=6, max_size=6),
                          st.just([["i1", "i2", "i3"], ["i10"]])),      # ragged nested rows
    }
    @fz.fuzz_settings(N_TENSOR)
    @given(form=FORMS, which=st.integers(0, 2), part=st.sampled_from(["name", "datatype", "shape", "data", "drop",
                                                                     "repeat", "rows"]),
           damage=st.sampled_from(["prefix", "size", "shape", "split", "header"]),
           n=st.integers(-(2 ** 31), 2 ** 32 - 1), data=st.data())
    def run(form, which, part, damage, n, data):
        if form == "binary":
            tensors = v2_binary()
            name, dt, shape, raw = tensors[0]
            if damage == "prefix":            # one element's length prefix overruns (or shortens) the data
                at = data.draw(st.sampled_from([0, 6, 12, 18, 25]))
                raw = raw[:at] + struct.pack("<I", n % 2 ** 32) + raw[at + 4:]
            elif damage == "size":            # binary_data_size disagrees with what follows (cut, or zeros)
                raw = raw + b"\x00" * (n % 7 + 1)
            elif damage == "shape":           # shape promises another number of elements
                shape = data.draw(st.sampled_from([[2, 2], [2, 4], [3, 3], [1, 6], [6, 1], [2, 3, 1], [12]]))
            elif damage == "split":           # a length prefix cut by the end of the tensor
                raw = raw + b"\x02\x00"
            tensors[0] = (name, dt, shape, raw)
            body, hl = binary_body(tensors)
            body = body[:-(n % 7 + 1)] if damage == "size" and n % 2 else body
            if damage == "header":
                hl += data.draw(st.sampled_from([-1, 1, -hl, len(body), -10 ** 6, 10 ** 9]))
            r = post(c, body, hl)
            if r.status_code != 200:          # a prefix that still fits is a valid (other) request
                refused(r, body)
            else:
                assert damage in ("prefix", "shape"), (damage, body[:200])
            still_serving(c, want)
            return
        doc = v2_json()
        inp = doc["inputs"][which]
        if part == "drop":                    # history is the one required input
            doc["inputs"] = [i for i in doc["inputs"] if i["name"] != "history"]
        elif part == "repeat":
            doc["inputs"].append(dict(inp))
        elif part == "rows":                  # this input's batch size disagrees with the others'
            inp["shape"] = [3] + inp["shape"][1:]
            inp["data"] = inp["data"] + inp["data"][: len(inp["data"]) // 2]
        else:
            value = fz.never_valid(inp, part, data.draw(bad[part]))
            if part == "shape" and inp["datatype"] != "BYTES" and isinstance(value, list):
                # Triton allocates a non-BYTES JSON input's whole buffer from its shape before any check: 2 x 10^12
                # aborts it (test_a_huge_json_shape_does_not_abort_tritonserver), 2 x 10^9 would take 8 GB here;
                # at most 30 per dimension (4 dimensions: 3 MB)
                value = [min(v, 30) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
            inp[part] = value
        raw = json.dumps(doc).encode()
        r = post(c, raw)
        if r.status_code == 200:      # still fits: nested data of the right count, prompt renamed negative_prompt
            assert part in ("data", "name"), raw[:300]
        else:
            refused(r, raw)
        still_serving(c, want)

    run()


@pytest.fixture(scope="module")
def catalogue(engine):
    return set(engine.item_ids), set(engine.tag_names)


# ---- one row of a well-formed request broken ----------------------------------------------------------------------

def test_a_broken_row_is_refused_naming_it(triton, catalogue):
    """tritonclient's binary tensors, 1-MAX_CALL rows, one row broken: the error names the row and the field."""
    c, want, s = triton
    known_ids, known_tags = catalogue
    ids = sorted(known_ids)
    text = fz.WEIRD_TEXT.filter(lambda x: x and fz.decodes(x.encode("utf-8", "surrogatepass"))   # no lone surrogate
                                and x not in known_ids and x not in known_tags)
    broken = st.one_of(
        st.integers(-(2 ** 31), 0).map(lambda v: ("k", v, r"k must be >= 1")),
        st.integers(MAX_K + 1, 2 ** 31 - 1).map(lambda v: ("k", v, r"over the limit .*--max-k")),
        text.map(lambda v: ("history", v, r"unknown item id")),
        st.just(("history", "", r"history is empty")),
        st.integers(1, 3).map(lambda v: ("history", -v, r"empty string at position 1 between item ids")),
        st.integers(MAX_HISTORY + 1, MAX_HISTORY + 30).map(lambda v: ("history", v, r"limit is \d+ \(--max-history")),
        fz.BLANK.filter(lambda v: v != "").map(lambda v: ("prompt", v, r"prompt is empty or whitespace")),
        st.integers(MAX_PROMPT // 2 + 1, MAX_PROMPT).map(lambda v: ("prompt", "é" * v, r"--max-prompt-bytes")),
        text.map(lambda v: ("include_tags", v, r"unknown tag")),
        text.map(lambda v: ("exclude_items", v, r"unknown item id")))
    client = th.InferenceServerClient(s.url.removeprefix("http://"), connection_timeout=TIMEOUT_S,
                                      network_timeout=TIMEOUT_S)

    @fz.fuzz_settings(N_ROW)
    @given(case=broken, n=st.integers(1, MAX_CALL), row=st.integers(0, MAX_CALL - 1))
    def run(case, n, row):
        field, value, words = case
        row = row % n
        hist = [[ids[(3 * i + j) % len(ids)] for j in range(1 + i % 3)] for i in range(n)]
        ks, prompts, extra = [5] * n, [b""] * n, None
        if field == "k":
            ks[row] = value
        elif field == "history":
            hist[row] = ([] if value == "" else [ids[1], value] if isinstance(value, str) else
                         [ids[0]] * value if value > 0 else [ids[1]] + [""] * -value + [ids[2]])   # < 0: a hole
        elif field == "prompt":
            prompts[row] = value.encode()
        else:
            extra = np.array([[value.encode() if r == row else b""] for r in range(n)], dtype=object)
        width = max(1, max(len(h) for h in hist))
        h = np.array([[x.encode() for x in r] + [b""] * (width - len(r)) for r in hist], dtype=object)
        ins = [th.InferInput("history", list(h.shape), "BYTES"), th.InferInput("prompt", [n, 1], "BYTES"),
               th.InferInput("k", [n, 1], "INT32")]
        ins[0].set_data_from_numpy(h)
        ins[1].set_data_from_numpy(np.array(prompts, dtype=object).reshape(n, 1))
        ins[2].set_data_from_numpy(np.array(ks, np.int32).reshape(n, 1))
        if extra is not None:
            ins.append(th.InferInput(field, [n, 1], "BYTES"))
            ins[-1].set_data_from_numpy(extra)
        with pytest.raises(th.InferenceServerException) as ei:
            client.infer("dpr", ins)
        msg = str(ei.value)
        assert ei.value.status() == "400", (field, value, msg)
        assert re.search(rf"\brow {row}\b", msg) and re.search(words, msg), (row, field, repr(value)[:100], msg)
        still_serving(c, want)

    try:
        run()
        h = np.array([[b"i1"]] * (MAX_CALL + 1), dtype=object)
        ins = [th.InferInput("history", list(h.shape), "BYTES")]
        ins[0].set_data_from_numpy(h)
        with pytest.raises(th.InferenceServerException, match="--max-requests-per-call"):
            client.infer("dpr", ins)
    finally:
        client.close()


@pytest.mark.xfail(strict=True, reason="Triton 2.51's HTTP front end wraps a JSON integer into INT32 before the "
                                        "model sees it (2^32 + 5 arrives as 5); the binary form cannot carry one")
def test_a_json_k_beyond_int32_is_refused(triton):
    c, want, _ = triton
    body = json.dumps(v2_json(k=2 ** 32 + 5)).encode()
    refused(post(c, body), body)


@pytest.mark.xfail(strict=True, reason="Triton 2.51's HTTP front end allocates a non-BYTES JSON input's buffer from "
                                        "its shape before checking it: 2 x 10^12 INT32 aborts tritonserver (bad_alloc)")
def test_a_huge_json_shape_does_not_abort_tritonserver(export_dir, tmp_path):
    s = start_triton(export_dir, tmp_path)           # its own server: the module's must survive this test
    try:
        doc = v2_json()
        doc["inputs"][2]["shape"] = [2, 10 ** 12]
        with httpx.Client(base_url=s.url, timeout=TIMEOUT_S) as c:
            try:
                r = c.post("/v2/models/dpr/infer", content=json.dumps(doc))
            except httpx.TransportError:
                r = None                               # the connection dropped: tritonserver aborted
            assert r is not None, s.log()
            refused(r, doc)
    finally:
        s.stop()


# ---- valid requests, alone and mixed with bad ones in Triton's batches ---------------------------------------------

PROMPTS = ["something funny", None, "no horror\x00 tonight", "more comedy", "ça va, 日本語 ✓"]


def _inputs(ids, rows, k, excl=None, bad_row=None):
    """tritonclient inputs: rows of catalogue positions, a prompt per row from PROMPTS; row ``bad_row`` gets an
    unknown id."""
    hist = [[ids[j] for j in row] + ([f"no-such-{r}"] if r == bad_row else []) for r, row in enumerate(rows)]
    prompts = [PROMPTS[len(r) % len(PROMPTS)] for r in rows]
    width = max(len(r) for r in hist)
    h = np.array([[x.encode() for x in r] + [b""] * (width - len(r)) for r in hist], dtype=object)
    cols = [("history", "BYTES", h), ("prompt", "BYTES", np.array([(p or "").encode() for p in prompts], dtype=object)),
            ("k", "INT32", np.full(len(hist), k, np.int32))]
    if excl is not None:
        cols.append(("exclude_history", "BOOL", np.full(len(hist), excl, np.bool_)))
    ins = []
    for name, dt, arr in cols:
        arr = arr.reshape(len(hist), -1)
        ins.append(th.InferInput(name, list(arr.shape), dt))
        ins[-1].set_data_from_numpy(arr)
    return ins, hist, prompts


def test_valid_generated_requests_get_the_engines_answer(triton, engine):
    _, _, s = triton
    ids = list(engine.item_ids)
    client = th.InferenceServerClient(s.url.removeprefix("http://"), network_timeout=TIMEOUT_S)

    @fz.fuzz_settings(N_VALID)
    @given(rows=st.lists(st.lists(st.integers(0, len(ids) - 1), min_size=1, max_size=20), min_size=1,
                         max_size=MAX_CALL), k=st.integers(1, MAX_K), excl=st.booleans())
    def run(rows, k, excl):
        ins, hist, prompts = _inputs(ids, rows, k, excl)
        ranking_matches(client.infer("dpr", ins), engine, hist, prompts, k, exclude_history=excl)

    try:
        run()
    finally:
        client.close()


def test_bad_requests_fail_alone_in_tritons_batches(triton, engine):
    """Valid and broken requests sent at once (Triton's dynamic batcher hands the model several per execute): each
    broken one gets its own refusal, each valid one its own answer."""
    _, _, s = triton
    ids = list(engine.item_ids)

    def send(req):
        # a client per call, made in the thread that uses it (geventhttpclient binds a client to its thread's hub)
        c = th.InferenceServerClient(s.url.removeprefix("http://"), connection_timeout=TIMEOUT_S,
                                     network_timeout=TIMEOUT_S)
        try:
            return c.infer("dpr", req)
        except th.InferenceServerException as exc:
            return exc.with_traceback(None)      # its frames would keep c alive: __del__ then runs in another thread
        finally:
            c.close()

    @fz.fuzz_settings(N_MIXED)
    @given(rows=st.lists(st.lists(st.integers(0, len(ids) - 1), min_size=1, max_size=8), min_size=6, max_size=12),
           bad=st.sets(st.integers(0, 11), min_size=1, max_size=4))
    def run(rows, bad):
        reqs = [_inputs(ids, [row], 4, bad_row=0 if i in bad else None) for i, row in enumerate(rows)]
        with ThreadPoolExecutor(len(reqs)) as pool:
            got = list(pool.map(send, [ins for ins, _, _ in reqs], timeout=8 * TIMEOUT_S))
        for i, ((_, hist, prompts), r) in enumerate(zip(reqs, got)):
            if i in bad:
                assert isinstance(r, th.InferenceServerException) and "'no-such-0'" in str(r), (i, r)
            else:
                assert not isinstance(r, Exception), (i, r)
                ranking_matches(r, engine, hist, prompts, 4)

    run()
