"""Injected faults (issue 21, section 4) against the real HTTP service, batcher and engine.

Faults are injected by wrapping the live engine's backend or retriever in a test-only object that passes every
call through except the ones it is told to break (raise, or block until released); nothing under test is a mock.
a. a backend that raises in the middle of a batch fails only that batch's requests (500 naming the fault),
   the next requests are answered as before, and /metrics counts the fault;
b. a retriever that hangs: its batch fails with a 504 naming ``batch_timeout_s``, the batcher's worker thread
   is replaced, the requests queued behind it and after it are answered exactly; the abandoned thread exits
   once released and its late result reaches nobody; an engine swapped out under it is closed only then;
c. hot reload of broken exports: each refused naming the file, the old engine keeps serving the same bytes;
d. SIGKILL of the dpr-serve process, then a restart: the same answers, byte for byte (load is deterministic).
(a)-(c) run the service in-process on a real uvicorn on 127.0.0.1; (d) runs the dpr-serve subprocess.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx", reason='needs the [serve] extra: pip install -e ".[serve]"')
uvicorn = pytest.importorskip("uvicorn", reason='needs the [serve] extra: pip install -e ".[serve]"')

from dpr.serve.config import ServeConfig  # noqa: E402
from dpr.serve.procs import Server, free_port, port_open  # noqa: E402

WAIT = 60          # every wait is bounded: a hang fails the test instead of stalling CI


def req(j: int, k: int = 5) -> dict:
    """The j-th request of a fixed, varied set (prompts, negatives, one filter, short and long histories)."""
    r = {"history": [f"i{1 + (7 * j) % 400}", f"i{1 + (13 * j + 5) % 400}", f"i{1 + (29 * j + 3) % 400}"][: 1 + j % 3],
         "k": k}
    if j % 3 == 0:
        r["prompt"] = ["something funny", "more comedy", "a thriller please"][j % 9 // 3]
    if j % 4 == 1:
        r["negative_prompt"] = "no horror"
    if j % 5 == 2:
        r["hard_filter"] = {"exclude_tags": ["horror"]}
    return r


from dpr_tests_serve_answers import ENGINE, assert_same, expected, live_service, metric  # noqa: E402 - tests/serve_answers.py


def post_all(url: str, reqs: list, threads: int) -> list:
    """Every request at once (so that they share batches), one connection each; answers in order."""
    def one(r):
        with httpx.Client(base_url=url, timeout=WAIT) as c:
            return c.post("/recommend", json=r)
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, reqs))


# ---- the test-only fault wrappers: every call passes through to the real object unless told otherwise ------
class RaisingBackend:
    """The engine's real backend; ``encode_users`` raises from its ``fail_from``-th call on (None: never)."""

    def __init__(self, inner):
        self._inner = inner
        self._lock = threading.Lock()
        self.calls = 0
        self.fail_from: int | None = None

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def encode_users(self, *args, **kwargs):
        with self._lock:
            self.calls += 1
            n = self.calls
        if self.fail_from is not None and n >= self.fail_from:
            raise RuntimeError(f"injected backend fault (encode_users call {n})")
        return self._inner.encode_users(*args, **kwargs)


class HangingRetriever:
    """The engine's real retriever; the next ``hang_next`` calls of ``search`` block until ``release`` is set
    (at most WAIT * 2 s, so a failed test never leaves a thread blocked for good), then search as usual."""

    def __init__(self, inner):
        self._inner = inner
        self._lock = threading.Lock()
        self.hang_next = 0
        self.hung = threading.Event()
        self.release = threading.Event()
        self.hung_thread: threading.Thread | None = None
        self.late_results = 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def search(self, *args, **kwargs):
        with self._lock:
            hang = self.hang_next > 0
            self.hang_next -= hang
        if hang:
            self.hung_thread = threading.current_thread()
            self.hung.set()
            self.release.wait(WAIT * 2)
            out = self._inner.search(*args, **kwargs)
            self.late_results += 1
            return out
        return self._inner.search(*args, **kwargs)


