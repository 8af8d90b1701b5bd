"""The v2 route's native reader of binary-tensor calls (serve/v2_columns.py) against its specification, the checked
path (``v2.decode_infer_request`` + ``tensors.parts_from_tensors``): on bodies built by tritonclient.http itself, a
plain call becomes one Part in catalogue indices holding exactly the checked path's rows (its ids mapped), prompts,
k and exclude_history, and answers alike; every call the checked path would answer differently or refuse (an
unknown id, a hole, mixed k, a crossed limit, a JSON or filter input, a bad header) is declined, so that path still
words it."""

from __future__ import annotations

import json
import random
import sys
import urllib.request

import numpy as np
import pytest

from dpr.serve import v2_columns
from dpr.serve.columns import merge
from dpr.serve.config import ServeConfig
from dpr.serve.procs import Server, free_port, port_open
from dpr.serve.tensors import parts_from_tensors
from dpr.serve.v2 import decode_infer_request

th = pytest.importorskip("tritonclient.http")
pytest.importorskip("fastapi", reason='needs the [serve] extra: pip install -e ".[serve]"')

CFG = ServeConfig(max_k=20, max_history=60, max_prompt_bytes=200, max_requests_per_call=300)
PROMPTS = [None, "something funny", "no horror tonight", "é 漢 🙂", "a\0b"]


def tensors(rng, rows, ids, *, k=None, pad_before=False, prompts=True, negatives=False, excl=None):
    """A plain call's tensors: histories padded with b"" after (or before) their ids, optional [rows, 1] inputs."""
    hist = [[ids[int(i)] for i in rng.integers(0, len(ids), int(rng.integers(1, 40)))] for _ in range(rows)]
    width = max(map(len, hist)) + 3
    h = np.full((rows, width), b"", dtype=object)
    for r, row in enumerate(hist):
        at = width - len(row) if pad_before and r % 2 else 0
        h[r, at:at + len(row)] = [x.encode() for x in row]
    t = {"history": h}
    if prompts:
        t["prompt"] = np.array([[(PROMPTS[int(i)] or "").encode()] for i in rng.integers(0, len(PROMPTS), rows)],
                               dtype=object)
    if negatives:
        t["negative_prompt"] = np.array([[b"horror" if r % 3 == 0 else b""] for r in range(rows)], dtype=object)
    if k is not None:
        t["k"] = np.asarray(k, np.int32).reshape(rows, 1) if not isinstance(k, np.ndarray) else k
    if excl is not None:
        t["exclude_history"] = np.full((rows, 1), excl, np.bool_)
    return t


def body(t: dict, outputs=None) -> tuple[bytes, str]:
    """The request tritonclient.http sends for these tensors (binary tensor extension)."""
    dts = {np.dtype(object): "BYTES", np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64",
           np.dtype(np.bool_): "BOOL", np.dtype(np.float32): "FP32"}
    ins = []
    for name, arr in t.items():
        i = th.InferInput(name, list(arr.shape), dts[arr.dtype])
        i.set_data_from_numpy(arr)
        ins.append(i)
    data, json_size = th.InferenceServerClient.generate_request_body(ins, outputs=outputs)
    return bytes(data), str(json_size)


def checked(data: bytes, hl: str):
    return parts_from_tensors(decode_infer_request(data, hl).inputs, CFG, None)


@pytest.fixture(scope="module")
def ids(engine):
    return list(engine.item_ids)


def plain_cases(ids, seed: int):
    """12 plain calls' tensors, ``(case, rows, tensors)``: with and without k, prompts, negative prompts and
    exclude_history, padded after or before the ids."""
    rng = np.random.default_rng(seed)
    for case in range(12):
        rows = int(rng.integers(40, 120))
        yield case, rows, tensors(rng, rows, ids, k=[int(rng.integers(1, 20))] * rows if case % 3 else None,
                                  pad_before=case % 2 == 1, prompts=case % 4 != 3, negatives=case % 5 == 0,
                                  excl=bool(case % 2) if case % 3 == 0 else None)


