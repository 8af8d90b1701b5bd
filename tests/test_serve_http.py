"""The HTTP service (dpr-serve) run for real: a uvicorn subprocess on 127.0.0.1, queried with httpx and
tritonclient. Answers must equal the in-process engine's on the same export; bad requests get the documented
status and message; overload answers 503 (never hangs); SIGTERM drains; hot reload loses nothing."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

httpx = pytest.importorskip("httpx", reason='needs the [serve] extra: pip install -e ".[serve]"')
pytest.importorskip("fastapi", reason='needs the [serve] extra: pip install -e ".[serve]"')

from dpr.serve import body_columns  # noqa: E402
from dpr.serve.procs import Server, free_port, port_open  # noqa: E402

ENGINE_FLAGS = ["--backend", "onnxruntime", "--retriever", "onnxruntime"]   # as the `engine` fixture


def serve_cmd(export_dir, port, *flags):
    return [sys.executable, "-P", "-m", "dpr.serve.cli", str(export_dir), "--port", str(port),
            "--log-level", "warning", *ENGINE_FLAGS, *flags]


def start(export_dir, tmp_path, *flags, wait_ready=True) -> Server:
    port = free_port()
    s = Server(serve_cmd(export_dir, port, *flags), port, log_path=tmp_path / f"server-{port}.log")
    return s.start(wait_ready=wait_ready)


def stop_clean(s: Server) -> None:
    code = s.stop()
    assert code == 0, s.log()
    assert not port_open(s.port), "the port is still open after the server stopped"
    assert not s.leftover, "a process of the server's group outlived it"


@pytest.fixture(scope="module")
def server(export_dir, tmp_path_factory):
    s = start(export_dir, tmp_path_factory.mktemp("serve"))
    yield s
    stop_clean(s)


@pytest.fixture(scope="module")
def limited(export_dir, tmp_path_factory):
    """Small limits, so each one can be crossed cheaply."""
    s = start(export_dir, tmp_path_factory.mktemp("serve-limits"), "--max-history", "50", "--max-k", "20",
              "--max-prompt-bytes", "200", "--max-body-bytes", "20000", "--max-requests-per-call", "8")
    yield s
    stop_clean(s)


from dpr_tests_serve_answers import REQUESTS, assert_same, expected, v2_body  # noqa: E402 - tests/serve_answers.py (conftest.py)


def test_health_metadata_and_docs(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/v2/health/live").json() == {"live": True}
        assert c.get("/v2/health/ready").json() == {"ready": True}
        assert c.get("/v2/models/dpr/ready").status_code == 200
        assert c.get("/v2").json()["name"] == "dpr"
        meta = c.get("/v2/models/dpr").json()
        assert [i["name"] for i in meta["inputs"]][:2] == ["history", "prompt"]
        assert [o["name"] for o in meta["outputs"]] == ["item_ids", "scores", "counts"]
        assert meta["parameters"]["num_items"] == 400 and meta["parameters"]["max_batch_size"] == 512
        r = c.get("/v2/models/other")
        assert r.status_code == 404 and "unknown model 'other'" in r.json()["error"]
        assert c.post("/v2/models/other/infer", json={"inputs": []}).status_code == 404
        spec = c.get("/openapi.json").json()
        assert {"/recommend", "/v2/models/{model}/infer", "/v2/health/ready", "/metrics"} <= set(spec["paths"])
        assert "RecommendRequest" in json.dumps(spec["components"])
        assert "swagger" in c.get("/docs").text.lower()
        idx = c.post("/v2/repository/index").json()
        assert idx == [{"name": "dpr", "version": "1", "state": "READY"}]


def test_recommend_equals_engine(server, engine):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for req in REQUESTS:
            r = c.post("/recommend", json=req)
            assert r.status_code == 200, r.text
            assert_same(r.json(), expected(engine, req))
        r = c.post("/recommend", json=REQUESTS)              # a list: answered in order, mixed k and flags
        assert r.status_code == 200, r.text
        got = r.json()
        assert len(got) == len(REQUESTS)
        for g, req in zip(got, REQUESTS):
            assert_same(g, expected(engine, req))
        assert got[-1]["count"] < 399 and "hard filter" in got[-1]["short_reason"]


def test_concurrent_single_requests_equal_engine(server, engine):
    """64 requests from 16 threads: the batcher merges them; each answer is still its own."""
    reqs = [{"history": [f"i{1 + (7 * j) % 400}", f"i{1 + (13 * j) % 400}"], "k": 5,
             "prompt": ["something funny", None, "more comedy"][j % 3]} for j in range(64)]
    with httpx.Client(base_url=server.url, timeout=60) as c, ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda r: c.post("/recommend", json=r), reqs))
    for r, req in zip(got, reqs):
        assert r.status_code == 200, r.text
        assert_same(r.json(), expected(engine, req))


def test_v2_infer_json_equals_engine(server, engine):
    hist = [["i1", "i2", "i3"], ["i10"], ["i4", "i9"]]
    prompts = ["something funny", None, "more comedy"]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post("/v2/models/dpr/infer", json=v2_body(hist, prompts, k=[4, 4, 6]))
        assert r.status_code == 200, r.text
        body = r.json()
    assert body["id"] == "req-1" and body["model_name"] == "dpr"
    out = {o["name"]: o for o in body["outputs"]}
    assert out["item_ids"]["shape"] == [3, 6] and out["counts"]["data"] == [4, 4, 6]
    ids = np.array(out["item_ids"]["data"], dtype=object).reshape(3, 6)
    scores = np.array(out["scores"]["data"], dtype=np.float32).reshape(3, 6)
    for i, (h, p, k) in enumerate(zip(hist, prompts, [4, 4, 6])):
        want = engine.recommend([h], prompts=[p], k=k)[0]
        assert ids[i, :k].tolist() == want.item_ids and all(x == "" for x in ids[i, k:])
        np.testing.assert_allclose(scores[i, :k], want.scores, rtol=1e-5, atol=1e-5)


def test_v2_infer_filters_and_flags(server, engine):
    """The optional inputs: per-row hard filters (padded BYTES), exclude_history, a negative prompt."""
    body = v2_body([["i1", "i2"], ["i3"]], ["something funny", None], k=[6, 6])
    body["inputs"] += [
        {"name": "negative_prompt", "datatype": "BYTES", "shape": [2, 1], "data": ["", "no horror"]},
        {"name": "include_tags", "datatype": "BYTES", "shape": [2, 2], "data": ["comedy", "drama", "", ""]},
        {"name": "exclude_items", "datatype": "BYTES", "shape": [2, 1], "data": ["", "i47"]},
        {"name": "exclude_history", "datatype": "BOOL", "shape": [2, 1], "data": [False, False]}]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post("/v2/models/dpr/infer", json=body)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    want = engine.recommend([["i1", "i2"], ["i3"]], prompts=["something funny", None],
                            negative_prompts=[None, "no horror"], k=6, exclude_history=False,
                            hard_filter=[{"include_tags": ["comedy", "drama"]}, {"exclude_items": ["i47"]}])
    ids = np.array(out["item_ids"]["data"], dtype=object).reshape(2, 6).tolist()
    assert ids == want.item_ids
    np.testing.assert_allclose(np.array(out["scores"]["data"]).reshape(2, 6), np.array(want.scores), rtol=1e-5, atol=1e-5)


def test_unknown_items_ignore(export_dir, tmp_path):
    """--unknown-items ignore: unknown history ids are skipped (as Engine.load(unknown_items="ignore") does)."""
    from dpr.engine import Engine

    s = start(export_dir, tmp_path, "--unknown-items", "ignore")
    try:
        with httpx.Client(base_url=s.url, timeout=30) as c:
            r = c.post("/recommend", json={"history": ["i1", "no-such-id", "i2"], "prompt": "something funny", "k": 5})
        assert r.status_code == 200, r.text
        with Engine.load(export_dir, backend="onnxruntime", retriever="onnxruntime", unknown_items="ignore") as e:
            want = e.recommend([["i1", "no-such-id", "i2"]], prompts=["something funny"], k=5)[0].to_dict()
        assert_same(r.json(), want)
    finally:
        stop_clean(s)


def test_v2_infer_tritonclient_http(server, engine):
    """tritonclient's HTTP client (binary tensor extension by default) against the dpr service."""
    th = pytest.importorskip("tritonclient.http")
    c = th.InferenceServerClient(server.url.removeprefix("http://"))
    assert c.is_server_live() and c.is_model_ready("dpr")
    h = np.array([[b"i1", b"i2"], [b"i3", b""]], dtype=object)
    p = np.array([[b"something funny"], [b""]], dtype=object)
    inputs = [th.InferInput("history", list(h.shape), "BYTES"), th.InferInput("prompt", list(p.shape), "BYTES")]
    inputs[0].set_data_from_numpy(h)
    inputs[1].set_data_from_numpy(p)
    r = c.infer("dpr", inputs)
    want = engine.recommend([["i1", "i2"], ["i3"]], prompts=["something funny", None], k=10)
    assert [[x.decode() for x in row] for row in r.as_numpy("item_ids")] == want.item_ids
    np.testing.assert_allclose(r.as_numpy("scores"), np.array(want.scores), rtol=1e-5, atol=1e-5)
    assert r.as_numpy("counts").ravel().tolist() == [10, 10]
    c.close()


