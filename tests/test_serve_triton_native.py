"""The native Triton backend (``libtriton_dpr.so`` + ``dpr.serve.triton_native``).

In process: the columns C++ hands over (built here as ``triton_backend.cc`` builds them) answered by
:class:`NativeModel` exactly as the engine answers each request alone, on both of its paths (one stacked batch;
request by request when one is refused or carries a filter), with every error on its own request. Then the library
built and checked for its entry points, the repository written for it, and the fallback when it cannot build.
Live: tritonserver loading it, queried over HTTP and gRPC by concurrent clients (test_serve_triton.py runs the
Python backend and ``dpr-serve --triton``'s default the same way).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from dpr.serve import triton_native as tn
from dpr.serve.procs import Server, free_ports, port_open
from dpr_tests_serve_answers import tensor_request  # noqa: E402 - tests/serve_answers.py (conftest.py)

REPO = Path(__file__).resolve().parents[1]
TRITON_PY = Path(os.environ.get("DPR_TRITON_PYTHON", REPO / ".venv-triton" / "bin" / "python"))
CODES = {np.dtype(object): 13, np.dtype(np.int32): 8, np.dtype(np.int64): 9, np.dtype(np.bool_): 1}
PROMPTS = ["something funny", "no horror tonight", "more comedy", None]


def wire(arr: np.ndarray) -> bytes:
    return b"".join(len(x).to_bytes(4, "little") + x for x in arr.ravel().tolist())


def columns(requests: list[dict]) -> tuple:
    """(names, data, meta) as triton_backend.cc gathers them: one column per input name, in first-seen order."""
    names: list = []
    for r in requests:
        names += [k for k in r if k not in names]
    data = [bytearray() for _ in names]
    meta = np.zeros((len(requests), len(names), 6), np.int64)
    for i, r in enumerate(requests):
        for name, arr in r.items():
            j = names.index(name)
            raw = wire(arr) if arr.dtype == object else arr.tobytes()
            meta[i, j] = (CODES[arr.dtype], arr.ndim, arr.shape[0], arr.shape[1] if arr.ndim == 2 else 1,
                          len(data[j]), len(data[j]) + len(raw))
            data[j] += raw
    return tuple(names), tuple(bytes(d) for d in data), meta.tobytes()


def decode(out: tuple, n: int) -> list:
    """NativeModel.execute's columns as each request's answer: ('error', code, message) or (ids, scores, counts)."""
    errors, spans, widths, kmax, ids, offs, scores, counts = out
    spans = np.frombuffer(spans, np.int64).reshape(n, 2)
    widths = np.frombuffer(widths, np.int64)
    offs = np.frombuffer(offs, np.int64)
    scores = np.frombuffer(scores, np.float32).reshape(-1, kmax) if kmax else None
    counts = np.frombuffer(counts, np.int32)
    res = []
    for i in range(n):
        if errors[i] is not None:
            res.append(("error", *errors[i]))
            continue
        rows = []
        for r in range(*spans[i]):
            cells = []
            for c in range(widths[i]):
                a, z = offs[r * kmax + c], offs[r * kmax + c + 1]
                assert int.from_bytes(ids[a:a + 4], "little") == z - a - 4
                cells.append(ids[a + 4:z].decode())
            rows.append(cells)
        res.append((rows, scores[spans[i][0]:spans[i][1], :widths[i]], counts[spans[i][0]:spans[i][1]].tolist()))
    return res


def request(histories, prompts=None, k=None, excl=None, **filters) -> dict:
    return tensor_request(histories, prompts, k=k, excl=excl, **filters)       # tests/serve_answers.py


def alone(engine, t: dict):
    """What the engine answers for this request alone: (ids cut to the request's largest k, scores, counts)."""
    hist = [[x.decode() for x in row if x] for row in t["history"].tolist()]
    b = len(hist)
    prompts = [p[0].decode() or None for p in t["prompt"].tolist()] if "prompt" in t else None
    ks = [int(x[0]) for x in t["k"]] if "k" in t else [10] * b
    excl = [bool(x[0]) for x in t["exclude_history"]] if "exclude_history" in t else True
    filt = None
    if "include_tags" in t:
        filt = [{"include_tags": [x.decode() for x in row if x]} for row in t["include_tags"].tolist()]
    want = engine.recommend(hist, prompts=prompts, k=ks, exclude_history=excl, hard_filter=filt)
    return want


def check(got, want, ks):
    ids, scores, counts = got
    assert counts == list(want.counts)
    for r, k in enumerate(ks):
        assert ids[r][:k] == want.item_ids[r], (r, ids[r], want.item_ids[r])
        np.testing.assert_allclose(scores[r, :k], want.scores[r], rtol=1e-5, atol=1e-5)
        assert all(x == "" for x in ids[r][k:])                # a shorter row of the request is padded


@pytest.fixture(scope="module")
def model(export_dir):
    params = {"export_dir": str(export_dir), "backend": "onnxruntime", "retriever": "onnxruntime",
              "max_k": "50"}
    m = tn.NativeModel(json.dumps({"parameters": {k: {"string_value": v} for k, v in params.items()}}), "", "t")
    yield m
    m.close()


def both_paths(model, reqs):
    """The native answers, and those of the per-request path (the Python backend's core) on the same columns."""
    cols = columns(reqs)
    fast = model.execute(*cols)
    slow = model.pack(model.core.answer(tn.request_tensors(*cols)))
    return fast, slow


def test_a_plain_batch_is_one_engine_batch_equal_to_each_request_alone(model, engine, monkeypatch):
    reqs = [request([["i3", "i5"]], ["something funny"], k=[7]),
            request([["i200", "i201", "i202", "i7"]]),                              # no prompt, no k: defaults
            request([["i9"], ["i10", "i11", "i12"]], ["no horror tonight", None], k=[3, 5], excl=[False, True]),
            request([["i4", "i8", "i15", "i16", "i23", "i42"]], [None], k=[1])]
    calls = []
    monkeypatch.setattr(model.core, "answer", lambda t: calls.append(t))          # the stacked path never asks it
    out = model.execute(*columns(reqs))
    assert not calls
    monkeypatch.undo()
    got = decode(out, len(reqs))
    for t, g in zip(reqs, got):
        ks = [int(x[0]) for x in t["k"]] if "k" in t else [10] * len(t["history"])
        check(g, alone(engine, t), ks)
        assert len(g[0][0]) == max(ks)                                           # its own width, not the batch's
    fast, slow = both_paths(model, reqs)
    assert fast == slow                                          # byte for byte the per-request path's columns


def test_random_batches_odd_sizes(model, engine):
    rnd = random.Random(7)
    ids = [f"i{i}" for i in range(1, 300)]
    for _ in range(12):
        reqs = []
        for _ in range(rnd.randint(1, 9)):
            rows = rnd.randint(1, 3)
            hist = [rnd.sample(ids, rnd.randint(1, 11)) for _ in range(rows)]
            prompts = [rnd.choice(PROMPTS) for _ in range(rows)] if rnd.random() < 0.7 else None
            k = [rnd.choice([1, 2, 5, 10, 13])] * rows if rnd.random() < 0.6 else None
            reqs.append(request(hist, prompts, k))
        fast, slow = both_paths(model, reqs)
        assert fast == slow
        for t, g in zip(reqs, decode(fast, len(reqs))):
            check(g, alone(engine, t), [int(x[0]) for x in t["k"]] if "k" in t else [10] * len(t["history"]))


def test_a_one_k_batch_is_one_part_checked_on_its_columns(model, engine, monkeypatch):
    """A batch whose rows share k and exclude_history (the common case; a request with only a negative prompt and
    a history padded before its ids included) becomes one Part without parts_from_tensors, every limit checked on
    the columns: a request that crosses one (a blank, over-long or non-UTF-8 prompt, a long history, k over max_k)
    sends the batch to the per-request path, which refuses that request alone, by name, and answers the others
    exactly. So does padding between two ids or an unknown id, which the native history lookup finds."""
    seen = []
    real = tn.parts_from_tensors
    monkeypatch.setattr(tn, "parts_from_tensors", lambda *a, **kw: seen.append(1) or real(*a, **kw))
    plain = [request([["i3", "i5"]], ["something funny"], k=[7]),
             request([["i9"], ["i10", "i11"]], [None, "no horror tonight"], k=[7, 7]),
             tensor_request([["i4", "i8"]], negatives=["zombies"], k=[7], pad_before=2)]
    fast, slow = both_paths(model, plain)
    assert fast == slow and not seen
    for t, g in zip(plain, decode(fast, len(plain))):
        check(g, alone(engine, t) if "negative_prompt" not in t else
              engine.recommend([["i4", "i8"]], negative_prompts=["zombies"], k=7), [7] * len(t["history"]))
    fast, slow = both_paths(model, plain + [request([["i3"]], k=[2])])       # another k: split by parts_from_tensors
    assert fast == slow and seen

    cfg = model.core.cfg
    bad_utf8 = request([["i4"]], ["x"], k=[7])
    bad_utf8["prompt"] = np.array([[b"\xff\xfe"]], dtype=object)
    crossing = {"is empty or whitespace only": request([["i4"]], ["   "], k=[7]),
                f"the limit is {cfg.max_prompt_bytes}": request([["i4"]], ["x" * (cfg.max_prompt_bytes + 1)], k=[7]),
                "not valid UTF-8": bad_utf8,
                "empty string at position 1 between item ids": request([["i1", "", "i2"]], k=[7]),   # a hole
                "unknown item id 'no-such-id'": request([["i3", "no-such-id"]], k=[7]),
                f"the limit is {cfg.max_history}": request([[f"i{1 + i % 250}" for i in range(cfg.max_history + 1)]],
                                                           k=[7])}
    for words, bad in crossing.items():
        reqs = [plain[0], bad, plain[1]]
        fast, slow = both_paths(model, reqs)
        assert fast == slow
        got = decode(fast, len(reqs))
        assert got[1][:2] == ("error", 3) and words in got[1][2], (words, got[1])
        check(got[0], alone(engine, plain[0]), [7])
        check(got[2], alone(engine, plain[1]), [7, 7])
    over = [request([["i3"]], k=[cfg.max_k + 1]), request([["i5"]], k=[cfg.max_k + 1])]
    got = decode(model.execute(*columns(over)), 2)
    assert all(g[:2] == ("error", 3) and f"over the limit of {cfg.max_k}" in g[2] for g in got), got


def test_a_bad_request_fails_alone_and_names_its_problem(model, engine):
    good = request([["i3", "i5"]], ["something funny"], k=[4])
    reqs = [good, request([["i3", "no-such-id"]]), request([["i7"]], k=[0]), request([["i1"]], k=[51]),
            request([["i1", "", "i2"]]), good]
    got = decode(model.execute(*columns(reqs)), len(reqs))
    want = alone(engine, good)
    check(got[0], want, [4])
    check(got[5], want, [4])
    assert got[1][:2] == ("error", 3) and "no-such-id" in got[1][2] and "row 0" in got[1][2], got[1]
    assert got[2][:2] == ("error", 3) and "k must be >= 1" in got[2][2], got[2]
    assert got[3][:2] == ("error", 3) and "50" in got[3][2], got[3]
    assert got[4][:2] == ("error", 3) and "empty string at position 1" in got[4][2], got[4]


def test_filters_and_odd_inputs_take_the_per_request_path(model, engine):
    tags_of = dict(zip(engine.item_ids, engine.item_tags))
    tag = sorted({t for ts in engine.item_tags for t in ts})[0]
    filt = request([["i3", "i5"], ["i8"]], ["something funny", None], k=[6, 6], include_tags=[[tag], [tag]])
    k64 = request([["i3"]])
    k64["k"] = np.array([[4]], dtype=np.int64)                   # another integer type than INT32: still taken
    reqs = [filt, request([["i9"]]), k64]
    fast, slow = both_paths(model, reqs)
    assert fast == slow
    got = decode(fast, len(reqs))
    check(got[0], alone(engine, filt), [6, 6])
    assert all(tag in tags_of[i] for row in got[0][0] for i in row if i)
    check(got[1], alone(engine, reqs[1]), [10])
    check(got[2], engine.recommend([["i3"]], k=4), [4])


def test_a_tensor_that_cannot_be_read_is_refused_alone(model, engine):
    names, data, meta = columns([request([["i3"]], k=[5]), request([["i4"]], k=[5])])
    m = np.frombuffer(meta, np.int64).reshape(2, len(names), 6).copy()
    m[1, names.index("k"), 0] = 9                               # INT64 said, 4 bytes sent
    got = decode(model.execute(names, data, m.tobytes()), 2)
    check(got[0], engine.recommend([["i3"]], k=5), [5])
    assert got[1][:2] == ("error", 3) and "input 'k' holds 4 bytes" in got[1][2], got[1]


# ---- the library and the repository --------------------------------------------------------------------------------

needs_build = pytest.mark.skipif(tn.python_build_info()[0] is None, reason=f"cannot build the backend here: "
                                 f"{tn.python_build_info()[1]}")


@needs_build
def test_the_library_exports_triton_entry_points_only():
    lib = tn.build()
    syms = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True).stdout
    exported = {line.split()[-1] for line in syms.splitlines() if " T " in line}
    assert exported == {"TRITONBACKEND_Initialize", "TRITONBACKEND_ModelInstanceInitialize",
                        "TRITONBACKEND_ModelInstanceFinalize", "TRITONBACKEND_ModelInstanceExecute"}, exported
    needed = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    assert tn.python_build_info()[0]["soname"] in needed and "NODELETE" in needed, needed
    assert tn.build() == lib                                    # cached: the same file, not rebuilt


