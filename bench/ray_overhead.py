"""What Ray Serve adds per request, against the HTTP service, on the same machine and export (docs/SCALE.md).

    python -m dpr.bench.ray_overhead                    # the soak's small export (built once, ~30 s)
    python -m dpr.bench.ray_overhead --export DIR --requests 300 --json out.json

Both servers run one engine (the HTTP service: ``dpr-serve``, a subprocess; Ray Serve: ``dpr.serve.ray`` with 1
replica on a local Ray cluster), bound to 127.0.0.1, the same backend and retriever. Each is driven by the same
client: ``--requests`` sequential single-request calls (latency: the difference of the medians is Ray's
per-request overhead: its proxy, the handle hop to the replica and serve.batch), then the same number from
``--concurrency`` client threads (throughput), then calls of 256 requests each (a list body: the per-call
costs shared by the rows). Bounded by ``--requests`` and ``--max-seconds`` per phase.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

REQ = {"history": ["i1", "i2", "i3", "i7"], "prompt": "something funny", "k": 10}
BATCH = 256                    # requests per call in the batched phase


def drive(url: str, n: int, concurrency: int, max_seconds: float) -> dict:
    import httpx

    lat: list[float] = []
    t_end = time.monotonic() + max_seconds

    def client(m: int):
        with httpx.Client() as c:
            for _ in range(m):
                if time.monotonic() > t_end:
                    return
                t0 = time.perf_counter()
                r = c.post(url + "/recommend", json=REQ, timeout=30)
                r.raise_for_status()
                lat.append(time.perf_counter() - t0)

    client(10)                                     # warm-up (connections, first batches)
    lat.clear()
    client(n)
    seq = sorted(lat)
    lat.clear()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(client, [n // concurrency] * concurrency))
    wall = time.perf_counter() - t0
    # batched calls: BATCH requests in one /recommend list, sequential; the per-call cost is shared by the rows
    calls = []
    with httpx.Client() as c:
        for _ in range(max(2, n // BATCH)):
            if time.monotonic() > t_end:
                break
            t1 = time.perf_counter()
            c.post(url + "/recommend", json=[REQ] * BATCH, timeout=60).raise_for_status()
            calls.append(time.perf_counter() - t1)
    return {"p50_ms": round(1e3 * statistics.median(seq), 3), "p99_ms": round(1e3 * seq[int(0.99 * (len(seq) - 1))], 3),
            "sequential": len(seq), "concurrent_rps": round(len(lat) / wall, 1), "concurrency": concurrency,
            "batch": BATCH, "batched_call_p50_ms": round(1e3 * statistics.median(calls), 3),
            "batched_rps": round(BATCH * len(calls) / sum(calls), 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dpr.bench.ray_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--export", help="a dpr-export folder (default: the soak's small export, built once)")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-seconds", type=float, default=120, help="per phase")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--retriever", default="onnxruntime")
    p.add_argument("--json")
    a = p.parse_args(argv)
    if a.requests < a.concurrency or a.concurrency < 1:
        p.error("--requests must be >= --concurrency >= 1")
    from dpr.serve.procs import Server, free_port

    if a.export is None:
        from dpr.bench.soak import small_export

        a.export = str(small_export())
    out = {"export": a.export}
    port = free_port()
    cmd = [sys.executable, "-P", "-m", "dpr.serve.cli", a.export, "--port", str(port), "--backend", a.backend,
           "--retriever", a.retriever]
    with Server(cmd, port):
        out["http"] = drive(f"http://127.0.0.1:{port}", a.requests, a.concurrency, a.max_seconds)
    print("http service:", out["http"], file=sys.stderr)

    import ray
    from ray import serve

    from dpr.serve.ray import build_app, init_ray

    port = free_port()
    init_ray(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(a.export, {"backend": a.backend, "retriever": a.retriever}, num_replicas=1,
                            ray_actor_options={"num_cpus": 1}), name="dpr", route_prefix="/")
        out["ray"] = drive(f"http://127.0.0.1:{port}", a.requests, a.concurrency, a.max_seconds)
    finally:
        serve.shutdown()
        ray.shutdown()
    print("ray serve:", out["ray"], file=sys.stderr)
    out["overhead_p50_ms"] = round(out["ray"]["p50_ms"] - out["http"]["p50_ms"], 3)
    print(json.dumps(out, indent=2))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