BAD = [  # (route, body or raw bytes, status, words the message must hold)
    ("/recommend", {"history": ["i1", "nope"]}, 422, ["unknown item id 'nope'", "position 1"]),
    ("/recommend", [{"history": ["i1"]}, {"history": ["zz"]}], 422, ["request 1", "'zz'"]),
    ("/recommend", {"history": ["i1"], "k": 0}, 422, ["k must be >= 1"]),
    ("/recommend", {"history": ["i1"], "k": 21}, 422, ["k=21", "limit of 20", "--max-k"]),
    ("/recommend", {"history": ["i1"] * 51}, 422, ["51 item ids", "limit is 50", "--max-history"]),
    ("/recommend", {"history": ["i1"], "prompt": "x" * 201}, 422, ["201 bytes", "limit is 200", "--max-prompt-bytes"]),
    ("/recommend", {"history": ["i1"], "prompt": "   "}, 422, ["prompt is empty"]),
    ("/recommend", {"history": []}, 422, ["history is empty"]),
    ("/recommend", {"prompt": "x"}, 422, ["history", "Field required"]),
    ("/recommend", {"history": ["i1"], "colour": "red"}, 422, ["colour", "Extra inputs"]),
    ("/recommend", {"history": "i1"}, 422, ["history", "valid list"]),
    ("/recommend", {"history": ["i1"], "hard_filter": {"include_tags": ["jazz"]}}, 422, ["unknown tag", "jazz"]),
    ("/recommend", [], 422, ["empty"]),
    ("/recommend", [{"history": ["i1"]}] * 9, 413, ["9 requests", "limit is 8", "--max-requests-per-call"]),
    ("/recommend", b"{not json", 422, ["JSON"]),
    ("/recommend", {"history": ["i1"] * 40, "prompt": "y" * 190, "negative_prompt": "z" * 190,
                    "pad": "p" * 20000}, 413, ["limit is 20000", "--max-body-bytes"]),
    ("/v2/models/dpr/infer", {"inputs": [{"name": "hist", "datatype": "BYTES", "shape": [1, 1], "data": ["i1"]}]},
     422, ["unknown input(s) ['hist']"]),
    ("/v2/models/dpr/infer", {"inputs": [{"name": "history", "datatype": "BYTES", "shape": [2, 2], "data": ["i1"]}]},
     422, ["shape [2, 2] needs 4 elements, got 1"]),
    ("/v2/models/dpr/infer", {"inputs": [{"name": "history", "datatype": "INT32", "shape": [1, 1], "data": [1]}]},
     422, ["history", "BYTES"]),
    ("/v2/models/dpr/infer", {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1, 1], "data": ["a"]}]},
     422, ["'history' is required"]),
    ("/v2/models/dpr/infer", {"inputs": [{"name": "history", "datatype": "BYTES", "shape": [1, 1], "data": ["i1"]},
                                         {"name": "k", "datatype": "FP32", "shape": [1, 1], "data": [2.5]}]},
     422, ["'k' must be an integer"]),
    ("/v2/models/dpr/infer", {"inputs": [{"name": "history", "datatype": "BYTES", "shape": [1, 1], "data": ["i999"]}]},
     422, ["unknown item id 'i999'"]),
    ("/v2/models/dpr/infer", {"outputs": []}, 422, ["inputs"]),
]


