"""Triton Inference Server run for real: the tritonserver that nvidia-pytriton ships, in .venv-triton (Debian's
python3.11, `make triton-env`), on 127.0.0.1, queried with tritonclient over HTTP and gRPC. Answers must equal
the in-process engine's on the same export."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from dpr.serve.procs import Server, free_ports, port_open
from dpr_tests_serve_answers import triton_inputs as inputs  # noqa: E402 - tests/serve_answers.py (conftest.py)

REPO = Path(__file__).resolve().parents[1]
TRITON_PY = Path(os.environ.get("DPR_TRITON_PYTHON", REPO / ".venv-triton" / "bin" / "python"))

pytestmark = pytest.mark.skipif(
    not TRITON_PY.exists(),
    reason=f"no Triton environment at {TRITON_PY}: `make triton-env` builds it (needs Debian's python3.11: "
           f"apt-get install python3.11 python3.11-venv; README Serving)")
th = pytest.importorskip("tritonclient.http", reason='needs the [serve] extra (tritonclient)')
tg = pytest.importorskip("tritonclient.grpc", reason='needs the [serve] extra (tritonclient)')


def ports():
    return free_ports(3)


def triton_env():
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


def stop_clean(s: Server) -> None:
    code = s.stop()
    assert code == 0, s.log()
    for p in s.ports:
        assert not port_open(p), f"port {p} still open after tritonserver stopped"
    assert not s.leftover, "a backend stub outlived tritonserver"


def check(result, engine, histories, prompts, k):
    want = engine.recommend(histories, prompts=prompts, k=k)
    ids = result.as_numpy("item_ids")
    assert [[x.decode() for x in row[:k]] for row in ids] == want.item_ids
    np.testing.assert_allclose(result.as_numpy("scores")[:, :k], np.array(want.scores), rtol=1e-5, atol=1e-5)
    assert result.as_numpy("counts").ravel().tolist() == want.counts


@pytest.fixture(scope="module")
def triton_repo(tiny_checkpoint, tmp_path_factory):
    """`dpr-export --triton-repo` (the CLI, in the Triton venv) on the tiny checkpoint."""
    d = tmp_path_factory.mktemp("triton")
    r = subprocess.run([str(TRITON_PY), "-P", "-m", "dpr.export.cli", str(tiny_checkpoint), "--out", str(d / "exp"),
                        "--triton-repo", str(d / "repo")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wrote the Triton model repository" in r.stdout
    cfg = (d / "repo" / "dpr" / "config.pbtxt").read_text()
    for words in ("max_batch_size: 512", "preferred_batch_size: [ 512 ]", "max_queue_delay_microseconds: 0",
                  'name: "history" data_type: TYPE_STRING dims: [ -1 ] allow_ragged_batch: true'):
        assert words in cfg
    assert (d / "repo" / "dpr" / "1" / "model.py").is_file()
    assert (d / "repo" / "dpr" / "1" / "export" / "manifest.json").is_file()
    # serve it as the engine fixture does (ONNX Runtime backend and retriever), so answers compare exactly
    cfgp = d / "repo" / "dpr" / "config.pbtxt"
    cfgp.write_text(cfgp.read_text().replace('key: "backend" value: { string_value: "auto" }',
                                             'key: "backend" value: { string_value: "onnxruntime" }')
                    .replace('key: "retriever" value: { string_value: "auto" }',
                             'key: "retriever" value: { string_value: "onnxruntime" }'))
    return d / "repo"


def test_repository_served_by_tritonserver(triton_repo, engine, tmp_path):
    """The repository dpr-export wrote, on the bundled tritonserver: HTTP and gRPC answers equal the engine's;
    a bad request gets an error naming the problem and its batch-mates are answered."""
    http, grpc, metrics = ports()
    cmd = [str(TRITON_PY), "-P", "-m", "dpr.serve.triton_server", str(triton_repo), "--port", str(http),
           "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    s = Server(cmd, http, env=triton_env(), log_path=tmp_path / "triton.log", ports=(grpc, metrics)).start(180)
    try:
        hist = [["i1", "i2", "i3"], ["i10"], ["i4", "i9"]]
        prompts = ["something funny", None, "more comedy"]
        hc = th.InferenceServerClient(f"127.0.0.1:{http}")
        assert hc.is_server_ready() and hc.is_model_ready("dpr")
        meta = hc.get_model_config("dpr")
        # ServeConfig's default (0); Triton's JSON leaves a zero field out
        assert str(meta["dynamic_batching"].get("max_queue_delay_microseconds", 0)) == "0"
        check(hc.infer("dpr", inputs(th, hist, prompts, k=[5, 5, 5])), engine, hist, prompts, 5)
        gc = tg.InferenceServerClient(f"127.0.0.1:{grpc}")
        assert gc.is_model_ready("dpr")
        check(gc.infer("dpr", inputs(tg, hist, prompts)), engine, hist, prompts, 10)

        # concurrent requests of different widths (ragged) and one bad request in the same window
        def one(j):
            h = [[f"i{1 + (j * 7 + t) % 400}" for t in range(1 + j % 5)]]
            try:
                return j, gc.infer("dpr", inputs(tg, h, ["something funny" if j % 2 else None], k=[4])), h
            except Exception as exc:  # noqa: BLE001 - the bad one
                return j, exc, h
        with ThreadPoolExecutor(8) as pool:
            futs = [pool.submit(one, j) for j in range(24)]
            bad = pool.submit(lambda: gc.infer("dpr", inputs(tg, [["i1", "no-such-id"]])))
            done = [f.result(timeout=120) for f in futs]
        for j, r, h in done:
            assert not isinstance(r, Exception), r
            check(r, engine, h, ["something funny" if j % 2 else None], 4)
        with pytest.raises(Exception) as ei:
            bad.result(timeout=120)
        assert "unknown item id 'no-such-id'" in str(ei.value)
        # a request alone in its execute call: the engine's own check names the id, its position and the row
        with pytest.raises(th.InferenceServerException) as ei:
            hc.infer("dpr", inputs(th, [["i1"], ["i2", "i3", "no-such-id"]], k=[3, 3]))
        msg = str(ei.value)
        assert "unknown item id 'no-such-id'" in msg and "row 1" in msg and "position 2" in msg, msg
        check(hc.infer("dpr", inputs(th, hist, prompts, k=[5, 5, 5])), engine, hist, prompts, 5)   # still serving
        with pytest.raises(th.InferenceServerException) as ei:
            hc.infer("dpr", inputs(th, [["i1"]], k=[0]))
        assert "k must be >= 1" in str(ei.value)

        # the optional hard filter, per row (padded BYTES)
        ins = inputs(tg, [["i1", "i2"], ["i3"]], ["something funny", None], k=[6, 6])
        tags = np.array([[b"comedy", b"drama"], [b"", b""]], dtype=object)
        items = np.array([[b""], [b"i47"]], dtype=object)
        for name, arr in (("include_tags", tags), ("exclude_items", items)):
            ins.append(tg.InferInput(name, list(arr.shape), "BYTES"))
            ins[-1].set_data_from_numpy(arr)
        r = gc.infer("dpr", ins)
        want = engine.recommend([["i1", "i2"], ["i3"]], prompts=["something funny", None], k=6,
                                hard_filter=[{"include_tags": ["comedy", "drama"]}, {"exclude_items": ["i47"]}])
        assert [[x.decode() for x in row] for row in r.as_numpy("item_ids")] == want.item_ids
        # an engine error about one row names that row of the request (the engine numbers its own batch)
        bad_tags = inputs(tg, [["i1"], ["i3"]], k=[6, 6])
        arr = np.array([[b"comedy"], [b"no-such-tag"]], dtype=object)
        bad_tags.append(tg.InferInput("include_tags", list(arr.shape), "BYTES"))
        bad_tags[-1].set_data_from_numpy(arr)
        with pytest.raises(tg.InferenceServerException) as ei:
            gc.infer("dpr", bad_tags)
        assert "row 1" in str(ei.value) and "no-such-tag" in str(ei.value), str(ei.value)
        hc.close()
        gc.close()
    finally:
        stop_clean(s)


def test_dpr_serve_triton(export_dir, engine, tmp_path):
    """`dpr-serve --triton EXPORT_DIR`: the export bound as a Triton model; gRPC and HTTP; SIGTERM stops it."""
    http, grpc, metrics = ports()
    cmd = [str(TRITON_PY), "-P", "-m", "dpr.serve.cli", "--triton", str(export_dir), "--port", str(http),
           "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--backend", "onnxruntime",
           "--retriever", "onnxruntime", "--max-queue-delay-us", "5000", "--max-batch-size", "64",
           "--preferred-batch-size", "32"]
    s = Server(cmd, http, env=triton_env(), log_path=tmp_path / "triton.log", ports=(grpc, metrics)).start(180)
    try:
        gc = tg.InferenceServerClient(f"127.0.0.1:{grpc}")
        cfg = gc.get_model_config("dpr", as_json=True)["config"]
        assert cfg["max_batch_size"] == 64
        assert [int(x) for x in cfg["dynamic_batching"]["preferred_batch_size"]] == [32]
        hist = [["i3", "i5"], ["i200", "i201", "i202", "i7"]]
        check(gc.infer("dpr", inputs(tg, hist, [None, "no horror"], k=[7, 7])), engine, hist, [None, "no horror"], 7)
        hc = th.InferenceServerClient(f"127.0.0.1:{http}")
        check(hc.infer("dpr", inputs(th, hist, ["more comedy", None], k=[3, 3])), engine, hist, ["more comedy", None], 3)
        # the load test's hand-written client: tritonclient's binary-tensor bodies on one keep-alive connection
        # each; answered calls count as such, a refused one as an error naming Triton's answer
        from dpr.serve.load import LoadConfig, run_triton_raw, triton_http_bodies

        good = triton_http_bodies(th, [inputs(th, hist, [None, "no horror"], k=[7, 7]), inputs(th, [["i9"]], k=[2])])
        out = asyncio.run(run_triton_raw(f"127.0.0.1:{http}", good, 2, 2, LoadConfig(requests=16, duration_s=60)))
        assert out["errors"] == 0 and out["calls"] == 8, out
        bad = triton_http_bodies(th, [inputs(th, [["no-such-id"]], k=[2])])
        out = asyncio.run(run_triton_raw(f"127.0.0.1:{http}", good + bad, 1, 1, LoadConfig(requests=6, duration_s=60),
                                         warm=[]))
        assert out["errors"] == 2 and out["calls"] == 6 and "HTTP 400" in out["error_sample"], out
        assert "no-such-id" in out["error_sample"], out
        # and its gRPC clients (tritonclient's request messages built once): the hand-written HTTP/2 one and
        # grpcio's asyncio channel
        from dpr.serve.load import GRPC_INFER, run_triton_grpc_raw, run_triton_grpcio, triton_grpc_requests
        from dpr.serve.raw_grpc import RawGRPC
        from tritonclient.grpc import service_pb2

        good = triton_grpc_requests([inputs(tg, hist, [None, "no horror"], k=[7, 7]), inputs(tg, [["i9"]], k=[2])])
        bad = triton_grpc_requests([inputs(tg, [["no-such-id"]], k=[2])])
        for run_grpc, conns in ((run_triton_grpc_raw, 1), (run_triton_grpc_raw, 0), (run_triton_grpcio, 1)):
            out = asyncio.run(run_grpc(f"127.0.0.1:{grpc}", good, 2, 2,
                                       LoadConfig(requests=16, duration_s=60, grpc_connections=conns)))
            assert out["errors"] == 0 and out["calls"] == 8, (run_grpc.__name__, conns, out)
            out = asyncio.run(run_grpc(f"127.0.0.1:{grpc}", good + bad, 1, 1, LoadConfig(requests=6, duration_s=60),
                                       warm=[]))
            assert out["errors"] == 2 and out["calls"] == 6 and "INVALID_ARGUMENT" in out["error_sample"], out
            assert "no-such-id" in out["error_sample"], out

        async def raw_answer(msg):
            c = RawGRPC("127.0.0.1", grpc, GRPC_INFER, timeout_s=60)
            try:
                return await c.call(msg)
            finally:
                c.close()
        from dpr.serve.load import triton_engine_counts

        before = triton_engine_counts(f"http://127.0.0.1:{http}")
        code, _, body = asyncio.run(raw_answer(good[0].SerializeToString()))
        # the load test's rows per engine call. Triton counts an execution after its answer has gone out: read
        # again for a moment (bounded) rather than race it
        for _ in range(50):
            after = triton_engine_counts(f"http://127.0.0.1:{http}")
            if after != before:
                break
            time.sleep(0.1)
        assert (after[0] - before[0], after[1] - before[1]) == (2, 1), (before, after)
        # many calls at once on one connection (HTTP/2 streams, as the load test's clients share one): each gets
        # the answer it gets alone
        many = [r.SerializeToString() for r in triton_grpc_requests(
            [inputs(tg, [[f"i{j % 40 + 1}", f"i{j % 13 + 2}"][: 1 + j % 2]], k=[1 + j % 6]) for j in range(24)])]

        async def raw_at_once(msgs):
            c = RawGRPC("127.0.0.1", grpc, GRPC_INFER, timeout_s=60)
            try:
                return await asyncio.gather(*(c.call(m) for m in msgs)), c.conn.stream
            finally:
                c.close()
        together, last_stream = asyncio.run(raw_at_once(many))
        assert last_stream == 2 * len(many) - 1, "every call should be a stream of the one connection"
        for msg, got in zip(many, together):
            alone = asyncio.run(raw_answer(msg))
            assert got[0] == 0 and alone[0] == 0
            a, b = ({o.name: raw for o, raw in zip(m.outputs, m.raw_output_contents)}
                    for m in (service_pb2.ModelInferResponse.FromString(x[2]) for x in (got, alone)))
            assert sorted(a) == ["counts", "item_ids", "scores"] and a.keys() == b.keys()
            assert a["item_ids"] == b["item_ids"] and a["counts"] == b["counts"]
            # scores may differ in their last bits with the rows a request is batched with (assert_same)
            np.testing.assert_allclose(np.frombuffer(a["scores"], np.float32), np.frombuffer(b["scores"], np.float32),
                                       rtol=1e-5, atol=1e-5)
        assert code == 0
        mine = service_pb2.ModelInferResponse.FromString(body)
        theirs = gc.infer("dpr", inputs(tg, hist, [None, "no horror"], k=[7, 7])).get_response()
        assert [o.name for o in mine.outputs] == [o.name for o in theirs.outputs]
        assert list(mine.raw_output_contents) == list(theirs.raw_output_contents)
        text = __import__("urllib.request").request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10).read()
        assert b'nv_inference_request_success{model="dpr"' in text
        hc.close()
        gc.close()
    finally:
        stop_clean(s)


PROBE_MODEL = """
import json, os, sys