# ---- a. a backend that raises mid-batch --------------------------------------------------------------------
def test_backend_raising_mid_batch_fails_only_that_batch(export_dir, engine):
    # 4 rows close a batch at once; 4 requests sent together share it (the 2 s delay only waits for stragglers)
    with live_service(export_dir, max_batch_size=4, preferred_batch_size=4, max_queue_delay_us=2_000_000) as (svc, url):
        svc.engine.history_chunk_rows = 1          # one backend call per row: the fault can land mid-batch
        be = svc.engine.backend = RaisingBackend(svc.engine.backend)
        batch = [req(j) for j in range(4)]
        before = post_all(url, batch, 4)
        assert [r.status_code for r in before] == [200] * 4, [r.text for r in before]
        for r, q in zip(before, batch):
            assert_same(r.json(), expected(engine, q))
        assert be.calls >= 2, "the batch made one backend call: the fault could not land in its middle"

        be.fail_from = be.calls + 2                # the batch's first call succeeds, its second raises
        failed = post_all(url, batch, 4)
        assert [r.status_code for r in failed] == [500] * 4, [r.text for r in failed]
        for r in failed:
            msg = r.json()["error"]
            assert "internal error in the engine" in msg and "injected backend fault" in msg, msg
            assert "not caused by its input" in msg

        be.fail_from = None                        # the fault is over: the same batch, the same bytes
        after = post_all(url, batch, 4)
        assert [r.status_code for r in after] == [200] * 4, [r.text for r in after]
        assert [r.content for r in after] == [r.content for r in before]
        more = [req(j) for j in range(4, 12)]
        for r, q in zip(post_all(url, more, 4), more):
            assert r.status_code == 200, r.text
            assert_same(r.json(), expected(engine, q))
        with httpx.Client(base_url=url, timeout=WAIT) as c:
            # counted in requests, however the front grouped them: calls that arrive in one event-loop turn are
            # one Part (a loaded CI machine merged 2 of the 4 above, and a count of Parts read 3)
            assert metric(c, 'dpr_engine_errors_total{kind="exception"}') == 4
            be.fail_from = be.calls + 1                # one call holding 3 requests: one Part of 3 rows
            r = c.post("/recommend", json=[req(j) for j in range(3)])
            assert r.status_code == 500 and "injected backend fault" in r.json()["error"], r.text
            be.fail_from = None
            assert metric(c, 'dpr_engine_errors_total{kind="exception"}') == 7
            assert metric(c, 'dpr_http_requests_total{route="/recommend",status="500"}') == 5      # 4 calls, then the list call
            assert metric(c, 'dpr_http_requests_total{route="/recommend",status="200"}') == 16
            assert metric(c, 'dpr_engine_errors_total{kind="timeout"}') == 0
            assert metric(c, "dpr_ready") == 1
        assert svc.batcher.replaced == 0           # a raising backend is no reason to replace the worker


def test_engine_fault_in_one_call_spares_its_batch_mates(export_dir, engine):
    """A batch whose requests need two engine calls (two values of k): a fault in one call fails only the
    request it served; its batch-mates are answered exactly."""
    with live_service(export_dir, max_batch_size=4, preferred_batch_size=4, max_queue_delay_us=2_000_000) as (svc, url):
        inner = svc.engine.retriever

        class RaisingRetriever:                  # raises for k=7 only (the second call of the batch)
            def __getattr__(self, name):
                return getattr(inner, name)

            def search(self, vectors, k, *args, **kwargs):
                if k == 7:
                    raise RuntimeError("injected retriever fault (k=7)")
                return inner.search(vectors, k, *args, **kwargs)

        svc.engine.retriever = RaisingRetriever()
        batch = [req(1), req(2), req(3, k=7), req(5)]
        got = post_all(url, batch, 4)
        assert [r.status_code for r in got] == [200, 200, 500, 200], [r.text for r in got]
        assert "injected retriever fault" in got[2].json()["error"]
        for i in (0, 1, 3):
            assert_same(got[i].json(), expected(engine, batch[i]))
        with httpx.Client(base_url=url, timeout=WAIT) as c:
            assert metric(c, 'dpr_engine_errors_total{kind="exception"}') == 1

            # an exception that escapes a route altogether (a test-only route on the real app and middleware):
            # answered 500 by Starlette, counted as a 500 in /metrics, and the service keeps serving
            def boom():
                raise RuntimeError("injected fault outside the engine")
            svc.test_app.add_api_route("/test-boom", boom)
            with httpx.Client(base_url=url, timeout=WAIT) as c2:     # uvicorn closes that connection after it
                assert c2.get("/test-boom").status_code == 500
        with httpx.Client(base_url=url, timeout=WAIT) as c:
            assert metric(c, 'dpr_http_requests_total{route="/test-boom",status="500"}') == 1
            r = c.post("/recommend", json=req(1))
            # the same ranking (a request's float32 scores may differ in their last bits with the rows it is
            # batched with: GEMM blocking depends on the batch's size)
            assert r.status_code == 200
            assert_same(r.json(), got[0].json())