@needs_build
def test_repository_for_the_native_backend(export_dir, tmp_path):
    from dpr.serve.config import ServeConfig
    from dpr.serve.triton_repo import write_repository

    model = write_repository(tmp_path / "repo", export_dir, ServeConfig(), backend="native")
    cfg = (model / "config.pbtxt").read_text()
    assert 'backend: "dpr"' in cfg and (model / "libtriton_dpr.so").is_file()
    assert not (model / "1" / "model.py").exists()
    model = write_repository(tmp_path / "repo2", export_dir, ServeConfig(triton_backend="python"))
    assert 'backend: "python"' in (model / "config.pbtxt").read_text() and (model / "1" / "model.py").is_file()


@pytest.mark.skipif(not TRITON_PY.exists(), reason=f"no Triton environment at {TRITON_PY}: `make triton-env`")
def test_built_by_the_python_that_will_serve():
    """The library embeds the interpreter that built it, so a repository is built by the server's Python."""
    lib = tn.build_for(TRITON_PY)
    assert lib.is_file() and str(TRITON_PY).encode() in lib.read_bytes()
    assert str(Path(sys.executable)).encode() not in lib.read_bytes()
    with pytest.raises(RuntimeError, match="no-such-python"):
        tn.build_for("/no-such-python")


def test_auto_falls_back_to_the_python_backend_and_says_why(monkeypatch):
    from dpr.errors import InputError
    from dpr.serve.config import ServeConfig
    from dpr.serve.triton_repo import choose_backend

    def fail(**_):
        raise RuntimeError("cannot build the dpr Triton backend: no Python.h in /nowhere")

    monkeypatch.setattr(tn, "build", fail)
    backend, why = choose_backend("auto")
    assert backend == "python" and "no Python.h in /nowhere" in why
    with pytest.raises(InputError, match="no Python.h in /nowhere"):
        choose_backend("native")
    assert choose_backend("python")[0] == "python"
    with pytest.raises(InputError, match="triton_backend must be"):
        ServeConfig(triton_backend="cpp").check()


