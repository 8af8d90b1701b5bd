"""The fused retriever with its int8 screen off vs on, side by side in one run (same tables, same queries).

Cases: 512 queries x 100,000 items x d=64 (k=10) with a random 50-item exclusion list per row (the engine's
user histories, as ``Exclusions(checked=True)``) and without; 512 x 1,000,000 x 64 without. Per case and
screen: ms per batch (min and median of ``--iters``), effective GFLOP/s (2 B N d / min time) and, for the
int8 screen, the exact fp32 re-scores per row (mean; out of N). The two results are checked identical.
The ratio line is off / int8 (above 1: the screen is faster). Bounded runtime (well under a minute).

Run ``python -m dpr.bench.retrieval_screen [--iters 5] [--threads T] [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import statistics

import numpy as np

from dpr.engine.retrieval import get_retriever
from dpr.engine.retrieval.filters import Exclusions
from dpr.kernels import score_topk

from .retrieval_speed import _time

__all__ = ["main", "run_case"]


def run_case(num_items: int, batch: int = 512, d: int = 64, k: int = 10, history: int = 0, iters: int = 5,
             threads: int | None = None, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((num_items + 1, d), dtype=np.float32)
    q = rng.standard_normal((batch, d), dtype=np.float32)
    exclude = None
    if history:
        items = rng.integers(1, num_items + 1, batch * history).astype(np.int64)
        exclude = Exclusions(offsets=np.arange(batch + 1, dtype=np.int64) * history, items=items,
                             rows_sorted=False, checked=True)
    res = {"num_items": num_items, "batch": batch, "d": d, "k": k, "history": history}
    out = {}
    for screen in ("off", "int8"):
        r = get_retriever("fused", table, screen=screen, threads=threads)
        ts = _time(lambda: r.search(q, k, exclude=exclude), iters, warmup=1)
        out[screen] = r.search(q, k, exclude=exclude)
        best = min(ts)
        res[screen] = {"ms_min": 1e3 * best, "ms_median": 1e3 * statistics.median(ts),
                       "gflops": 2.0 * batch * num_items * d / best / 1e9, "isa": r.screen_isa or r.isa,
                       "threads": r.threads}
        if screen == "int8":
            off = items = None
            if exclude is not None:
                off, items = exclude.offsets, exclude.items
            _, _, rescored = score_topk.score_topk_int8(q, r.table, r._int8, k, off, items, threads=r.threads,
                                                        rows_sorted=False, return_rescored=True)
            res[screen]["rescored_per_row"] = float(rescored.mean())
        r.close()
    res["identical"] = bool((out["off"][0] == out["int8"][0]).all() and (out["off"][1] == out["int8"][1]).all())
    res["ratio"] = res["off"]["ms_min"] / res["int8"]["ms_min"]
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dpr.bench.retrieval_screen", description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="kernel threads (default: the physical cores)")
    ap.add_argument("--quick", action="store_true", help="skip the 1,000,000-item case")
    args = ap.parse_args(argv)
    if not score_topk.library_available():
        print("libdpr_score_topk.so is not built: run python -m dpr.kernels.build")
        return 1
    print(f"# fp32 tile {score_topk.isa()}, int8 screen auto={score_topk.screen_isa()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    cases = [(100_000, 50), (100_000, 0)] + ([] if args.quick else [(1_000_000, 0)])
    print(f"{'case':34s} {'screen':6s} {'ms min':>8s} {'ms med':>8s} {'GFLOP/s':>8s} {'re-scored/row':>14s}")
    for n, hist in cases:
        res = run_case(n, history=hist, iters=args.iters if n <= 100_000 else max(1, args.iters // 2),
                       threads=args.threads)
        name = f"512 x {n:,} x 64, k=10, " + (f"hist {hist}" if hist else "no excl")
        for screen in ("off", "int8"):
            s = res[screen]
            extra = f"{s['rescored_per_row']:14.1f}" if "rescored_per_row" in s else f"{'-':>14s}"
            print(f"{name:34s} {screen:6s} {s['ms_min']:8.2f} {s['ms_median']:8.2f} {s['gflops']:8.1f} {extra}"
                  f"  ({s['isa']}, {s['threads']} threads)")
        print(f"{'':34s} ratio off/int8 = {res['ratio']:.2f}x, identical results: {res['identical']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