# ---- b. a retriever that hangs -----------------------------------------------------------------------------
def test_hanging_retriever_times_out_and_its_worker_is_replaced(export_dir, engine):
    # 3 s: far above a batch's time here (milliseconds, ~0.1 s on a loaded machine), far below the test's waits
    with live_service(export_dir, batch_timeout_s=3.0) as (svc, url):
        old_engine = svc.engine
        hr = old_engine.retriever = HangingRetriever(old_engine.retriever)
        first_runner = svc.batcher.runner_thread
        r0 = req(0)
        with httpx.Client(base_url=url, timeout=WAIT) as c:
            b0 = c.post("/recommend", json=r0)
        assert b0.status_code == 200, b0.text

        hr.hang_next = 1
        with ThreadPoolExecutor(2) as pool:
            stuck = pool.submit(post_all, url, [req(1)], 1)
            assert hr.hung.wait(WAIT), "the retriever was never called"
            queued = pool.submit(post_all, url, [req(2)], 1)   # waits behind the hung batch
            [timed_out] = stuck.result(WAIT)
            [behind] = queued.result(WAIT)
        assert timed_out.status_code == 504, timed_out.text
        msg = timed_out.json()["error"]
        assert "within 3 s" in msg and "batch_timeout_s" in msg and "--batch-timeout-s" in msg, msg
        assert behind.status_code == 200, behind.text
        assert_same(behind.json(), expected(engine, req(2)))

        # the worker was replaced: the old one is still blocked inside the retriever, a new one serves
        assert hr.hung_thread is first_runner and first_runner.is_alive()
        assert svc.batcher.replaced == 1 and svc.batcher.runner_thread is not first_runner
        later = [req(j) for j in range(3, 23)]
        for r, q in zip(post_all(url, later, 4), later):
            assert r.status_code == 200, r.text
            assert_same(r.json(), expected(engine, q))
        with httpx.Client(base_url=url, timeout=WAIT) as c:
            assert c.post("/recommend", json=r0).content == b0.content
            assert metric(c, 'dpr_engine_errors_total{kind="timeout"}') == 1
            assert metric(c, "dpr_batcher_workers_replaced_total") == 1
            assert metric(c, 'dpr_http_requests_total{route="/recommend",status="504"}') == 1
            assert c.get("/v2/health/ready").status_code == 200

            # a hot reload while the abandoned batch is still inside the old engine: the swap happens, the old
            # engine stays open under that thread and is closed by it once its call returns
            r = c.post("/v2/repository/models/dpr/load", json={})
            assert r.status_code == 200 and r.json()["ok"] is True, r.text
            assert svc.engine is not old_engine and not old_engine._closed       # noqa: SLF001
            assert c.post("/recommend", json=r0).content == b0.content

        assert hr.late_results == 0
        hr.release.set()
        first_runner.join(WAIT)
        assert not first_runner.is_alive(), "the abandoned worker did not exit once its call returned"
        assert hr.late_results == 1                # its late answer was computed, and dropped: 504 stood
        assert old_engine._closed                  # noqa: SLF001
        with httpx.Client(base_url=url, timeout=WAIT) as c:
            assert c.post("/recommend", json=r0).content == b0.content


def test_batch_timeout_setting_is_checked():
    from dpr.errors import InputError
    from dpr.serve.cli import build_parser

    for bad in (0, -1.0, float("nan"), float("inf"), True, "30"):
        with pytest.raises(InputError, match="batch_timeout_s must be a finite number of seconds > 0"):
            ServeConfig(batch_timeout_s=bad).check()
    assert ServeConfig().batch_timeout_s == 30.0
    args = build_parser().parse_args(["some/export", "--batch-timeout-s", "2.5"])
    assert args.batch_timeout_s == 2.5


