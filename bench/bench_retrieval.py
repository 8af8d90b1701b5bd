"""pytest-benchmark suite for the exact top-k retrievers (not collected by the test suite).

Run:  .venv/bin/python -m pytest bench/bench_retrieval.py --benchmark-only [-k onnxruntime]
Sizes: 10^4, 10^5, 10^6 items x d=64, batch 512, k=10; GFLOP = 2*B*N*d is stored in extra_info.
"""

from __future__ import annotations

import numpy as np
import pytest

from dpr.engine.retrieval import available_retrievers, get_retriever

D, BATCH, K = 64, 512, 10
SIZES = [10_000, 100_000, 1_000_000]

_TABLES: dict[int, np.ndarray] = {}


def _table(n: int) -> np.ndarray:
    if n not in _TABLES:
        _TABLES.clear()  # keep one large table alive at a time
        _TABLES[n] = np.random.default_rng(0).standard_normal((n + 1, D), dtype=np.float32)
    return _TABLES[n]


@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("name", available_retrievers())
def test_search(benchmark, name, n):
    table = _table(n)
    queries = np.random.default_rng(1).standard_normal((BATCH, D), dtype=np.float32)
    retriever = get_retriever(name, table)
    retriever.search(queries, K)  # warm-up
    rounds = 3 if n >= 1_000_000 else 5
    benchmark.pedantic(retriever.search, args=(queries, K), rounds=rounds, iterations=1)
    gflop = 2.0 * BATCH * n * D / 1e9
    benchmark.extra_info.update(items=n, d=D, batch=BATCH, k=K, gflop=gflop)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gflops"] = gflop / stats.stats.median
    retriever.close()


@pytest.mark.parametrize("name", available_retrievers())
def test_search_filtered(benchmark, name):
    """Exclusion of 50 history items per row plus a shared 50% tag mask, 10^5 items."""
    n = 100_000
    table = _table(n)
    rng = np.random.default_rng(2)
    queries = rng.standard_normal((BATCH, D), dtype=np.float32)
    exclude = [rng.integers(1, n + 1, size=50) for _ in range(BATCH)]
    allowed = rng.random(n + 1) < 0.5
    retriever = get_retriever(name, table)
    retriever.search(queries, K, exclude=exclude, allowed_mask=allowed)
    benchmark.pedantic(retriever.search, args=(queries, K), kwargs={"exclude": exclude, "allowed_mask": allowed},
                       rounds=5, iterations=1)
    retriever.close()