@pytest.mark.parametrize("route,body,status,words", BAD, ids=[f"{i}-{b[0].split('/')[-1]}" for i, b in enumerate(BAD)])
def test_bad_requests(limited, route, body, status, words):
    with httpx.Client(base_url=limited.url, timeout=30) as c:
        if isinstance(body, bytes):
            r = c.post(route, content=body, headers={"content-type": "application/json"})
        else:
            r = c.post(route, json=body)
        assert r.status_code == status, r.text
        msg = r.json()["error"]
        for w in words:
            assert w in msg, (w, msg)
        assert c.post("/recommend", json={"history": ["i1"], "k": 2}).status_code == 200   # still serving


def test_chunked_body_over_the_limit(limited):
    """A body sent without Content-Length is counted as it arrives."""
    def chunks():
        for _ in range(30):
            yield b" " * 1000
    with httpx.Client(base_url=limited.url, timeout=30) as c:
        r = c.post("/recommend", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "--max-body-bytes" in r.json()["error"]


def test_metrics(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for _ in range(3):
            assert c.post("/recommend", json={"history": ["i1"], "prompt": "something funny"}).status_code == 200
        assert c.post("/recommend", json={"history": ["bad-id"]}).status_code == 422
        text = c.get("/metrics").text
    lines = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln and ln[0] != "#"}
    assert lines['dpr_http_requests_total{route="/recommend",status="200"}'] >= 3
    assert lines['dpr_http_requests_total{route="/recommend",status="422"}'] >= 1
    assert lines['dpr_http_request_duration_seconds_count{route="/recommend"}'] >= 4
    assert lines["dpr_batch_size_count"] >= 1 and lines["dpr_recommendations_total"] >= 3
    assert lines["dpr_queue_depth"] == 0
    assert 0 < lines["dpr_prompt_cache_hit_rate"] <= 1          # the repeated prompt hit the cache
    assert lines["dpr_ready"] == 1
    assert any(k.startswith("dpr_backend_info{") and 'backend="onnxruntime"' in k for k in lines)


def post_many(url, reqs, threads):
    with httpx.Client(base_url=url, timeout=60) as c, ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda r: c.post("/recommend", json=r), reqs))