def small_cases(ids, seed: int):
    """24 calls of 1-3 requests, ``(case, rows, tensors)``, under MIN_BYTES in either encoding: with and without k,
    prompts, negative prompts and exclude_history, padded after or before the ids."""
    rng = np.random.default_rng(seed)
    for case in range(24):
        rows = 1 + case % 3
        yield case, rows, tensors(rng, rows, ids, k=[int(rng.integers(1, 20))] * rows if case % 2 else None,
                                  pad_before=case % 4 == 1, prompts=case % 3 != 2, negatives=case % 5 == 0,
                                  excl=bool(case % 2) if case % 3 == 0 else None)


def test_a_plain_call_is_the_checked_paths_part_in_indices(engine, ids):
    index = {a: i + 1 for i, a in enumerate(ids)}
    for case, rows, t in plain_cases(ids, 0):
        data, hl = body(t)
        assert len(data) >= v2_columns.MIN_BYTES
        form = assert_the_checked_part(engine, v2_columns.read(data, hl, engine, CFG), data, hl, rows, index, case)
        assert form.outputs is None and form.binary == {"*"}         # tritonclient asks for every output, binary


def assert_the_checked_part(engine, got, data: bytes, hl, rows: int, index: dict, case):
    """``got``, a reader's (Part, answer form), holds the checked path's rows in catalogue indices of ``engine`` and
    answers as they do; returns the form."""
    assert got is not None, case
    part, form = got
    (want, rows_of), = checked(data, hl)
    assert list(rows_of) == list(range(rows))
    assert part.form == "indices" and part.origin is engine
    np.testing.assert_array_equal(part.flat, [index[x] for x in want.flat])
    assert list(part.lens) == list(want.lens)
    assert (part.prompts, part.negatives, part.k, part.exclude_history) == \
           (want.prompts, want.negatives, want.k, want.exclude_history)
    a, b = engine.recommend_batch(merge([part])), engine.recommend_batch(merge([want]))
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6, atol=1e-6)
    return form


def test_small_binary_calls_are_read_as_the_checked_path_reads_them(engine, ids):
    """Calls under MIN_BYTES (one request, or a few, as tritonclient.http sends them) are read natively too: a
    one-request call costs about half of the checked path's time."""
    index = {a: i + 1 for i, a in enumerate(ids)}
    for case, rows, t in small_cases(ids, 12):
        data, hl = body(t)
        assert len(data) < v2_columns.MIN_BYTES
        assert_the_checked_part(engine, v2_columns.read(data, hl, engine, CFG), data, hl, rows, index, case)


def test_the_answer_form_follows_the_header(engine, ids):
    t = tensors(np.random.default_rng(1), 80, ids, k=[5] * 80)
    outs = [th.InferRequestedOutput("item_ids", binary_data=False), th.InferRequestedOutput("counts")]
    data, hl = body(t, outputs=outs)
    part, form = v2_columns.read(data, hl, engine, CFG)
    want = decode_infer_request(data, hl)
    assert (form.id, form.outputs, form.binary) == (want.id, want.outputs, want.binary) == (None, ["item_ids",
                                                                                                     "counts"], {"counts"})


def _edit_header(data: bytes, hl: str, fn) -> tuple[bytes, str]:
    head = json.loads(data[:int(hl)])
    fn(head)
    new = json.dumps(head).encode()
    return new + data[int(hl):], str(len(new))


