"""The soak's Triton target: the pool's requests sent as KServe v2 tensors with ``tritonclient.http`` (binary
tensors, as its users send them) to the tritonserver nvidia-pytriton ships, serving the export through
``dpr.serve.triton_python``; each answer turned into an :class:`~dpr.bench.soak.Answer` as the HTTP target does.

A 200 is ``Answer(True, ids, scores)`` (the row's ``counts`` first ids); a refusal is an error ``Answer`` with
``error_type`` "HTTP <status>" and Triton's message. :meth:`TritonTarget.same_error` accepts a 4xx that names the
same field as the engine's error (Triton words the protocol's refusals itself: "inference input 'k' data-type is
'BYTES', but model 'dpr' expects 'INT32'"; an unknown input is "unexpected inference input 'colour'", accepted
when the engine's message names the same key). A 5xx matches nothing; a timeout or a dropped connection raises in
the future, which the soak counts as ``lost``.

How a pool request becomes tensors (one row each): lists of ids and filter values are BYTES ``[1, n]``; a prompt
BYTES ``[1, 1]`` (text as UTF-8, lone surrogates kept as their bytes, raw bytes as they are); ``k`` INT32 and
``exclude_history`` BOOL ``[1, 1]``. A value the protocol has no place for is sent the way a careless client
would: a wrong type with its own datatype (k ``"5"`` as BYTES, ``2.5`` or 10^30 as FP64, a prompt 123 as INT64),
a list where one value goes with one dimension more, a history that is not a list as a 1-D tensor, an unknown
field or filter key as an input of that name, ``None`` ids as the text "None" (tritonclient's ``str()``). An
empty prompt is how v2 says "no prompt", so the pool's ``""`` goes as ``" "`` (blank: the engine refuses both
alike).

Clients: one ``InferenceServerClient`` per worker thread, made and closed in that thread (geventhttpclient binds
a client to its thread's hub), so ``workers`` requests can be outstanding at once.
"""

from __future__ import annotations

import os
import queue
import re
import sys
import threading
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .soak import Answer, ProcProbe
from .soak_http import HttpStatusBooks, error_field

FILTER_KEYS = ("include_tags", "exclude_tags", "exclude_items")
_UNEXPECTED = re.compile(r"unexpected inference input '([^']*)'")


def _as_bytes(x) -> bytes:
    if isinstance(x, (bytes, bytearray)):
        return bytes(x)
    return (x if isinstance(x, str) else str(x)).encode("utf-8", "surrogatepass")


def _tensor(mod, name: str, value, row_shape=(1,)):
    """One input of one row: ``value`` as the tensor a client would send (see the module docstring)."""
    if isinstance(value, (list, tuple)):
        if row_shape == (1,):                       # a list where one value goes: one more dimension
            arr = np.array([_as_bytes(v) for v in value] or [b""], dtype=object).reshape(1, 1, -1)
        else:
            arr = np.array([_as_bytes(v) for v in value], dtype=object).reshape(1, len(value))
        dt = "BYTES"
    elif row_shape != (1,):                         # not a list where a list goes: a 1-D tensor
        arr, dt = np.array([_as_bytes(value)], dtype=object), "BYTES"
    elif isinstance(value, bool):
        arr, dt = np.array([[value]], np.bool_), "BOOL"
    elif isinstance(value, int):
        if -2 ** 31 <= value < 2 ** 31:
            arr, dt = np.array([[value]], np.int32), "INT32"
        elif -2 ** 63 <= value < 2 ** 63:
            arr, dt = np.array([[value]], np.int64), "INT64"
        else:
            arr, dt = np.array([[float(value)]], np.float64), "FP64"
    elif isinstance(value, float):
        arr, dt = np.array([[value]], np.float64), "FP64"
    else:
        arr, dt = np.array([[_as_bytes(value)]], dtype=object), "BYTES"
    inp = mod.InferInput(name, list(arr.shape), dt)
    inp.set_data_from_numpy(arr)
    return inp


def request_inputs(mod, request: dict) -> list:
    """The pool request ``request`` (a ``/recommend`` body) as v2 inputs of one row."""
    ins = []
    for name, value in request.items():
        if name == "history":
            if value is None:
                continue                            # no history input at all
            ins.append(_tensor(mod, name, value, row_shape=(-1,)))
        elif name in ("prompt", "negative_prompt"):
            if value is None:
                continue
            ins.append(_tensor(mod, name, " " if value == "" else value))
        elif name == "hard_filter":
            if isinstance(value, dict):
                for key, vals in value.items():
                    ins.append(_tensor(mod, key, vals, row_shape=(-1,) if key in FILTER_KEYS else (1,)))
            elif value is not None:
                ins.append(_tensor(mod, "hard_filter", value))
        else:                                       # k, exclude_history, and unknown fields under their own name
            ins.append(_tensor(mod, name, value))
    return ins


