"""What a serving front end (HTTP, Ray, the fault tests) must answer for one ``/recommend`` request, the
comparison every serving test uses, sample requests, the HTTP service run in-process (``live_service``) and a
/metrics reader. Not a test module: conftest.py registers it as ``dpr_tests_serve_answers`` (see
tests/fuzz_strategies.py for why)."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np


def expected(engine, req: dict) -> dict:
    """What Engine.recommend answers for one /recommend request."""
    return engine.recommend([req["history"]], prompts=[req.get("prompt")],
                            negative_prompts=[req.get("negative_prompt")], k=req.get("k", 10),
                            exclude_history=req.get("exclude_history", True),
                            hard_filter=req.get("hard_filter"))[0].to_dict()


def tensor_request(hist_rows, prompts=None, negatives=None, k=None, excl=None, pad_before=0, **filters) -> dict:
    """One Triton / KServe v2 request as the model's named numpy tensors (``dpr.serve.tensors``): histories
    padded with empty strings after their ids (and ``pad_before`` before them), the optional [B, 1] inputs when
    given, and filter inputs (``include_tags=[[...], ...]``) padded per row."""
    width = max(len(h) for h in hist_rows) + pad_before
    h = np.array([[b""] * pad_before + [x.encode() for x in row] + [b""] * (width - pad_before - len(row))
                  for row in hist_rows], dtype=object).reshape(len(hist_rows), width)
    t = {"history": h}
    if prompts is not None:
        t["prompt"] = np.array([[(p or "").encode()] for p in prompts], dtype=object)
    if negatives is not None:
        t["negative_prompt"] = np.array([[(p or "").encode()] for p in negatives], dtype=object)
    if k is not None:
        t["k"] = np.array([[x] for x in k], dtype=np.int32)
    if excl is not None:
        t["exclude_history"] = np.array([[x] for x in excl], dtype=np.bool_)
    for name, rows in filters.items():
        w = max(1, max(len(r) for r in rows))
        t[name] = np.array([[x.encode() for x in r] + [b""] * (w - len(r)) for r in rows], dtype=object)
    return t


def triton_inputs(mod, histories, prompts=None, k=None, pad=b""):
    """tritonclient ``InferInput``s (``mod``: tritonclient.http or .grpc) of histories padded with ``pad``, optional
    [B, 1] prompts and k."""
    width = max(len(h) for h in histories)
    h = np.array([[x.encode() for x in row] + [pad] * (width - len(row)) for row in histories], dtype=object)
    out = [mod.InferInput("history", list(h.shape), "BYTES")]
    out[0].set_data_from_numpy(h)
    if prompts is not None:
        p = np.array([[(x or "").encode()] for x in prompts], dtype=object)
        out.append(mod.InferInput("prompt", list(p.shape), "BYTES"))
        out[-1].set_data_from_numpy(p)
    if k is not None:
        kk = np.array([[x] for x in k], dtype=np.int32)
        out.append(mod.InferInput("k", list(kk.shape), "INT32"))
        out[-1].set_data_from_numpy(kk)
    return out


def assert_same(got: dict, want: dict) -> None:
    """The same items, ranks, titles, tags, count and reason; scores within float32 rounding (a request's scores
    may differ in their last bits with the rows it is batched with)."""
    assert {k: got[k] for k in ("k", "count", "short_reason")} == {k: want[k] for k in ("k", "count", "short_reason")}
    assert [(i["rank"], i["id"], i["title"], i["tags"]) for i in got["items"]] == \
           [(i["rank"], i["id"], i["title"], i["tags"]) for i in want["items"]]
    np.testing.assert_allclose([i["score"] for i in got["items"]], [i["score"] for i in want["items"]],
                               rtol=1e-5, atol=1e-5)


# varied /recommend requests against the tiny export (ids i1..i400): prompts, a negative, a filter, a long history,
# exclude_history off, and a result shorter than k
REQUESTS = [
    {"history": ["i1", "i2", "i3"], "prompt": "something funny", "k": 5},
    {"history": ["i10"], "negative_prompt": "no horror", "k": 3},
    {"history": ["i4", "i9", "i33", "i120", "i7"], "prompt": "more comedy", "negative_prompt": "no horror"},
    {"history": ["i5", "i6"], "hard_filter": {"include_tags": ["comedy"], "exclude_items": ["i47"]}, "k": 4},
    {"history": ["i8"] + [f"i{j}" for j in range(20, 40)], "k": 7, "exclude_history": False},
    {"history": ["i2"], "hard_filter": {"include_tags": ["comedy"], "exclude_tags": ["horror", "drama",
     "action", "animation", "sci-fi", "romance", "thriller"]}, "k": 399},          # a short result
]


def v2_body(histories, prompts=None, k=None, **extra):
    """A KServe v2 JSON infer body: histories padded with empty strings, optional prompts and per-row k."""
    width = max(len(h) for h in histories)
    inputs = [{"name": "history", "datatype": "BYTES", "shape": [len(histories), width],
               "data": [x for h in histories for x in h + [""] * (width - len(h))]}]
    if prompts is not None:
        inputs.append({"name": "prompt", "datatype": "BYTES", "shape": [len(prompts), 1],
                       "data": [p or "" for p in prompts]})
    if k is not None:
        inputs.append({"name": "k", "datatype": "INT32", "shape": [len(histories), 1], "data": list(k)})
    return {"id": "req-1", "inputs": inputs, **extra}


ENGINE = {"backend": "onnxruntime", "retriever": "onnxruntime"}      # as the `engine` fixture


@contextmanager
def live_service(export_dir, wait: float = 60, **cfg):
    """The HTTP service in this process, as ``dpr-serve`` runs it: Service + create_app on a real uvicorn with
    ``http_front.protocol_for(app)`` (127.0.0.1, a free port), ready; ``(service, url)``. Stopped at the end (at
    most ``wait`` s)."""
    import threading
    import time

    import httpx
    import uvicorn

    from dpr.serve.config import ServeConfig
    from dpr.serve.http_app import create_app
    from dpr.serve.http_front import protocol_for
    from dpr.serve.procs import free_port
    from dpr.serve.service import Service

    port = free_port()
    conf = ServeConfig(host="127.0.0.1", port=port, **{**ENGINE, **cfg}).check()
    svc = Service(str(export_dir), conf)
    app = create_app(svc)
    svc.test_app = app                  # a test may add a route to it
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False, http=protocol_for(app)))
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        with httpx.Client(base_url=url, timeout=5) as c:
            while True:
                try:
                    if c.get("/v2/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline and thread.is_alive(), f"not ready: {svc.load_error}"
                time.sleep(0.1)
        yield svc, url
    finally:
        server.should_exit = True
        thread.join(wait)
        assert not thread.is_alive(), "uvicorn did not stop"


def metric(client, name: str) -> float:
    """One sample of /metrics by its full name with labels (0 when absent: a counter never incremented)."""
    for ln in client.get("/metrics").text.splitlines():
        if ln and ln[0] != "#" and ln.rsplit(" ", 1)[0] == name:
            return float(ln.rsplit(" ", 1)[1])
    return 0.0