def test_overload_answers_503_and_never_hangs(export_dir, tmp_path):
    # the first 4 requests wait 3 s for company: the other 12 find the queue full (even on a loaded machine)
    s = start(export_dir, tmp_path, "--max-queue", "4", "--max-queue-delay-us", "3000000")
    try:
        t0 = time.monotonic()
        got = post_many(s.url, [{"history": ["i1", f"i{j + 2}"], "k": 3} for j in range(16)], 16)
        assert time.monotonic() - t0 < 30
        codes = [r.status_code for r in got]
        assert set(codes) <= {200, 503} and codes.count(503) >= 1 and codes.count(200) >= 4, codes
        busy = next(r for r in got if r.status_code == 503)
        assert busy.headers["retry-after"] == "1"
        assert "queue is full" in busy.json()["error"] and "--max-queue" in busy.json()["error"]

        # the v2 route's plain calls (answered by the batching front) are refused the same way
        with httpx.Client(base_url=s.url, timeout=60) as c, ThreadPoolExecutor(16) as pool:
            got = list(pool.map(lambda j: c.post("/v2/models/dpr/infer", json=v2_body([["i1", f"i{j + 2}"]], k=[3])),
                                range(16)))
            text = c.get("/metrics").text
        codes = [r.status_code for r in got]
        assert set(codes) <= {200, 503} and codes.count(503) >= 1 and codes.count(200) >= 4, codes
        busy = next(r for r in got if r.status_code == 503)
        assert busy.headers["retry-after"] == "1" and "queue is full" in busy.json()["error"]
        assert f'dpr_http_requests_total{{route="/v2/models/{{model}}/infer",status="503"}} {float(codes.count(503))}' \
            in text
    finally:
        stop_clean(s)