def declines(engine, ids):
    """(what, body, header length): calls the reader must leave to the checked path."""
    rng = np.random.default_rng(2)
    out = []

    def plain(**kw):
        return tensors(random_rng(), 80, ids, **{"k": [7] * 80, **kw})

    def random_rng():
        return np.random.default_rng(int(rng.integers(1 << 30)))

    t = plain()
    data, hl = body(t)
    out.append(("no header length", data, None))
    out.append(("header length not a number", data, "12x"))
    out.append(("header length past the body", data, str(len(data) + 1)))
    out.append(("header not JSON", b"[" + data[1:], hl))
    t2 = plain()
    t2["history"][5, 1] = b"no-such-id"
    out.append(("unknown id", *body(t2)))
    t3 = plain()
    row = [x for x in t3["history"][6] if x]
    t3["history"][6, :] = b""
    t3["history"][6, 0], t3["history"][6, 2] = row[0], (row + row)[1]
    out.append(("hole", *body(t3)))
    t4 = plain()
    t4["k"][3, 0] = 8
    out.append(("mixed k", *body(t4)))
    out.append(("k = 0", *body(plain(k=[0] * 80))))
    out.append(("k over max_k", *body(plain(k=[CFG.max_k + 1] * 80))))
    t5 = plain()
    t5["exclude_history"] = np.array([[r % 2 == 0] for r in range(80)], np.bool_)
    out.append(("mixed exclude_history", *body(t5)))
    t6 = plain()
    t6["prompt"][4, 0] = b"   "
    out.append(("blank prompt", *body(t6)))
    t7 = plain()
    t7["prompt"][4, 0] = b"\xff\xfe"
    out.append(("prompt not UTF-8", *body(t7)))
    t8 = plain()
    t8["prompt"][4, 0] = b"x" * (CFG.max_prompt_bytes + 1)
    out.append(("prompt over the limit", *body(t8)))
    t9 = plain()
    t9["history"] = np.concatenate([t9["history"], np.full((80, CFG.max_history), ids[0].encode(), object)], axis=1)
    out.append(("history over the limit", *body(t9)))
    t10 = plain()
    t10["history"][9, :] = b""
    out.append(("empty history", *body(t10)))
    t11 = plain()
    t11["k"] = np.full((80, 1), 7.0, np.float32)
    out.append(("k not an integer", *body(t11)))
    t12 = plain()
    t12["include_tags"] = np.full((80, 1), b"comedy", object)
    out.append(("a filter input", *body(t12)))
    t13 = plain()
    t13["prompt"] = np.concatenate([t13["prompt"], t13["prompt"]], axis=1)
    out.append(("prompt of shape [b, 2]", *body(t13)))
    big = tensors(random_rng(), CFG.max_requests_per_call + 1, ids, k=[7] * (CFG.max_requests_per_call + 1))
    out.append(("more rows than one call may hold", *body(big)))
    data, hl = body(plain())
    out.append(("history bytes cut short", *_edit_header(
        data, hl, lambda h: h["inputs"][0]["parameters"].update(binary_data_size=h["inputs"][0]["parameters"]
                                                                ["binary_data_size"] - 3))))
    out.append(("an input given twice", *_edit_header(data, hl, lambda h: h["inputs"].append(h["inputs"][-1]))))
    out.append(("a JSON data input", *_edit_header(data, hl, lambda h: h["inputs"][-1].update(data=[7] * 80))))
    out.append(("outputs not objects", *_edit_header(data, hl, lambda h: h.update(outputs=["item_ids"]))))
    return out


def test_every_call_the_checked_path_would_word_is_declined(engine, ids):
    cases = declines(engine, ids)
    assert len(cases) == 23
    for what, data, hl in cases:
        assert v2_columns.read(data, hl, engine, CFG) is None, what


def json_body(t: dict, nested: bool = False, outputs=None) -> bytes:
    """The same tensors in KServe v2 JSON (no binary part): BYTES as strings, ``data`` flat or one list per row."""
    dts = {np.dtype(object): "BYTES", np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64",
           np.dtype(np.bool_): "BOOL", np.dtype(np.float32): "FP32"}
    ins = []
    for name, arr in t.items():
        vals = [x.decode() if isinstance(x, bytes) else x for x in arr.reshape(-1).tolist()]
        if nested:
            grid = np.empty(arr.shape, dtype=object)
            grid.reshape(-1)[:] = vals
            vals = grid.tolist()
        ins.append({"name": name, "datatype": dts[arr.dtype], "shape": list(arr.shape), "data": vals})
    return json.dumps({"inputs": ins, **({"outputs": outputs} if outputs else {})}).encode()


