"""The retrieval section: exact top-k over 10^4..10^6 random items at the run's batch, every retriever that
can run here, beside the machine's measured ceilings (so the distance to the limit is visible).

CPU: ``dpr.bench.retrieval_speed`` (ceilings: best large fp32 matmul of ONNX Runtime / torch and the
copy bandwidth). CUDA: the retrievers on the device, the ceilings measured with torch on the device, and
the bare scoring GEMM's time at each size (the GPU target: the retriever within 2x of it).

Rows: ``items, retriever, ms, gflops, gbps, ceiling_gflops, ceiling_gbps, pct_of_ceiling, pct_of_copy``
(GB/s: bytes of the fp32 item table read per search; the copy ceiling counts read + write).
"""

from __future__ import annotations

import time

from dpr.engine.retrieval import available_retrievers
from dpr.errors import DPRError

from .config import log as _log
from .retrieval_speed import benchmark_retrievers, measure_ceilings

BUDGET_S = 10.0        # timed seconds per retriever and size before the number of searches is cut



def gpu_ceilings(device: str, size: int = 8192, iters: int = 5) -> dict:
    """fp32 matmul GFLOP/s (TF32 as torch is configured) and device copy GB/s (read + write), synchronised."""
    import torch

    dev = torch.device(device)

    def best(fn, n):
        fn()
        torch.cuda.synchronize(dev)
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize(dev)
            out.append(time.perf_counter() - t0)
        return min(out)

    def matmul_s():
        a, b = torch.randn(size, size, device=dev), torch.randn(size, size, device=dev)
        c = torch.empty(size, size, device=dev)
        return best(lambda: torch.mm(a, b, out=c), iters)

    def copy_s():
        src = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        return best(lambda: dst.copy_(src), iters)

    t, tc = matmul_s(), copy_s()
    torch.cuda.empty_cache()
    return {"matmul_gflops_torch_cuda": 2.0 * size ** 3 / t / 1e9, "matmul_gflops": 2.0 * size ** 3 / t / 1e9,
            "copy_gbps": 2.0 * (256 << 20) / tc / 1e9,
            "allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32)}


def gpu_gemm_ms(device: str, items: int, d: int, batch: int, iters: int = 5) -> float:
    """Median ms of the bare (batch x d) @ (d x items) fp32 scoring GEMM on the device."""
    import torch

    dev = torch.device(device)
    def run() -> list[float]:
        q = torch.randn(batch, d, device=dev)
        table = torch.randn(items + 1, d, device=dev)
        out = torch.empty(batch, items + 1, device=dev)
        torch.mm(q, table.T, out=out)
        torch.cuda.synchronize(dev)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            torch.mm(q, table.T, out=out)
            torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
        return times

    times = sorted(run())
    torch.cuda.empty_cache()
    return times[len(times) // 2] * 1e3


def _iters_within_budget(iters: int, last: tuple[int, float] | None, n: int) -> int:
    """Fewer timed searches (at least 2) for a retriever whose time, extrapolated linearly from the last
    size, would spend more than BUDGET_S on one size (faiss's flat index takes seconds at 10^6 items)."""
    if last is None:
        return iters
    predicted_s = last[1] / 1e3 * n / max(last[0], 1)
    return max(2, min(iters, int(BUDGET_S / max(predicted_s, 1e-9))))


def retrieval_section(sizes: list[int], d: int, batch: int, k: int, device: str, iters: int,
                      ceiling_size: int) -> dict:
    on_gpu = device.startswith("cuda")
    _log("retrieval: measuring the machine's ceilings (matmul GFLOP/s, copy GB/s)")
    ceil = gpu_ceilings(device, max(ceiling_size, 2048)) if on_gpu else measure_ceilings(size=ceiling_size)
    names = available_retrievers()
    # the fused kernel with its int8 screen off as well (on a CPU with AVX-512 VNNI "auto" turns it on): both
    # rows side by side in one run, the fp32 one against the fp32 matmul ceiling the screen goes past
    variants = {n: (n, None) for n in names}
    if not on_gpu and "fused" in names:
        variants["fused-fp32"] = ("fused", {"screen": "off"})
    rows, skipped = [], {}
    last_ms: dict[str, tuple[int, float]] = {}
    for n in sorted(sizes):
        gemm = None
        if on_gpu:
            try:
                gemm = gpu_gemm_ms(device, n, d, batch)
            except RuntimeError as exc:                   # out of memory at a huge size: report, go on
                skipped[f"gemm@{n}"] = str(exc).splitlines()[0]
        for name, (registered, extra) in variants.items():
            if name in skipped:
                continue
            n_iters = _iters_within_budget(iters, last_ms.get(name), n)
            _log(f"retrieval: {name} over {n:,} items, batch {batch}, top-{k} ({n_iters} timed searches)")
            opts = {registered: {"device": device}} if on_gpu else ({registered: extra} if extra else None)
            try:
                (r,) = benchmark_retrievers(n, d=d, batch=batch, k=k, names=[registered], iters=n_iters, warmup=1,
                                            options=opts, ceiling_gflops=ceil["matmul_gflops"])
            except (DPRError, ImportError, RuntimeError) as exc:
                skipped[name] = f"{type(exc).__name__}: {exc}"
                continue
            last_ms[name] = (n, r["ms_median"])
            row = {"items": n, "retriever": name, "device": device if on_gpu else "cpu", "ms": r["ms_median"],
                   "ms_min": r["ms_min"], "gflops": r["gflops"], "gbps": r["gbps"],
                   "ceiling_gflops": ceil["matmul_gflops"], "ceiling_gbps": ceil["copy_gbps"],
                   "pct_of_ceiling": r["pct_of_ceiling"],
                   "pct_of_copy": 100.0 * r["gbps"] / ceil["copy_gbps"], "batch": batch, "k": k, "d": d,
                   "iters": n_iters}
            if gemm is not None:
                row["gemm_ms"] = gemm
                row["x_gemm"] = r["ms_median"] / gemm
            rows.append(row)
    return {"ceilings": ceil, "rows": rows, "skipped": skipped, "device": device}
