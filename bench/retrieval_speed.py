"""Throughput of the retrievers and the machine's ceilings (reused by the ``dpr-bench`` CLI).

``benchmark_retrievers`` times ``search`` (no filters) on a random table; GFLOP = 2 * B * N * d,
GB/s = bytes of the fp32 item table read per search / time.  ``measure_ceilings`` gives the best
large fp32 matmul GFLOP/s of ONNX Runtime (MLAS) and torch, and the copy bandwidth.

Run ``python -m dpr.bench.retrieval_speed [N ...]`` for a table (default 1e4 1e5 1e6).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Any, Callable, Sequence

import numpy as np

from dpr.engine.retrieval import available_retrievers, get_retriever
from dpr.util import physical_cores

__all__ = ["benchmark_retrievers", "measure_ceilings", "main"]


def _time(fn: Callable[[], Any], iters: int, warmup: int) -> list[float]:
    for _ in range(max(0, warmup)):
        fn()
    out = []
    for _ in range(max(1, iters)):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def benchmark_retrievers(num_items: int, d: int = 64, batch: int = 512, k: int = 10,
                         names: Sequence[str] | None = None, iters: int = 5, warmup: int = 1, *,
                         seed: int = 0, options: dict[str, dict[str, Any]] | None = None,
                         ceiling_gflops: float | None = None) -> list[dict[str, Any]]:
    """Median search time of each retriever over a random ``(num_items + 1, d)`` table.

    Returns one dict per retriever: ``retriever, items, ms_median, gflops, gbps`` plus ``d, batch,
    k, build_s, ms_min`` and ``pct_of_ceiling`` when ``ceiling_gflops`` is given.
    """
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((num_items + 1, d), dtype=np.float32)
    queries = rng.standard_normal((batch, d), dtype=np.float32)
    names = list(names) if names is not None else available_retrievers()
    flop = 2.0 * batch * num_items * d
    nbytes = 4.0 * num_items * d
    results = []
    for name in names:
        t0 = time.perf_counter()
        retriever = get_retriever(name, table, **(options or {}).get(name, {}))
        build_s = time.perf_counter() - t0
        times = _time(lambda: retriever.search(queries, k), iters, warmup)
        med = statistics.median(times)
        row = {"retriever": name, "items": num_items, "ms_median": med * 1e3, "gflops": flop / med / 1e9,
               "gbps": nbytes / med / 1e9, "ms_min": min(times) * 1e3, "d": d, "batch": batch, "k": k,
               "build_s": build_s}
        if ceiling_gflops:
            row["pct_of_ceiling"] = 100.0 * row["gflops"] / ceiling_gflops
        results.append(row)
        retriever.close()
        del retriever
        gc.collect()
    return results


def _ort_matmul_gflops(n: int, iters: int, threads: int) -> float:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["C"])], "mm",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n]),
         helper.make_tensor_value_info("B", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("C", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    best = min(_time(lambda: sess.run(None, {"A": a, "B": b}), iters, 1))
    return 2.0 * n ** 3 / best / 1e9


def _torch_matmul_gflops(n: int, iters: int) -> float:
    import torch

    a = torch.randn(n, n)
    b = torch.randn(n, n)
    c = torch.empty(n, n)
    best = min(_time(lambda: torch.mm(a, b, out=c), iters, 1))
    return 2.0 * n ** 3 / best / 1e9


def measure_ceilings(size: int = 4096, iters: int = 3, copy_mb: int = 256) -> dict[str, float]:
    """Best fp32 matmul GFLOP/s (ONNX Runtime MatMul and torch at ``size``^3) and copy GB/s.

    ``copy_gbps`` counts bytes read plus bytes written when copying ``copy_mb`` MiB into an
    existing buffer (best of ``iters`` + 2 runs).
    """
    out: dict[str, float] = {}
    try:
        out["matmul_gflops_onnxruntime"] = _ort_matmul_gflops(size, iters, physical_cores())
    except ImportError:
        pass
    out["matmul_gflops_torch"] = _torch_matmul_gflops(size, iters)
    out["matmul_gflops"] = max(v for key, v in out.items() if key.startswith("matmul_gflops_"))
    src = np.random.default_rng(0).standard_normal(copy_mb * (1 << 20) // 4, dtype=np.float32)
    dst = np.empty_like(src)
    best = min(_time(lambda: np.copyto(dst, src), iters + 2, 1))
    out["copy_gbps"] = 2.0 * src.nbytes / best / 1e9
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dpr.bench.retrieval_speed",
                                description="Benchmark the exact top-k retrievers")
    p.add_argument("items", nargs="*", type=float, default=[1e4, 1e5, 1e6])
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--names", nargs="*", default=None)
    args = p.parse_args(argv)
    ceil = measure_ceilings()
    print("ceilings: " + ", ".join(f"{k}={v:.1f}" for k, v in ceil.items()))
    print(f"{'retriever':<12} {'items':>9} {'ms':>9} {'GFLOP/s':>9} {'GB/s':>7} {'%ceil':>6}")
    for n in args.items:
        for r in benchmark_retrievers(int(n), d=args.d, batch=args.batch, k=args.k, names=args.names,
                                      iters=args.iters, ceiling_gflops=ceil["matmul_gflops"]):
            print(f"{r['retriever']:<12} {r['items']:>9} {r['ms_median']:>9.2f} {r['gflops']:>9.1f} "
                  f"{r['gbps']:>7.2f} {r['pct_of_ceiling']:>6.1f}", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