@pytest.fixture(params=["native", "python"])
def json_reader(request, monkeypatch):
    """Each JSON test twice: through the native reader, and through its Python specification (the library's
    absence)."""
    from dpr.kernels import v2_json_parse

    if request.param == "native" and v2_json_parse.library() is None:
        pytest.skip("libdpr_id_index.so is not built (python -m dpr.kernels.build)")
    if request.param == "python":
        monkeypatch.setattr(v2_json_parse, "library", lambda: None)
    return request.param


def test_a_plain_json_call_is_the_checked_paths_part_in_indices(engine, ids, json_reader):
    """JSON tensors, flat and nested ``data``: one Part in indices holding the checked path's rows, and the same
    answer form (id, outputs, binary)."""
    index = {a: i + 1 for i, a in enumerate(ids)}
    for case, rows, t in plain_cases(ids, 5):
        if case == 4:
            t["k"] = t["k"].astype(np.int64)
        outs = ([{"name": "scores"}, {"name": "item_ids", "parameters": {"binary_data": True}}] if case % 4 == 1
                else None)
        data = json_body(t, nested=case % 2 == 0, outputs=outs)
        assert len(data) >= v2_columns.MIN_BYTES
        form = assert_the_checked_part(engine, v2_columns.read(data, None, engine, CFG), data, None, rows, index, case)
        w = decode_infer_request(data, None)
        assert (form.id, form.outputs, form.binary) == (w.id, w.outputs, w.binary)


def test_small_json_calls_are_read_natively_only(engine, ids, json_reader):
    """A call under MIN_BYTES in JSON tensors (one request, or a few; flat or nested; padded after or before the
    ids): the native reader takes it, as the checked path reads it (it costs less than that path at any size); the
    Python reader leaves it to the checked path (it saves nothing there)."""
    index = {a: i + 1 for i, a in enumerate(ids)}
    for case, rows, t in small_cases(ids, 11):
        data = json_body(t, nested=case % 2 == 0)
        assert len(data) < v2_columns.MIN_BYTES
        got = v2_columns.read(data, None, engine, CFG)
        if json_reader == "python":
            assert got is None, case
        else:
            assert_the_checked_part(engine, got, data, None, rows, index, case)
    # a one-request call with a hole between two ids: the checked path refuses it, so the reader declines it
    a, b = ids[0].encode(), ids[1].encode()
    for row in ([a, b"", b], [b"", a, b"", b"", b, b""]):
        hole = json_body({"history": np.array([row], dtype=object)})
        assert v2_columns.read(hole, None, engine, CFG) is None
        with pytest.raises(Exception, match="empty string"):
            checked(hole, None)
    padded = json_body({"history": np.array([[b"", a, b, b""]], dtype=object)})
    assert (v2_columns.read(padded, None, engine, CFG) is None) == (json_reader == "python")


def test_tritonclient_json_bodies_are_read_natively(engine, ids, json_reader):
    """The JSON body tritonclient.http builds with ``binary_data=False`` (its own key order, no spaces, an id and
    outputs asked for as JSON) is taken and read as the checked path reads it."""
    rng = np.random.default_rng(9)
    index = {a: i + 1 for i, a in enumerate(ids)}
    rows = 90
    t = tensors(rng, rows, ids, k=[6] * rows, negatives=True, excl=False)
    ins = []
    for name, arr in t.items():
        dt = {np.dtype(object): "BYTES", np.dtype(np.int32): "INT32", np.dtype(np.bool_): "BOOL"}[arr.dtype]
        i = th.InferInput(name, list(arr.shape), dt)
        i.set_data_from_numpy(arr, binary_data=False)
        ins.append(i)
    data, json_size = th.InferenceServerClient.generate_request_body(
        ins, outputs=[th.InferRequestedOutput("item_ids", binary_data=False), th.InferRequestedOutput("scores")],
        request_id="call-9")
    data = bytes(data)
    assert json_size is None and len(data) >= v2_columns.MIN_BYTES
    form = assert_the_checked_part(engine, v2_columns.read(data, None, engine, CFG), data, None, rows, index, "tc")
    assert (form.id, form.outputs, form.binary) == ("call-9", ["item_ids", "scores"], {"scores"})