class TritonTarget(HttpStatusBooks):
    """Sends each request to tritonserver at ``url`` (``http://host:port``) from ``workers`` client threads."""
    name = "triton"

    def __init__(self, url: str, workers: int = 32, timeout_s: float = 60.0, model: str = "dpr"):
        import tritonclient.http as th

        self.th, self.model, self.timeout_s = th, model, timeout_s
        self.host = url.split("://", 1)[-1]
        self.jobs: queue.Queue = queue.Queue()
        self.status: dict = {}
        self.transport_errors: dict = {}
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._worker, name=f"soak-triton-{i}", daemon=True)
                        for i in range(workers)]
        for t in self.threads:
            t.start()

    def submit(self, request) -> Future:
        fut: Future = Future()
        self.jobs.put((request, fut))
        return fut

    def _count(self, book: dict, key) -> None:
        with self.lock:
            book[key] = book.get(key, 0) + 1

    def _worker(self) -> None:
        client = self.th.InferenceServerClient(self.host, connection_timeout=self.timeout_s,
                                               network_timeout=self.timeout_s)
        try:
            while True:
                job = self.jobs.get()
                if job is None:
                    return
                request, fut = job
                try:
                    fut.set_result(self._infer(client, request))
                except Exception as exc:  # noqa: BLE001 - a transport failure: the answer is lost
                    self._count(self.transport_errors, f"{type(exc).__name__}: {exc}"[:120])
                    # without its frames, which hold the client (closed in this thread, not by __del__ in another)
                    fut.set_exception(exc.with_traceback(None))
        finally:
            client.close()

    def _infer(self, client, request) -> Answer:
        try:
            r = client.infer(self.model, request_inputs(self.th, request))
        except self.th.InferenceServerException as exc:
            status = exc.status()
            if status is None or not str(status).isdigit():
                raise                                # no HTTP answer (a dropped connection): lost
            self._count(self.status, int(status))
            return Answer(False, error_type=f"HTTP {status}", message=str(exc.message()))
        self._count(self.status, 200)
        n = int(r.as_numpy("counts")[0, 0])
        ids = [x.decode() for x in r.as_numpy("item_ids")[0, :n]]
        return Answer(True, ids, [float(s) for s in r.as_numpy("scores")[0, :n]])

    def same_error(self, expected: Answer, got: Answer) -> bool:
        if not self.is_refusal(got):
            return False
        m = _UNEXPECTED.search(got.message)
        if m and (f"'{m[1]}'" in expected.message or error_field(expected.message) == m[1].replace("_", " ")):
            return True                              # an unknown field or filter key, sent as an input of its name
        want = error_field(expected.message)
        return want is not None and error_field(got.message) == want

    def close(self) -> None:
        for _ in self.threads:
            self.jobs.put(None)
        for t in self.threads:
            t.join(self.timeout_s + 10)


def triton_python() -> Path:
    """The Triton venv's Python (``$DPR_TRITON_PYTHON``, else ``.venv-triton`` beside this venv)."""
    p = Path(os.environ.get("DPR_TRITON_PYTHON", Path(sys.prefix).parent / ".venv-triton" / "bin" / "python"))
    if not p.exists():
        raise FileNotFoundError(f"no Triton environment at {p}: `make triton-env` builds it (README Serving), or "
                                "set DPR_TRITON_PYTHON")
    return p


def child_pids(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


class TritonProbe(ProcProbe):
    """Memory, fds and threads of tritonserver and its children (with the Python backend, the stub, where the engine
    runs) summed: the serving side of a Triton soak is all of them. Children are looked up at every read."""

    def __init__(self, triton_pid: int):
        super().__init__(triton_pid)

    def _sum(self, read) -> int:
        vals = [read(ProcProbe(p)) for p in [self.pid] + child_pids(self.pid)]
        return -1 if any(v < 0 for v in vals) else sum(vals)

    def rss(self) -> int:
        return self._sum(ProcProbe.rss)

    def fds(self) -> int:
        return self._sum(ProcProbe.fds)

    def threads(self) -> int:
        return self._sum(ProcProbe.threads)


@contextmanager
def triton_server(export_dir, workdir, backend: str = "onnxruntime", retriever: str = "auto", max_batch: int = 64,
                  max_delay_ms: float = 2.0, log_path=None, triton_backend: str = "auto"):
    """tritonserver on a repository (in ``workdir``) pointing at ``export_dir``, on free 127.0.0.1 ports, ready;
    yields the :class:`Server` with ``triton_pid`` (the tritonserver process, a child of the launcher) and stops it
    on exit. ``triton_backend``: ServeConfig's (auto: the native backend where it builds for the Triton venv)."""
    from dpr.serve.config import ServeConfig
    from dpr.serve.procs import Server, free_ports
    from dpr.serve.triton_repo import write_repository

    workdir = Path(workdir)
    cfg = ServeConfig(backend=backend, retriever=retriever, max_batch_size=max_batch, preferred_batch_size=max_batch,
                      max_queue_delay_us=int(max_delay_ms * 1000), triton_backend=triton_backend)
    write_repository(workdir / "repo", export_dir, cfg, copy_export=False, python=triton_python())
    http, grpc, metrics = free_ports(3)
    cmd = [str(triton_python()), "-P", "-m", "dpr.serve.triton_server", str(workdir / "repo"), "--port", str(http),
           "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    s = Server(cmd, http, env=env, log_path=log_path or workdir / "triton.log", ports=(grpc, metrics)).start(180)
    try:
        kids = child_pids(s.proc.pid)
        s.triton_pid = kids[0] if kids else s.proc.pid
        yield s
    finally:
        s.stop()
