"""Soak: many client threads send mixed valid and invalid requests for a long time through a serving target
(the DynamicBatcher in this process, or the HTTP service ``dpr-serve`` in a subprocess; Triton can plug in as a
further target) and every answer is checked against the answer its own request must get.

    python -m dpr.bench.soak --threads 8 --requests 10000 --max-seconds 600      # make soak (both targets)
    python -m dpr.bench.soak --target http --export DIR --json soak.json

What it reports (``run_soak`` returns it as a dict; ``verdict`` turns it into pass/fail lines):

* ``lost``: requests whose answer never came within ``request_timeout_s``; ``crossed``: a valid request that got
  the answer of another request of the pool; ``wrong``: a valid request whose answer matches no request;
  ``error_mismatch``: an invalid request that was not refused with its own error (type and message);
  ``unexpected``: a valid request that failed. All must be 0.
* resident memory (RSS) at the end of the warm-up and at the end, and its growth (<= 5%);
* open file descriptors and OS threads before the target starts and after it closes (no leak);
  all three of the serving process: this one for the batcher, the server's for HTTP (:class:`ProcProbe`);
* p50 / p99 latency in 10 windows of the run; the median p99 of the first third of the windows against that of
  the last third (a trend, not one window's pause).

The pool: ``valid`` distinct requests (random histories, some past ``max_len`` or with repeated ids, template
prompts or None, hard filters, various k), their expected answers computed one by one with
``Engine.recommend`` before the soak; ``invalid`` requests, one field broken each, their expected
``InputError`` message taken from ``Engine.validate_request``. Each client thread keeps up to ``inflight``
requests outstanding (so the batcher forms real batches) and checks each answer as it comes.

The code, by job: :mod:`~dpr.bench.soak_answers` (answers and how they are compared),
:mod:`~dpr.bench.soak_pool` (the request pool, the small export), :mod:`~dpr.bench.soak_probe` (memory, fds,
threads from /proc), :mod:`~dpr.bench.soak_run` (``run_soak``, ``verdict``); this module holds the targets and
the command line. Every name the tests import is importable from here.

Without ``--export`` a small export (synthetic catalogue of 400 items, tiny BERT prompt encoder, a few training
steps: the recipe of the test fixtures) is built once into ``build/soak/export`` (tens of seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import Future
from pathlib import Path

from .soak_answers import ATOL, Answer, oracle_topk, same_error, same_ranking
from .soak_pool import DEFAULT_EXPORT, Case, make_pool, small_export
from .soak_probe import ProcProbe, open_fds, os_threads, rss_bytes
from .soak_run import run_soak, verdict

__all__ = ["ATOL", "Answer", "BatcherTarget", "Case", "DEFAULT_EXPORT", "ProcProbe", "make_pool", "main",
           "open_fds", "oracle_topk", "os_threads", "rss_bytes", "run_soak", "same_error", "same_ranking",
           "small_export", "verdict"]


# ---- targets: what the clients talk to ---------------------------------------------------------------

class BatcherTarget:
    """The DynamicBatcher in this process. A target has ``name``, ``submit(request) -> Future[Answer]``
    (an invalid request's future resolves to an error Answer, never raises) and ``close()``; optionally
    ``stats()`` (put in the report) and ``same_error(expected, got)`` (when its refusals are worded by the front
    end rather than the engine). An HTTP target implements the same with a client pool: it posts the request,
    turns a 200 into ``Answer(True, ids, scores)`` and a 4xx into ``Answer(False, error_type="HTTP 422", ...)``,
    and its ``same_error`` accepts the 4xx that names the same field; a 5xx, a timeout or a dropped connection
    is then an ``unexpected`` or ``lost`` answer like any other."""
    name = "batcher"

    def __init__(self, engine, max_batch_size: int = 64, max_delay_ms: float = 2.0, max_queue: int = 10000):
        from dpr.engine import DynamicBatcher

        self.batcher = DynamicBatcher(engine, max_batch_size=max_batch_size, max_delay_ms=max_delay_ms,
                                      max_queue=max_queue)

    def submit(self, request) -> Future:
        out: Future = Future()
        try:
            inner = self.batcher.submit(request)
        except Exception as exc:  # noqa: BLE001 - OverloadedError / ClosedError: an answer too
            out.set_result(Answer(False, error_type=type(exc).__name__, message=str(exc)))
            return out

        def done(f: Future):
            exc = f.exception()
            if exc is None:
                rec = f.result()
                out.set_result(Answer(True, list(rec.item_ids), [float(s) for s in rec.scores]))
            else:
                out.set_result(Answer(False, error_type=type(exc).__name__, message=str(exc)))

        inner.add_done_callback(done)
        return out

    def stats(self) -> dict:
        return self.batcher.stats()

    def close(self) -> None:
        self.batcher.close(timeout=60)


# ---- command line --------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dpr.bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--export", default="", help="export folder (default: build a small one into build/soak)")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--retriever", default="auto")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--requests", type=int, default=10000, help="requests per thread")
    p.add_argument("--inflight", type=int, default=16, help="outstanding requests per thread")
    p.add_argument("--max-seconds", type=float, default=600.0, help="stop sending after this long")
    p.add_argument("--windows", type=int, default=10, help="latency windows over the run (first vs last)")
    p.add_argument("--pool-valid", type=int, default=512)
    p.add_argument("--pool-invalid", type=int, default=128)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-delay-ms", type=float, default=2.0)
    p.add_argument("--rss-growth-max", type=float, default=0.05)
    p.add_argument("--p99-ratio-max", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="write the report here")
    p.add_argument("--target", default="batcher", choices=("batcher", "http", "triton", "all"),
                   help="the DynamicBatcher in this process, the HTTP service (dpr-serve subprocess), tritonserver "
                        "(needs .venv-triton: make triton-env), or all: batcher and http")
    a = p.parse_args(argv)
    from dpr.engine import Engine

    export_dir = Path(a.export) if a.export else small_export()
    engine = Engine.load(export_dir, backend=a.backend, retriever=a.retriever)
    pool = make_pool(engine, a.pool_valid, a.pool_invalid, a.seed)
    targets = ["batcher", "http"] if a.target == "all" else [a.target]
    reports = [_run_target(t, a, engine, pool, export_dir) for t in targets]
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
    return 0 if not any(r["failures"] for r in reports) else 1


def _run_target(which: str, a, engine, pool, export_dir) -> dict:
    """One soak through ``which`` ("batcher" or "http"), printed; returns its report with ``failures``."""
    if which == "batcher":
        report = run_soak(lambda: BatcherTarget(engine, a.max_batch, a.max_delay_ms), pool, a.threads, a.requests,
                          a.inflight, a.max_seconds, n_windows=a.windows, seed=a.seed)
    elif which == "triton":      # bench/soak_triton.py; probed: tritonserver and its backend stub
        import tempfile

        from .soak_triton import TritonProbe, TritonTarget, triton_server

        with tempfile.TemporaryDirectory(prefix="dpr-soak-triton-") as work, \
                triton_server(export_dir, work, a.backend, a.retriever, a.max_batch, a.max_delay_ms) as server:
            workers = min(a.threads * a.inflight, 128)
            report = run_soak(lambda: TritonTarget(server.url, workers), pool, a.threads, a.requests, a.inflight,
                              a.max_seconds, n_windows=a.windows, seed=a.seed, probe=TritonProbe(server.triton_pid))
            report["server_pid"] = server.triton_pid
    else:
        from .soak_http import HttpTarget, http_server

        with http_server(export_dir, a.backend, a.retriever, a.max_batch, a.max_delay_ms) as server:
            workers = min(a.threads * a.inflight, 128)    # one connection per outstanding request
            report = run_soak(lambda: HttpTarget(server.url, workers), pool, a.threads, a.requests, a.inflight,
                              a.max_seconds, n_windows=a.windows, seed=a.seed, probe=ProcProbe(server.proc.pid))
            report["server_pid"] = server.proc.pid
    report.update(export=str(export_dir), backend=engine.backend_name, retriever=engine.retriever_name,
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), cpus=os.cpu_count())
    bad = verdict(report, a.rss_growth_max, a.p99_ratio_max)
    report["failures"] = bad
    show = {k: v for k, v in report.items() if k not in ("windows", "examples", "rss_trace_mb")}
    print(json.dumps(show, indent=2))
    for w in report["windows"]:
        print(f"window {w['start_s']:>8.1f}s  n={w['n']:>6}  p50={w['p50_ms']:.2f} ms  p99={w['p99_ms']:.2f} ms")
    print("rss (answers, MB):", " ".join(f"{n}:{mb}" for n, mb in report["rss_trace_mb"]))
    for e in report["examples"]:
        print("example:", e)
    print(f"SOAK ({which}) HELD" if not bad else f"SOAK ({which}) FAILED:\n  " + "\n  ".join(bad))
    return report


if __name__ == "__main__":
    sys.exit(main())