class TritonPythonModel:
    def initialize(self, args):
        with open(os.environ["DPR_PROBE_OUT"], "w") as f:
            json.dump({"path": sys.path, "cwd": os.getcwd()}, f)

    def execute(self, requests):
        return []
"""
PROBE_CONFIG = """name: "probe"
backend: "python"
max_batch_size: 0
input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]
"""


def test_the_model_process_never_has_the_repository_root_on_sys_path(tmp_path):
    """The backend stub puts its working directory on sys.path (as ""), whatever PYTHONSAFEPATH says; a
    tritonserver started from the repository root must still not give the model engine/, kernels/, ..."""
    repo = tmp_path / "repo"
    (repo / "probe" / "1").mkdir(parents=True)
    (repo / "probe" / "1" / "model.py").write_text(PROBE_MODEL)
    (repo / "probe" / "config.pbtxt").write_text(PROBE_CONFIG)
    out = tmp_path / "probe.json"
    http, grpc, metrics = ports()
    cmd = [str(TRITON_PY), "-P", "-m", "dpr.serve.triton_server", str(repo), "--port", str(http),
           "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--model-name", "probe"]
    s = Server(cmd, http, env=dict(triton_env(), DPR_PROBE_OUT=str(out)), log_path=tmp_path / "triton.log",
               ports=(grpc, metrics), cwd=REPO).start(180)
    try:
        seen = json.loads(out.read_text())
    finally:
        stop_clean(s)
    root = os.path.realpath(REPO)
    on_path = [p for p in seen["path"] if os.path.realpath(p or seen["cwd"]) == root]
    assert not on_path, seen
