"""The soak's short form through Triton (``python -m dpr.bench.soak --target triton`` runs the long one): client
threads send the pool's mixed valid and invalid requests with tritonclient (HTTP, binary tensors) to the
tritonserver nvidia-pytriton ships, serving the tests' export; every answer is checked against its own request's,
every refusal must name the engine's field. Both backends: the native one (the engine inside tritonserver) and
the Python one, whose memory, fds and threads are those of the tritonserver process and its stub, summed.

Bounded: 4 threads x 200 requests, ``max_seconds`` per run; no latency is asserted (the 2-core machine is shared).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from dpr.bench.soak import Answer, ProcProbe, make_pool, run_soak, verdict

REPO = Path(__file__).resolve().parents[1]
TRITON_PY = Path(os.environ.get("DPR_TRITON_PYTHON", REPO / ".venv-triton" / "bin" / "python"))
pytestmark = pytest.mark.skipif(not TRITON_PY.exists(), reason=f"no Triton environment at {TRITON_PY}: `make "
                                "triton-env` builds it (needs Debian's python3.11; README Serving)")
pytest.importorskip("tritonclient.http", reason='needs the [serve] extra (tritonclient)')


@pytest.fixture(scope="module")
def pool(engine):
    return make_pool(engine, valid=96, invalid=32, seed=1)


@pytest.mark.parametrize("triton_backend", ["native", "python"])
def test_short_triton_soak_loses_and_crosses_nothing(engine, export_dir, pool, tmp_path, monkeypatch, triton_backend):
    from dpr.bench.soak_triton import TritonProbe, TritonTarget, child_pids, triton_server

    monkeypatch.setenv("DPR_TRITON_PYTHON", str(TRITON_PY))
    with triton_server(export_dir, tmp_path, "onnxruntime", "onnxruntime", max_batch=32, max_delay_ms=1,
                       triton_backend=triton_backend) as server:
        assert server.triton_pid != server.proc.pid, "tritonserver was not found under its launcher"
        probe = TritonProbe(server.triton_pid)
        if triton_backend == "python":
            assert len(child_pids(server.triton_pid)) == 1      # the Python backend stub: the engine's process
            assert probe.threads() > ProcProbe(server.triton_pid).threads() > 0   # the stub's are counted too
        else:
            assert child_pids(server.triton_pid) == []          # the engine runs inside tritonserver
            assert (tmp_path / "repo" / "dpr" / "libtriton_dpr.so").is_file()
        report = run_soak(lambda: TritonTarget(server.url, workers=16, timeout_s=30), pool, threads=4,
                          requests_per_thread=200, inflight=4, max_seconds=90, request_timeout_s=30, probe=probe)
        assert server.proc.poll() is None, server.log()
    print({k: report[k] for k in ("answered", "lost", "crossed", "wrong", "error_mismatch", "elapsed_s",
                                  "throughput_rps", "rss_warm_mb", "rss_end_mb", "fds_before", "fds_after",
                                  "threads_before", "threads_after", "target_stats")})
    assert report["not_sent"] == 0 and report["answered"] == report["requests"] == 4 * 200, report
    assert report["valid_sent"] > 0 and report["invalid_sent"] > 0
    codes = report["target_stats"]["http_status"]
    assert set(codes) <= {"200", "400"}, codes                 # no 5xx: every refusal is the protocol's or ours
    assert codes.get("200", 0) == report["valid_sent"] and codes.get("400", 0) == report["invalid_sent"], codes
    assert not report["target_stats"]["transport_errors"], report["target_stats"]
    assert report["lost"] == report["crossed"] == report["wrong"] == report["error_mismatch"] == 0, report["examples"]
    assert verdict(report) == [], (verdict(report), report["examples"])   # incl. fds and threads back to their count


def test_triton_refusals_are_matched_by_field():
    """same_error: a 4xx naming the engine's field matches; another field, a 5xx or an answer does not; an unknown
    input matches the engine's unknown key or field of that name."""
    from dpr.bench.soak_triton import TritonTarget

    t = TritonTarget.__new__(TritonTarget)             # same_error reads no state: no server needed
    k_err = Answer(False, error_type="InputError", message="request: k must be an integer, got '5'")
    got_k = Answer(False, error_type="HTTP 400", message="[request id: <id_unknown>] inference input 'k' data-type "
                                                         "is 'BYTES', but model 'dpr' expects 'INT32'")
    assert t.same_error(k_err, got_k)
    assert not t.same_error(k_err, Answer(False, error_type="HTTP 500", message=got_k.message))
    assert not t.same_error(k_err, Answer(False, error_type="HTTP 400", message="row 0: history is empty (...)"))
    assert not t.same_error(k_err, Answer(True, ["i1"], [1.0]))
    colour = Answer(False, error_type="InputError", message="request: hard_filter has unknown key(s) ['colour']; "
                                                            "allowed: include_tags, exclude_tags, exclude_items")
    assert t.same_error(colour, Answer(False, error_type="HTTP 400",
                                       message="unexpected inference input 'colour' for model 'dpr'"))
    assert not t.same_error(colour, Answer(False, error_type="HTTP 400",
                                           message="unexpected inference input 'surprise' for model 'dpr'"))


# ---- the model keeps a failing request's batch-mates answered -----------------------------------------------------

def test_a_request_that_breaks_the_reader_fails_alone(export_dir, monkeypatch):
    """In process, with a stand-in for Triton's ``triton_python_backend_utils``: an exception that is not an
    InputError while one request is read fails that request (500, named), not every request of its batch (raised
    out of ``execute``, it did)."""
    import sys
    import types

    class TritonError(Exception):
        INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

        def __init__(self, message, code="INTERNAL"):
            super().__init__(message)
            self.code = code

    pb = types.SimpleNamespace(TritonError=TritonError, Tensor=lambda n, a: (n, a),
                               InferenceResponse=lambda output_tensors=(), error=None: (dict(output_tensors), error))
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    monkeypatch.delitem(sys.modules, "dpr.serve.triton_python", raising=False)
    from dpr.serve.triton_python import TritonPythonModel

    class Broken:
        def name(self):
            return "history"

        def as_numpy(self):
            raise RuntimeError("the stub could not read this tensor")

    class Request:                               # pb_utils.InferenceRequest's reading side: inputs() -> tensors
        def __init__(self, *tensors):
            self._tensors = tensors

        def inputs(self):
            return list(self._tensors)
    history = types.SimpleNamespace(name=lambda: "history", as_numpy=lambda: np.array([[b"i1", b"i2"]], dtype=object))
    good = Request(history)
    params = {"export_dir": str(export_dir), "backend": "onnxruntime", "retriever": "onnxruntime"}
    m = TritonPythonModel()
    m.initialize({"model_config": json.dumps({"parameters": {k: {"string_value": v} for k, v in params.items()}}),
                  "model_repository": "", "model_version": "1"})
    try:
        out = m.execute([good, Request(Broken()), good])
    finally:
        m.finalize()
        sys.modules.pop("dpr.serve.triton_python", None)     # imported against the stand-in: not for other tests
    (a, err_a), (b, err_b), (c, err_c) = out
    assert err_a is None and err_c is None and a["item_ids"].shape == (1, 10) and (a["scores"] == c["scores"]).all()
    assert err_b.code == "INTERNAL" and "RuntimeError: the stub could not read this tensor" in str(err_b), err_b