# ---- live: tritonserver loading the library ------------------------------------------------------------------------

@pytest.mark.skipif(not TRITON_PY.exists(), reason=f"no Triton environment at {TRITON_PY}: `make triton-env`")
def test_native_backend_in_tritonserver(export_dir, engine, tmp_path):
    th = pytest.importorskip("tritonclient.http", reason="needs the [serve] extra (tritonclient)")
    tg = pytest.importorskip("tritonclient.grpc", reason="needs the [serve] extra (tritonclient)")
    http, grpc, metrics = free_ports(3)
    cmd = [str(TRITON_PY), "-P", "-m", "dpr.serve.cli", "--triton", str(export_dir), "--triton-backend", "native",
           "--port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
           "--backend", "onnxruntime", "--retriever", "onnxruntime", "--max-batch-size", "64",
           "--preferred-batch-size", "64"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    s = Server(cmd, http, env=env, log_path=tmp_path / "triton.log", ports=(grpc, metrics)).start(180)
    try:
        assert "the native backend" in s.log(10 ** 7)

        def inputs(mod, t):
            out = []
            for name, arr in t.items():
                dt = {13: "BYTES", 8: "INT32", 9: "INT64", 1: "BOOL"}[CODES[arr.dtype]]
                out.append(mod.InferInput(name, list(arr.shape), dt))
                out[-1].set_data_from_numpy(arr)
            return out

        rnd = random.Random(3)
        ids = [f"i{i}" for i in range(1, 300)]
        reqs = [request([rnd.sample(ids, rnd.randint(1, 12))], [rnd.choice(PROMPTS)], k=[rnd.choice([1, 4, 10, 12])])
                for _ in range(96)]

        def one(t):                        # 96 single requests from 32 threads: Triton batches them together
            c = th.InferenceServerClient(f"127.0.0.1:{http}")
            try:
                r = c.infer("dpr", inputs(th, t))
                return r.as_numpy("item_ids"), r.as_numpy("scores"), r.as_numpy("counts")
            finally:
                c.close()

        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(one, reqs))
        for t, (ids_, scores, counts) in zip(reqs, answers):
            got = ([[x.decode() for x in row] for row in ids_.tolist()], scores, counts.ravel().tolist())
            check(got, alone(engine, t), [int(t["k"][0, 0])])
        gc = tg.InferenceServerClient(f"127.0.0.1:{grpc}")
        multi = request([["i3", "i5"], ["i200", "i201", "i202", "i7"]], ["no horror tonight", None], k=[7, 3])
        r = gc.infer("dpr", inputs(tg, multi))
        check(([[x.decode() for x in row] for row in r.as_numpy("item_ids").tolist()], r.as_numpy("scores"),
               r.as_numpy("counts").ravel().tolist()), alone(engine, multi), [7, 3])
        # only the outputs asked for
        r = gc.infer("dpr", inputs(tg, multi), outputs=[tg.InferRequestedOutput("scores")])
        assert r.as_numpy("item_ids") is None and r.as_numpy("scores").shape == (2, 7)
        with pytest.raises(tg.InferenceServerException) as ei:
            gc.infer("dpr", inputs(tg, request([["i3", "no-such-id"]])))
        assert "no-such-id" in str(ei.value) and "INVALID_ARGUMENT" in str(ei.value), str(ei.value)
        gc.close()
        # Triton counts a request once the backend has released it, which can come after the client has its
        # answer (a loaded CI machine read all failure counters at 0 once): poll, bounded, until both land.
        # The failure counter has one line per reason; the refusal is counted under whichever applies.
        deadline = time.monotonic() + 15
        while True:
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10).read()
            ok = [float(line.rsplit(b" ", 1)[1]) for line in text.splitlines()
                  if line.startswith(b'nv_inference_request_success{model="dpr"')]
            fail = [float(line.rsplit(b" ", 1)[1]) for line in text.splitlines()
                    if line.startswith(b'nv_inference_request_failure{model="dpr"')]
            if (ok and ok[0] >= 98 and sum(fail) >= 1) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert ok and ok[0] >= 98 and fail and sum(fail) >= 1, text[:2000]
    finally:
        code = s.stop()
    assert code == 0, s.log()
    for p in s.ports:
        assert not port_open(p), f"port {p} still open after tritonserver stopped"
    assert "Traceback" not in s.log(10 ** 7), s.log()