def test_sigterm_drains_in_flight_requests(export_dir, tmp_path, engine):
    """Requests waiting in the batcher (a 4 s queue delay) when SIGTERM arrives are all answered."""
    s = start(export_dir, tmp_path, "--max-queue-delay-us", "4000000", "--drain-timeout-s", "20")
    reqs = [{"history": [f"i{j + 1}"], "k": 3, "prompt": "something funny"} for j in range(8)]
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(post_many, s.url, reqs, 8)
        deadline = time.monotonic() + 3.5
        with httpx.Client(base_url=s.url, timeout=10) as c:
            while time.monotonic() < deadline:     # wait until all 8 are queued, then SIGTERM
                m = [ln for ln in c.get("/metrics").text.splitlines() if ln.startswith("dpr_queue_depth ")]
                if m and float(m[0].split()[1]) == 8:
                    break
                time.sleep(0.02)
            else:
                pytest.fail("the requests never queued")
        s.signal(signal.SIGTERM)
        got = fut.result(timeout=60)
    assert [r.status_code for r in got] == [200] * 8
    for r, req in zip(got, reqs):
        assert_same(r.json(), expected(engine, req))
    assert s.proc.wait(30) == 0
    stop_clean(s)


def test_hot_reload_under_load(export_dir, tmp_path, engine):
    """A v2 repository load of another export, a broken export and SIGHUP, while 4 clients keep sending:
    0 failed requests, answers equal to the engine's; the broken export leaves the old engine serving."""
    good = tmp_path / "export-b"
    shutil.copytree(export_dir, good)
    broken = tmp_path / "export-broken"
    shutil.copytree(export_dir, broken)
    emb = broken / "item_embeddings.npy"
    emb.write_bytes(emb.read_bytes()[:100])
    s = start(export_dir, tmp_path)
    reqs = [{"history": [f"i{1 + j % 400}", f"i{1 + (j * 11) % 400}"], "k": 5,
             "prompt": "something funny" if j % 2 else None} for j in range(40)]
    want = [expected(engine, r) for r in reqs]
    stop = threading.Event()
    failures, answered, big_calls = [], [0], [0]
    big = reqs * 4                                # a body over body_columns.MIN_BYTES: read by the native parser
    assert len(json.dumps(big, separators=(",", ":"))) >= body_columns.MIN_BYTES        # as httpx writes it

    def client(seed):
        i = seed
        with httpx.Client(base_url=s.url, timeout=60) as c:
            t_end = time.monotonic() + 90             # bounded in time and count
            while not stop.is_set() and time.monotonic() < t_end and answered[0] < 20000:
                if seed == 4:                         # its Parts are in indices of the engine that read them
                    r = c.post("/recommend", json=big)
                    got, wanted = (r.json() if r.status_code == 200 else None), want * 4
                    big_calls[0] += 1
                else:
                    r = c.post("/recommend", json=reqs[i % len(reqs)])
                    got, wanted = (r.json() if r.status_code == 200 else None), want[i % len(reqs)]
                if r.status_code != 200:
                    failures.append((r.status_code, r.text))
                else:
                    try:
                        if seed == 4:
                            assert len(got) == len(wanted)
                            for g, w in zip(got, wanted):
                                assert_same(g, w)
                        else:
                            assert_same(got, wanted)
                    except AssertionError as exc:
                        failures.append(("mismatch", str(exc)))
                answered[0] += 1
                i += 4

    try:
        with ThreadPoolExecutor(5) as pool:
            futs = [pool.submit(client, j) for j in range(5)]
            with httpx.Client(base_url=s.url, timeout=120) as c:
                time.sleep(0.5)
                r = c.post("/v2/repository/models/dpr/load", json={"parameters": {"export_dir": str(good)}})
                assert r.status_code == 200 and r.json()["ok"] is True, r.text
                assert c.get("/v2/models/dpr").json()["parameters"]["export"] == str(good)
                r = c.post("/v2/repository/models/dpr/load", json={"parameters": {"export_dir": str(broken)}})
                assert r.status_code == 400, r.text
                assert "item_embeddings.npy" in r.json()["error"] and "previous engine keeps serving" in r.json()["error"]
                meta = c.get("/v2/models/dpr").json()["parameters"]
                assert meta["export"] == str(good) and meta["last_reload"]["ok"] is False
                assert c.get("/v2/health/ready").status_code == 200
                s.signal(signal.SIGHUP)                 # reload the current export
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    if 'dpr_reloads_total{outcome="ok"} 2.0' in c.get("/metrics").text:
                        break
                    time.sleep(0.1)
                else:
                    pytest.fail("SIGHUP did not reload")
                time.sleep(0.3)
            stop.set()
            for f in futs:
                f.result(timeout=120)
        assert failures == [] and answered[0] > 20 and big_calls[0] > 3
    finally:
        stop.set()
        stop_clean(s)


