"""Issue 16's targets read from a ``dpr-bench --json`` file, as a table (met / missed / not measured):

    python -m dpr.bench.targets build/bench-gpu.json

On a GPU run (``"device": "cuda"``) the torch backend's ratios to the plain PyTorch pipeline, the batcher's
p99 at 2,000 requests/s and the torch retriever at 10^6 items against the bare scoring GEMM (the
bench's matmul ceiling); on a CPU run ONNX Runtime's ratios, the host stage and the fused retriever's share of
the matmul ceiling. The fused gate's time inside a CUDA graph is printed by ``bench/gpu_check.sh`` itself.
"""

from __future__ import annotations

import json
import sys

GPU = [("torch/templates", ">=", 10.0), ("torch/none", ">=", 4.0), ("torch/unique", ">=", 3.0)]
CPU = [("onnxruntime/templates", ">=", 25.0), ("onnxruntime/none", ">=", 5.0)]


def _row(name, value, op, target, unit=""):
    if value is None:
        return (name, "not measured", f"{op} {target:g}{unit}", "-")
    ok = value >= target if op == ">=" else value <= target
    return (name, f"{value:.2f}{unit}", f"{op} {target:g}{unit}", "met" if ok else "MISSED")


def targets(res: dict) -> list[tuple]:
    cuda = str(res.get("device", "")).startswith("cuda")
    sp = res.get("speedup_vs_torch") or {}
    rows = [_row(f"{k} (x pipeline)", sp.get(k), op, t, "x") for k, op, t in (GPU if cuda else CPU)]
    bl = res.get("batcher") or {}
    p99 = [r["p99_ms"] for r in bl.get("runs", []) if r.get("pipeline") and r.get("p99_ms") is not None]
    if cuda:
        rows.append(_row(f"batcher p99 at {bl.get('rate_rps', 2000):g}/s (pipelined, worst run)", max(p99) if p99 else None,
                         "<=", 10.0, " ms"))
        r6 = [r for r in res.get("retrieval") or [] if r.get("items") == 1_000_000 and r.get("retriever") == "torch"]
        ratio = 100.0 / r6[0]["pct_of_ceiling"] if r6 and r6[0].get("pct_of_ceiling") else None
        rows.append(_row("torch retrieval at 10^6 items (x bare GEMM)", ratio, "<=", 1.5, "x"))
    else:
        ep = (res.get("host") or {}).get("entry_points") or {}
        rows.append(_row("host, recommend_batch (indices)", (ep.get("recommend_batch_indices") or {}).get("median_ms"),
                         "<=", 1.0, " ms"))
        rows.append(_row("host, recommend()", (ep.get("recommend") or {}).get("median_ms"), "<=", 3.0, " ms"))
        # "fused" is what auto runs (with the int8 screen on AVX-512 VNNI it goes past the fp32 ceiling);
        # "fused-fp32" is the same kernel scoring every item in fp32, the row the ceiling target is about there
        for name in ("fused", "fused-fp32"):
            for items in (100_000, 1_000_000):
                r = [x for x in res.get("retrieval") or [] if x.get("items") == items and x.get("retriever") == name]
                if r or name == "fused":
                    rows.append(_row(f"{name} retrieval at {items:,} items (% of matmul ceiling)",
                                     r[0].get("pct_of_ceiling") if r else None, ">=", 80.0, "%"))
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m dpr.bench.targets BENCH.json", file=sys.stderr)
        return 2
    try:
        res = json.loads(open(argv[0], encoding="utf-8").read())
    except (OSError, ValueError) as exc:
        print(f"cannot read {argv[0]}: {exc}", file=sys.stderr)
        return 2
    rows = targets(res)
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    print(f"issue 16 targets, {res.get('device')} run of {res.get('machine', {}).get('cpu')} "
          f"/ {res.get('machine', {}).get('gpu')}")
    for r in rows:
        print("  " + "  ".join(c.ljust(w[i]) for i, c in enumerate(r)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
