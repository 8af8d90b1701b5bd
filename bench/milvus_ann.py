"""Milvus ANN indexes against exact search: Recall@10 and speed at 10^5 and 10^6 items (docs/SCALE.md).

    python -m dpr.bench.milvus_ann                               # 10^5 and 10^6 items, FLAT / IVF_FLAT / HNSW
    python -m dpr.bench.milvus_ann --items 100000 --json out.json --max-seconds 600
    python -m dpr.bench.milvus_ann --items 100000 --nprobe 1 4 16 --ef 10 32 128 --spread 3   # a recall curve

The table is synthetic but shaped like an export's: ``--dim`` columns (d = 64 plus 16 tag columns by default),
items drawn around 256 cluster centres (real item embeddings cluster; uniform noise would be the worst case
for IVF and HNSW), queries near items as steered user vectors are. The exact top-10 comes from numpy (the
``fused``/``torch`` retrievers' answer; Milvus FLAT gives the same, and is timed as the exact baseline).

For each (items, index): build seconds (insert + index + load in Milvus Lite, in this process), search
milliseconds per call of ``--batch`` queries (median of ``--iters``), and Recall@10 (the mean share of the
exact top-10 found). A configuration that would start after ``--max-seconds`` is skipped and reported so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import numpy as np


def make_table(n: int, dim: int, seed: int = 0, spread: float = 0.7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((256, dim), dtype=np.float32)
    table = np.empty((n + 1, dim), np.float32)
    for s in range(1, n + 1, 1 << 17):          # in chunks: 10^6 x 80 floats without a second full copy
        e = min(n + 1, s + (1 << 17))
        table[s:e] = centres[rng.integers(0, 256, e - s)] + spread * rng.standard_normal((e - s, dim), dtype=np.float32)
    table[0] = 0
    return table


def exact_top(table: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    s = q @ table[1:].T
    top = np.argpartition(-s, k, axis=1)[:, :k]
    return top + 1


def run(sizes: list[int], dim: int, indexes: list[str], batch: int, iters: int, k: int, max_seconds: float,
        sweeps: dict | None = None, spread: float = 0.7) -> dict:
    from dpr.engine.retrieval import get_retriever

    t_start = time.monotonic()
    rows, skipped = [], []
    for n in sizes:
        sweeps = sweeps or {}
        table = make_table(n, dim, spread=spread)
        rng = np.random.default_rng(1)
        q = table[rng.integers(1, n + 1, batch)] + 0.3 * rng.standard_normal((batch, dim), dtype=np.float32)
        truth = exact_top(table, q, k)
        for index in indexes:
            if time.monotonic() - t_start > max_seconds:
                skipped.append({"items": n, "index": index, "why": f"past --max-seconds {max_seconds:.0f}"})
                continue
            print(f"milvus_ann: {index} over {n:,} items x {dim}", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory(prefix="dpr-milvus-ann-") as tmp:
                t0 = time.perf_counter()
                r = get_retriever("milvus", table, uri=f"{tmp}/items.db", index=index)
                build_s = time.perf_counter() - t0
                # one index, several search settings (nprobe / ef): the recall-speed curve without a rebuild
                for sp in (sweeps.get(index) or [{}]):
                    r._search_params = {**r._search_params, **sp}   # noqa: SLF001 - the bench's own retriever
                    r.search(q, k)                                      # warm-up
                    times = []
                    for _ in range(iters):
                        t0 = time.perf_counter()
                        idx, _ = r.search(q, k)
                        times.append(time.perf_counter() - t0)
                    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(idx.tolist(), truth.tolist())]))
                    rows.append({"items": n, "index": index, "params": dict(r._search_params), "dim": dim,  # noqa: SLF001
                                 "batch": batch, "k": k, "build_s": round(build_s, 2),
                                 "ms_per_call": round(1e3 * statistics.median(times), 2),
                                 "ms_per_query": round(1e3 * statistics.median(times) / batch, 3),
                                 "recall_at_10": round(recall, 4)})
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                r.close()
        del table
    return {"rows": rows, "skipped": skipped, "seconds": round(time.monotonic() - t_start, 1)}


def table_md(res: dict) -> str:
    out = ["| items | index | search params | build s | ms / call | ms / query | Recall@10 |",
           "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        params = ", ".join(f"{k}={v}" for k, v in r.get("params", {}).items()) or "-"
        out.append(f"| {r['items']:,} | {r['index']} | {params} | {r['build_s']} | {r['ms_per_call']} | "
                   f"{r['ms_per_query']} | {r['recall_at_10']:.3f} |")
    for s in res["skipped"]:
        out.append(f"| {s['items']:,} | {s['index']} | skipped: {s['why']} | | | |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dpr.bench.milvus_ann", description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=80, help="table width: d plus the tag channel's columns")
    p.add_argument("--indexes", nargs="+", default=["FLAT", "IVF_FLAT", "HNSW"])
    p.add_argument("--batch", type=int, default=32, help="queries per search call")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--nprobe", type=int, nargs="+", default=[16], help="IVF_FLAT search settings to sweep")
    p.add_argument("--ef", type=int, nargs="+", default=[128], help="HNSW search settings to sweep (ef >= k)")
    p.add_argument("--spread", type=float, default=0.7,
                   help="noise around the 256 cluster centres (larger: less clustered, harder for ANN)")
    p.add_argument("--max-seconds", type=float, default=900, help="start no configuration after this")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    if a.batch < 1 or a.iters < 1 or a.dim < 1 or any(n < 10 for n in a.items):
        p.error("--batch, --iters, --dim must be >= 1 and --items >= 10")
    sweeps = {"IVF_FLAT": [{"nprobe": v} for v in a.nprobe], "HNSW": [{"ef": v} for v in a.ef]}
    res = run(sorted(a.items), a.dim, [i.upper() for i in a.indexes], a.batch, a.iters, 10, a.max_seconds,
              sweeps, a.spread)
    print(table_md(res))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as fh:
            json.dump(res, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