def test_not_ready_until_a_good_export_loads(export_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(export_dir, broken)
    (broken / "manifest.json").write_text("{")
    s = start(broken, tmp_path, wait_ready=False)
    try:
        s.wait_ready(60, status=503)
        with httpx.Client(base_url=s.url, timeout=60) as c:
            assert c.get("/v2/health/live").status_code == 200
            r = c.get("/v2/health/ready")
            assert r.status_code == 503 and "manifest.json" in r.json()["error"]
            r = c.post("/recommend", json={"history": ["i1"]})
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert c.post("/v2/repository/index").json()[0]["state"] == "UNAVAILABLE"
            r = c.post("/v2/repository/models/dpr/load", json={"parameters": {"export_dir": str(export_dir)}})
            assert r.status_code == 200, r.text
            assert c.get("/v2/health/ready").status_code == 200
            assert c.post("/recommend", json={"history": ["i1"], "k": 2}).json()["count"] == 2
    finally:
        stop_clean(s)


def test_bare_name_serve_is_never_the_folder():
    """Python started in the repository root (root on sys.path): `import serve` must not import serve/
    (dpr/_bare_name.py); with no installed 'serve' module the error names dpr.serve."""
    import os
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    code = ("try:\n    import serve\n    print('FILE', serve.__file__)\n"
            "except ModuleNotFoundError as e:\n    print('MISSING', e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True,
                         timeout=120).stdout
    if out.startswith("MISSING"):
        assert "dpr.serve" in out
    else:
        assert str(repo / "serve") not in out, out


def test_triton_repository_files(export_dir, tiny_checkpoint, tmp_path, capsys):
    """The repository `dpr-export --triton-repo` writes (served for real in test_serve_triton.py), and a used
    folder refused before the export runs."""
    from dpr.export.cli import main as export_main
    from dpr.serve.config import ServeConfig
    from dpr.serve.triton_repo import write_repository

    model = write_repository(tmp_path / "repo", export_dir, ServeConfig(max_batch_size=64, preferred_batch_size=32,
                                                                         max_queue_delay_us=750, instances=2),
                             backend="python")                  # dpr-export's default: portable to NVIDIA's container
    cfg = (model / "config.pbtxt").read_text()
    for words in ('backend: "python"', "instance_group [ { count: 2 kind: KIND_CPU } ]", "max_batch_size: 64", "preferred_batch_size: [ 32 ]",
                  "max_queue_delay_microseconds: 750", 'name: "prompt" data_type: TYPE_STRING dims: [ 1 ] optional: true',
                  'name: "counts" data_type: TYPE_INT32 dims: [ 1 ]', 'key: "export_dir" value: { string_value: "export" }'):
        assert words in cfg, words
    assert "from dpr.serve.triton_python import TritonPythonModel" in (model / "1" / "model.py").read_text()
    with pytest.raises(Exception, match="instances must be >= 1"):
        ServeConfig(instances=0).check()
    assert (model / "1" / "export" / "manifest.json").read_bytes() == (export_dir / "manifest.json").read_bytes()
    t0 = time.monotonic()
    rc = export_main([str(tiny_checkpoint), "--out", str(tmp_path / "exp2"), "--triton-repo", str(tmp_path / "repo")])
    assert rc == 1 and "already exists and is not empty" in capsys.readouterr().err
    assert not (tmp_path / "exp2").exists() and time.monotonic() - t0 < 10     # refused before exporting