def _edit_json(data: bytes, fn) -> bytes:
    req = json.loads(data)
    fn(req)
    return json.dumps(req).encode()


def json_declines(engine, ids):
    """(what, body): JSON calls the reader must leave to the checked path (which refuses, or reads them otherwise)."""
    rng = np.random.default_rng(6)

    def plain(**kw):
        return tensors(np.random.default_rng(int(rng.integers(1 << 30))), 80, ids, **{"k": [7] * 80, **kw})

    def inp(req, name):
        return next(i for i in req["inputs"] if i["name"] == name)

    def hist_at(req, r, c, v):
        h = inp(req, "history")
        h["data"][r * h["shape"][1] + c] = v

    out = []
    data = json_body(plain())
    out.append(("not JSON", data[:-1]))
    out.append(("unknown id", _edit_json(data, lambda q: hist_at(q, 5, 0, "no-such-id"))))
    out.append(("an id that is not a string", _edit_json(data, lambda q: hist_at(q, 5, 0, 17))))
    out.append(("a NUL inside an id", _edit_json(data, lambda q: hist_at(q, 5, 0, ids[0] + "\0x"))))
    t3 = plain()
    row = [x for x in t3["history"][6] if x]
    t3["history"][6, :] = b""
    t3["history"][6, 0], t3["history"][6, 2] = row[0], (row + row)[1]
    out.append(("hole", json_body(t3)))
    out.append(("empty history", _edit_json(data, lambda q: [hist_at(q, 9, c, "") for c in
                                                              range(inp(q, "history")["shape"][1])])))
    out.append(("history over the limit", json_body(plain(k=[7] * 80) | {"history": np.concatenate(
        [plain()["history"], np.full((80, CFG.max_history), ids[0].encode(), object)], axis=1)})))
    out.append(("history not BYTES", _edit_json(data, lambda q: inp(q, "history").update(datatype="FP32"))))
    out.append(("fewer elements than the shape", _edit_json(data, lambda q: inp(q, "history")["data"].pop())))
    out.append(("mixed k", _edit_json(data, lambda q: inp(q, "k")["data"].__setitem__(3, 8))))
    out.append(("k = 0", json_body(plain(k=[0] * 80))))
    out.append(("k over max_k", json_body(plain(k=[CFG.max_k + 1] * 80))))
    out.append(("k as floats", _edit_json(data, lambda q: inp(q, "k").update(data=[7.0] * 80))))
    out.append(("k as booleans", _edit_json(data, lambda q: inp(q, "k").update(data=[True] * 80))))
    out.append(("k of 7 and 7.0", _edit_json(data, lambda q: inp(q, "k")["data"].__setitem__(9, 7.0))))
    out.append(("k as strings", _edit_json(data, lambda q: inp(q, "k").update(data=["7"] * 80))))
    out.append(("k past INT32", _edit_json(data, lambda q: inp(q, "k").update(data=[2 ** 32 + 7] * 80))))
    out.append(("k of a float datatype", _edit_json(data, lambda q: inp(q, "k").update(datatype="FP32"))))
    out.append(("mixed exclude_history", json_body(plain() | {"exclude_history": np.array([[r % 2 == 0] for r in
                                                                                           range(80)], np.bool_)})))
    out.append(("exclude_history as numbers", _edit_json(json_body(plain(excl=True)), lambda q: inp(
        q, "exclude_history").update(data=[1] * 80))))
    out.append(("blank prompt", _edit_json(data, lambda q: inp(q, "prompt")["data"].__setitem__(4, "   "))))
    out.append(("a lone surrogate in a prompt", _edit_json(data, lambda q: inp(q, "prompt")["data"].__setitem__(
        4, "\ud800"))))
    out.append(("prompt over the limit", _edit_json(data, lambda q: inp(q, "prompt")["data"].__setitem__(
        4, "x" * (CFG.max_prompt_bytes + 1)))))
    out.append(("a prompt that is not a string", _edit_json(data, lambda q: inp(q, "prompt")["data"].__setitem__(
        4, 3))))
    out.append(("a filter input", json_body(plain() | {"include_tags": np.full((80, 1), b"comedy", object)})))
    t13 = plain()
    t13["prompt"] = np.concatenate([t13["prompt"], t13["prompt"]], axis=1)
    out.append(("prompt of shape [b, 2]", json_body(t13)))
    big = tensors(np.random.default_rng(7), CFG.max_requests_per_call + 1, ids, k=[7] * (CFG.max_requests_per_call + 1))
    out.append(("more rows than one call may hold", json_body(big)))
    out.append(("an input given twice", _edit_json(data, lambda q: q["inputs"].append(q["inputs"][-1]))))
    out.append(("an input with parameters", _edit_json(data, lambda q: inp(q, "k").update(parameters={"x": 1}))))
    out.append(("outputs not objects", _edit_json(data, lambda q: q.update(outputs=["item_ids"]))))
    return out