PROBE_SITE = """
import importlib.util, json, os, sys
spec = importlib.util.find_spec("kernels")
with open(os.environ["DPR_PROBE_OUT"], "w") as f:
    json.dump({"path": sys.path, "cwd": os.getcwd(), "kernels": spec.origin if spec else None,
               "executable": sys.executable}, f)
"""


@pytest.mark.skipif(not TRITON_PY.exists(), reason=f"no Triton environment at {TRITON_PY}: `make triton-env`")
def test_the_embedded_python_never_has_the_repository_root_on_sys_path(export_dir, tmp_path):
    """tritonserver started from the repository root, the native backend's embedded Python probed at start-up (a
    sitecustomize on PYTHONPATH records what it sees): no root on sys.path, and ``kernels`` is not our folder."""
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(PROBE_SITE)
    out = tmp_path / "probe.json"
    http, grpc, metrics = free_ports(3)
    cmd = [str(TRITON_PY), "-P", "-m", "dpr.serve.cli", "--triton", str(export_dir), "--triton-backend", "native",
           "--port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    env = dict({k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, PYTHONPATH=str(probe),
               DPR_PROBE_OUT=str(out))
    s = Server(cmd, http, env=env, log_path=tmp_path / "triton.log", ports=(grpc, metrics), cwd=REPO).start(180)
    try:
        seen = json.loads(out.read_text())      # the last writer: tritonserver's embedded Python (started last)
    finally:
        code = s.stop()
    assert code == 0, s.log()
    assert "the native backend" in s.log(10 ** 7)
    root = os.path.realpath(REPO)
    assert not [p for p in seen["path"] if os.path.realpath(p or seen["cwd"]) == root], seen
    ours = os.path.join(root, "kernels") + os.sep                # not the venvs beside it under the root
    assert seen["kernels"] is None or not os.path.realpath(seen["kernels"]).startswith(ours), seen
    assert os.path.realpath(seen["cwd"]) != root, seen


def test_tritonserver_http_threads_follow_the_cores(monkeypatch):
    """``--http-thread-count``: the configured count, or for 0 one per two physical cores (at least 1, at most
    Triton's own default 8); a negative count is refused by name."""
    import dpr.util
    from dpr.errors import InputError
    from dpr.serve.config import ServeConfig

    assert ServeConfig(http_thread_count=3).check().triton_http_threads() == 3
    for cores, want in ((1, 1), (2, 1), (3, 1), (4, 2), (16, 8), (64, 8)):
        monkeypatch.setattr(dpr.util, "physical_cores", lambda c=cores: c)
        assert ServeConfig().check().triton_http_threads() == want, cores
    with pytest.raises(InputError, match="http_thread_count"):
        ServeConfig(http_thread_count=-1).check()