# ---- c. hot reload of a broken export --------------------------------------------------------------------------
def _damaged(export_dir, root):
    """(folder, file the refusal must name) for each kind of broken export."""
    out = []

    def copy(name):
        d = root / name
        shutil.copytree(export_dir, d)
        return d

    d = copy("truncated-table")
    (d / "item_embeddings.npy").write_bytes((d / "item_embeddings.npy").read_bytes()[:100])
    out.append((d, "item_embeddings.npy"))
    d = copy("bad-manifest")
    (d / "manifest.json").write_text("{")
    out.append((d, "manifest.json"))
    d = copy("missing-items")
    (d / "items.json").unlink()
    out.append((d, "items.json"))
    d = copy("flipped-graph")
    g = d / "user_encoder.onnx"
    data = bytearray(g.read_bytes())
    data[len(data) // 2] ^= 0x01
    g.write_bytes(bytes(data))
    out.append((d, "user_encoder.onnx"))
    out.append((root / "no-such-export", "no-such-export"))
    return out


def test_hot_reload_of_broken_exports_keeps_the_old_engine(export_dir, engine, tmp_path):
    reqs = [req(j) for j in range(12)]
    with live_service(export_dir) as (svc, url), httpx.Client(base_url=url, timeout=WAIT) as c:
        before = [c.post("/recommend", json=q) for q in reqs]
        assert all(r.status_code == 200 for r in before)
        for r, q in zip(before, reqs):
            assert_same(r.json(), expected(engine, q))
        old = svc.engine
        broken = _damaged(export_dir, tmp_path)
        for folder, name in broken:
            r = c.post("/v2/repository/models/dpr/load", json={"parameters": {"export_dir": str(folder)}})
            assert r.status_code == 400, r.text
            msg = r.json()["error"]
            assert name in msg and "previous engine keeps serving" in msg, msg
            assert svc.engine is old and not old._closed           # noqa: SLF001
            assert c.get("/v2/health/ready").status_code == 200
            meta = c.get("/v2/models/dpr").json()["parameters"]
            assert meta["export"] == str(export_dir) and meta["last_reload"]["ok"] is False
            assert [c.post("/recommend", json=q).content for q in reqs] == [r.content for r in before]
        assert metric(c, 'dpr_reloads_total{outcome="failed"}') == len(broken)
        assert metric(c, 'dpr_reloads_total{outcome="ok"}') == 0


# ---- d. a crash (SIGKILL) and a restart ------------------------------------------------------------------------
def test_restart_after_sigkill_gives_the_same_answers(export_dir, tmp_path):
    port = free_port()
    cmd = [sys.executable, "-P", "-m", "dpr.serve.cli", str(export_dir), "--port", str(port), "--log-level",
           "warning", "--backend", ENGINE["backend"], "--retriever", ENGINE["retriever"]]
    reqs = [req(j, k=3 + j % 8) for j in range(20)]
    v2 = {"inputs": [{"name": "history", "datatype": "BYTES", "shape": [2, 2], "data": ["i1", "i2", "i3", ""]},
                     {"name": "prompt", "datatype": "BYTES", "shape": [2, 1], "data": ["something funny", ""]}]}

    def answers(s):
        with httpx.Client(base_url=s.url, timeout=WAIT) as c:
            got = [c.post("/recommend", json=q) for q in reqs] + [c.post("/v2/models/dpr/infer", json=v2)]
        assert [r.status_code for r in got] == [200] * len(got), [r.text for r in got if r.status_code != 200]
        return [r.content for r in got]

    first = Server(cmd, port, log_path=tmp_path / "first.log").start()
    try:
        a = answers(first)
        os.killpg(first.proc.pid, signal.SIGKILL)          # a crash: no drain, no shutdown handler
        assert first.proc.wait(WAIT) == -signal.SIGKILL
    finally:
        first.stop()
    assert not first.leftover and not port_open(port)
    second = Server(cmd, port, log_path=tmp_path / "second.log").start()   # the same port, as a supervisor would
    try:
        b = answers(second)
    finally:
        assert second.stop() == 0, second.log()
    assert b == a                                     # ids and scores, byte for byte
    assert not second.leftover and not port_open(port)