def test_every_json_call_the_checked_path_would_word_is_declined(engine, ids, json_reader):
    cases = json_declines(engine, ids)
    assert len(cases) == 30
    for what, data in cases:
        assert v2_columns.read(data, None, engine, CFG) is None, what
    plain = json_body(tensors(np.random.default_rng(8), 80, ids, k=[7] * 80))
    assert v2_columns.read(plain, None, engine, CFG) is not None     # the cases' base is taken
    # a k within max_k but outside its datatype: the checked path refuses it ("does not fit INT8")
    wide = ServeConfig(max_k=300, max_history=60, max_prompt_bytes=200, max_requests_per_call=300)
    for k, taken in ((100, True), (200, False)):
        data = _edit_json(plain, lambda q: next(i for i in q["inputs"] if i["name"] == "k").update(
            datatype="INT8", data=[k] * 80))
        assert (v2_columns.read(data, None, engine, wide) is not None) is taken, k


@pytest.mark.parametrize("rows, ks", [(1, (2, 5)), (2, (3, 12)), (3, (3, 12)), (40, (3, 12))])  # 15 ids: plain
def test_the_answer_with_natively_rendered_ids_is_the_plain_answer(engine, ids, rows, ks, monkeypatch):
    """``response`` renders a JSON answer's item_ids natively from the results' indices when it has 24 ids or more
    (``v2_columns.NATIVE_IDS_MIN``): the same bytes as the plain encoder writes for the ids ``tensors_from_results``
    builds (itself json.dumps of the answer, tests/test_serve_v2_decode.py), with two parts of different k (the
    smaller k's rows padded with ""), in every answer form; and only then."""
    from dpr.kernels import json_render
    from dpr.serve.columns import run_parts
    from dpr.serve.tensors import tensors_from_results
    from dpr.serve.v2 import InferRequest, encode_infer_response

    if json_render.library() is None:
        pytest.skip("libdpr_id_index.so is not built (python -m dpr.kernels.build)")
    calls = []
    real = json_render.fragment_list_json
    monkeypatch.setattr(json_render, "fragment_list_json", lambda *a: calls.append(1) or real(*a))
    rng = np.random.default_rng(rows)
    parts, start = [], 0
    for n, k in zip((rows, rows + 1), ks):
        (part, _), = checked(*body(tensors(rng, n, ids, k=[k] * n)))
        parts.append((part, range(start, start + n)))
        start += n
    results = run_parts(engine, [p for p, _ in parts])
    plain = tensors_from_results(engine, start, parts, results, as_bytes=False)
    assert (plain["item_ids"] == "").any(), "the smaller k's rows should be padded to the larger k"
    forms = [InferRequest(None, {}), InferRequest("x", {}, ["item_ids", "counts"]),
             InferRequest(None, {}, None, {"item_ids"}), InferRequest(None, {}, ["scores"], {"scores"}),
             InferRequest(None, {}, None, {"*"})]
    for form in forms:
        calls.clear()
        got = v2_columns.response("dpr", engine, form, parts, results)
        want, headers = encode_infer_response("dpr", form, plain)
        assert got.body == want, form
        json_ids = (form.outputs is None or "item_ids" in form.outputs) and not form.binary & {"*", "item_ids"}
        assert len(calls) == int(json_ids and plain["item_ids"].size >= v2_columns.NATIVE_IDS_MIN), form


def test_the_route_answers_binary_calls_as_the_engine_does(export_dir, engine, ids, tmp_path):
    """Through the service: a large plain binary call (the native reader) and one it declines (mixed k) both
    answer as ``Engine.recommend``; ``--http-body-parser python`` answers the first with the same bytes."""
    rnd = random.Random(3)
    rows = 90
    hist = [rnd.sample(ids, rnd.randint(1, 30)) for _ in range(rows)]
    prompts = [rnd.choice(PROMPTS[:3]) for _ in range(rows)]
    width = max(map(len, hist))
    t = {"history": np.array([[x.encode() for x in r] + [b""] * (width - len(r)) for r in hist], dtype=object),
         "prompt": np.array([[(p or "").encode()] for p in prompts], dtype=object),
         "k": np.full((rows, 1), 6, np.int32)}
    mixed = {**t, "k": np.array([[6 if r % 2 else 4] for r in range(rows)], np.int32)}
    answers = {}
    for parser in ("native", "python"):
        port = free_port()
        s = Server([sys.executable, "-P", "-m", "dpr.serve.cli", str(export_dir), "--port", str(port), "--log-level",
                    "warning", "--backend", "onnxruntime", "--retriever", "onnxruntime", "--http-body-parser", parser],
                   port, log_path=tmp_path / f"{parser}.log").start()
        try:
            for name, tt in (("plain", t), ("mixed", mixed)):
                data, hl = body(tt)
                req = urllib.request.Request(s.url + "/v2/models/dpr/infer", data=data, method="POST", headers={
                    "Inference-Header-Content-Length": hl, "Content-Type": "application/octet-stream"})
                with urllib.request.urlopen(req, timeout=60) as r:
                    answers[parser, name] = (r.read(), r.headers["Inference-Header-Content-Length"])
        finally:
            assert s.stop() == 0, s.log()
            assert not port_open(port) and not s.leftover
    # the same answer whichever reader read it: ids and counts exactly, scores up to their last bit (two processes'
    # engine calls; a score once differed by one ulp between two runs of the same batch)
    (na, nh), (pa, ph) = answers["native", "plain"], answers["python", "plain"]
    nr, pr = (th.InferenceServerClient.parse_response_body(raw, header_length=int(h)) for raw, h in ((na, nh), (pa, ph)))
    for out in ("item_ids", "counts"):
        np.testing.assert_array_equal(nr.as_numpy(out), pr.as_numpy(out))
    np.testing.assert_allclose(nr.as_numpy("scores"), pr.as_numpy("scores"), rtol=1e-6, atol=1e-6)
    for name, tt in (("plain", t), ("mixed", mixed)):
        raw, hl = answers["native", name]
        res = th.InferenceServerClient.parse_response_body(raw, header_length=int(hl))
        ks = tt["k"].ravel().tolist()
        want = engine.recommend(hist, prompts=prompts, k=ks)
        got = [[x.decode() for x in row] for row in res.as_numpy("item_ids")]
        assert [g[:k] for g, k in zip(got, ks)] == want.item_ids
        assert res.as_numpy("counts").ravel().tolist() == list(want.counts)
