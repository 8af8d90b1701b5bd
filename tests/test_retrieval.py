"""Exact top-k retrievers (dpr.engine.retrieval) against a brute-force numpy oracle."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from dpr.engine.retrieval import (
    RETRIEVERS, DeviceError, Retriever, available_retrievers, get_retriever, register_retriever,
)
from dpr.engine.retrieval.base import Exclusions
from dpr.errors import InputError
from dpr.kernels import score_topk

_HAS = {"torch": True,
        "onnxruntime": importlib.util.find_spec("onnxruntime") is not None,
        "faiss": importlib.util.find_spec("faiss") is not None,
        "fused": score_topk.library_available()}
NAMES = [pytest.param(n, marks=pytest.mark.skipif(not _HAS[n], reason=f"{n} is not installed"))
         for n in ("torch", "onnxruntime", "faiss", "fused")]
# small tiles exercise the tiling/merge paths (tile smaller than k, N not a multiple of the tile)
TILED = {"torch": {"tile": 64, "block": 2}, "onnxruntime": {"tile": 48, "block": 4}, "faiss": {}}
# the fused kernel has no tiles: vary its thread partition instead (1 thread; 3 threads: uneven row or item split)
ODD = {"fused": {"threads": 3}}
TILED["fused"] = {"threads": 1}

_CACHE: dict = {}


def _table(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + 7 * n + d).standard_normal((n + 1, d), dtype=np.float32)


def _retriever(name: str, table: np.ndarray, **kw) -> Retriever:
    key = (name, id(table), tuple(sorted(kw.items())))
    if key not in _CACHE:
        _CACHE[key] = (table, get_retriever(name, table, **kw))  # keep the table alive with its retriever
    return _CACHE[key][1]


def oracle(table, q, k, exclude=None, allowed=None):
    s = q.astype(np.float64) @ table.T.astype(np.float64)
    s[:, 0] = -np.inf
    if allowed is not None:
        s[np.broadcast_to(~allowed, s.shape)] = -np.inf
    if exclude is not None:
        for b, ex in enumerate(exclude):
            s[b, np.asarray(ex, dtype=np.int64)] = -np.inf
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    sc = np.take_along_axis(s, order, 1)
    idx = np.where(np.isneginf(sc), -1, order)
    if idx.shape[1] < k:
        pad = k - idx.shape[1]
        idx = np.pad(idx, ((0, 0), (0, pad)), constant_values=-1)
        sc = np.pad(sc, ((0, 0), (0, pad)), constant_values=-np.inf)
    return idx, sc.astype(np.float32), s


def check(idx, sc, ref_idx, ref_sc, full, k, *, exclude=None, allowed=None):
    b = ref_idx.shape[0]
    assert idx.shape == (b, k) and sc.shape == (b, k)
    assert idx.dtype == np.int64 and sc.dtype == np.float32
    assert not (idx == 0).any(), "padding row 0 returned"
    # same number of valid results per row as the oracle (exactly k when k eligible items exist)
    np.testing.assert_array_equal((idx >= 0).sum(1), (ref_idx >= 0).sum(1))
    valid = idx >= 0
    assert np.isneginf(sc[~valid]).all()
    # scores sorted descending and equal to the dot products of the returned items
    assert (np.diff(np.where(valid, sc, -1e30), axis=1) <= 1e-6).all()
    true = np.take_along_axis(full, np.where(valid, idx, 0), 1)
    np.testing.assert_allclose(sc[valid], true[valid], atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(np.where(valid, sc, 0), np.where(ref_idx >= 0, ref_sc, 0), atol=1e-4, rtol=1e-5)
    # index overlap (tie order may differ)
    overlap = [len(set(idx[r][valid[r]]) & set(ref_idx[r][ref_idx[r] >= 0])) for r in range(b)]
    total = int((ref_idx >= 0).sum())
    assert total == 0 or sum(overlap) / total >= 0.99
    for r in range(b):
        got = idx[r][valid[r]]
        assert len(set(got.tolist())) == got.size, "duplicate item"
        if exclude is not None:
            assert not np.isin(got, np.asarray(exclude[r], dtype=np.int64)).any(), "excluded item returned"
        if allowed is not None:
            row_mask = allowed if allowed.ndim == 1 else allowed[r]
            assert row_mask[got].all(), "disallowed item returned"


CASES = [  # (N, d, B, k)
    (1, 16, 1, 1), (1, 16, 7, 10), (7, 16, 7, 1), (7, 64, 7, 7), (7, 16, 1, 10),
    (1000, 16, 7, 10), (1000, 64, 1, 100), (1000, 16, 7, 1000), (4099, 64, 7, 10),
    (4099, 16, 7, 100), (4099, 16, 1, 4099), (1000, 64, 512, 10), (1000, 16, 512, 100),
]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tiled", [False, True, "odd"], ids=["default", "tiny-tiles", "odd-tiles"])
@pytest.mark.parametrize("n,d,b,k", CASES)
def test_matches_oracle(name, tiled, n, d, b, k):
    if tiled and name == "faiss":
        pytest.skip("faiss has no tile option")
    table = _table(n, d)
    q = np.random.default_rng(n + b + k).standard_normal((b, d), dtype=np.float32)
    opts = {} if not tiled else (TILED[name] if tiled is True else ODD.get(name, {"tile": 37, "block": 0}))
    r = _retriever(name, table, **opts)
    idx, sc = r.search(q, k)
    ref_idx, ref_sc, full = oracle(table, q, k)
    check(idx, sc, ref_idx, ref_sc, full, k)


def _filters(rng, n, b, n_excl, mask_kind, density):
    exclude = [rng.choice(np.arange(0, n + 1), size=min(n + 1, int(rng.integers(0, n_excl + 1))), replace=False)
               for _ in range(b)]
    if mask_kind is None:
        allowed = None
    elif mask_kind == "shared":
        allowed = rng.random(n + 1) < density
    else:
        allowed = rng.random((b, n + 1)) < density
    return exclude, allowed


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mask_kind,density", [(None, 1.0)] + [(m, dd) for m in ("shared", "per-row")
                                                                 for dd in (0.9, 0.4, 0.05, 0.002)])
@pytest.mark.parametrize("n,b,k,n_excl", [(1000, 7, 10, 50), (4099, 64, 100, 300), (50, 7, 40, 30),
                                          (1000, 512, 10, 20)])
def test_filters_exact(name, mask_kind, density, n, b, k, n_excl):
    d = 16
    rng = np.random.default_rng(n * 31 + b + k + int(density * 1000))
    table = _table(n, d)
    q = rng.standard_normal((b, d), dtype=np.float32)
    exclude, allowed = _filters(rng, n, b, n_excl, mask_kind, density)
    r = _retriever(name, table)
    idx, sc = r.search(q, k, exclude=exclude, allowed_mask=allowed)
    ref_idx, ref_sc, full = oracle(table, q, k, exclude, allowed)
    check(idx, sc, ref_idx, ref_sc, full, k, exclude=exclude, allowed=allowed)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("overfetch", [0, 16])
def test_history_holding_the_best_items_is_refetched(name, overfetch):
    """Histories made of each row's best-scored items (as a trained model's users' often are): the short
    first pass (k + overfetch) finds too few eligible items and the re-fetch must still be exact."""
    n, d, b, k = 3000, 16, 33, 10
    table = _table(n, d, seed=7)
    rng = np.random.default_rng(11)
    q = rng.standard_normal((b, d), dtype=np.float32)
    order = np.argsort(-(q @ table[1:].T), axis=1) + 1
    exclude = [order[i, : int(rng.integers(0, 60))] for i in range(b)]      # 0..59 top items per row
    r = get_retriever(name, table, overfetch=overfetch)
    idx, sc = r.search(q, k, exclude=exclude)
    ref_idx, ref_sc, full = oracle(table, q, k, exclude, None)
    check(idx, sc, ref_idx, ref_sc, full, k, exclude=exclude)
    assert ((idx >= 0).sum(1) == k).all()


@pytest.mark.parametrize("name", NAMES)
def test_refill_and_fallbacks(name):
    """Adversarial filters: the best items are excluded/disallowed so over-fetch must refill."""
    n, d, b, k = 2000, 16, 9, 10
    table = _table(n, d, seed=3)
    rng = np.random.default_rng(5)
    q = rng.standard_normal((b, d), dtype=np.float32)
    full = q @ table.T
    full[:, 0] = -np.inf
    order = np.argsort(-full, axis=1)
    allowed = np.ones((b, n + 1), dtype=bool)
    for r_ in range(b):
        allowed[r_, order[r_, : 600]] = False  # the 600 best items of every row are disallowed (70% allowed)
    exclude = [order[r_, 600:700] for r_ in range(b)]  # and the next 100 are the user's history
    exclude[0] = np.arange(1, n + 1)  # row 0 may get nothing
    exclude[1] = order[1, 600:][: (n - 600 - 4)]  # row 1 has exactly 4 eligible items
    for kw in ({}, {"max_fetch": 64}, {"subset_fraction": 0.0}, {"subset_fraction": 1.0}):
        rt = get_retriever(name, table, **kw)
        idx, sc = rt.search(q, k, exclude=exclude, allowed_mask=allowed)
        ref_idx, ref_sc, full64 = oracle(table, q, k, exclude, allowed)
        check(idx, sc, ref_idx, ref_sc, full64, k, exclude=exclude, allowed=allowed)
        assert (idx[0] == -1).all() and np.isneginf(sc[0]).all()
        assert (idx[1] >= 0).sum() == 4
        assert ((idx[2:] >= 0).sum(1) == k).all()


@pytest.mark.parametrize("name", NAMES)
def test_mask_allows_fewer_than_k_and_k_beyond_catalogue(name):
    n, d = 300, 16
    table = _table(n, d, seed=11)
    q = np.random.default_rng(0).standard_normal((4, d), dtype=np.float32)
    allowed = np.zeros(n + 1, dtype=bool)
    allowed[[0, 5, 17, 299]] = True  # row 0 allowed in the mask: must still never be returned
    r = _retriever(name, table)
    idx, sc = r.search(q, 10, allowed_mask=allowed)
    assert ((idx >= 0).sum(1) == 3).all()
    assert set(idx[0][:3].tolist()) == {5, 17, 299}
    assert (idx[:, 3:] == -1).all() and np.isneginf(sc[:, 3:]).all()
    idx, sc = r.search(q, n + 5)  # k > N: all N items then padding
    assert ((idx >= 1).sum(1) == n).all() and (idx[:, n:] == -1).all()
    assert sorted(idx[0, :n].tolist()) == list(range(1, n + 1))


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs(name):
    table = _table(50, 8)
    r = _retriever(name, table)
    q = np.ones((2, 8), dtype=np.float32)
    for bad_k in (0, -1, 2.5, True, None):
        with pytest.raises(InputError):
            r.search(q, bad_k)
    with pytest.raises(InputError, match="shape"):
        r.search(np.ones((2, 9), np.float32), 3)
    with pytest.raises(InputError):
        r.search(np.ones(8, np.float32), 3)
    with pytest.raises(InputError, match="NaN"):
        r.search(np.array([[np.nan] * 8, [1.0] * 8], np.float32), 3)
    with pytest.raises(InputError, match="rows"):
        r.search(q, 3, exclude=[[1]])
    with pytest.raises(InputError, match="outside"):
        r.search(q, 3, exclude=[[51], []])
    with pytest.raises(InputError, match="allowed_mask"):
        r.search(q, 3, allowed_mask=np.ones(50, bool))
    with pytest.raises(InputError):
        get_retriever(name, np.ones((1, 8), np.float32))
    with pytest.raises(InputError):
        get_retriever(name, table, no_such_option=1)
    idx, sc = r.search(np.zeros((0, 8), np.float32), 3)
    assert idx.shape == (0, 3) and sc.shape == (0, 3)


def test_registry():
    assert "torch" in available_retrievers()
    for n in ("onnxruntime", "faiss"):
        assert (n in available_retrievers()) == _HAS[n]
    with pytest.raises(InputError, match="unknown retriever"):
        get_retriever("nope", _table(5, 4))
    table = _table(20, 4)

    class Numpy(Retriever):
        name = "numpy-test"

        def _fetch(self, q, kk):
            s = q @ self.table.T
            s[:, 0] = -np.inf
            o = np.argsort(-s, axis=1, kind="stable")[:, :kk]
            return o, np.take_along_axis(s, o, 1)

    register_retriever("numpy-test", Numpy)
    try:
        assert "numpy-test" in available_retrievers()
        q = np.random.default_rng(0).standard_normal((3, 4), dtype=np.float32)
        ex = [[1, 2, 3], [], [20]]
        idx, sc = get_retriever("numpy-test", table).search(q, 5, exclude=ex)
        ref_idx, ref_sc, full = oracle(table, q, 5, ex)
        check(idx, sc, ref_idx, ref_sc, full, 5, exclude=ex)
        with pytest.raises(InputError, match="already registered"):
            register_retriever("numpy-test", Numpy)
    finally:
        RETRIEVERS.pop("numpy-test", None)


def test_cuda_unavailable_is_clear_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    table = _table(10, 4)
    with pytest.raises(DeviceError):
        get_retriever("torch", table, device="cuda")
    if _HAS["faiss"]:
        with pytest.raises(DeviceError):
            get_retriever("faiss", table, device="cuda")
    if _HAS["onnxruntime"]:
        with pytest.raises(DeviceError):
            get_retriever("onnxruntime", table, device="cuda")


def test_benchmark_function_runs():
    from dpr.bench.retrieval_speed import benchmark_retrievers

    rows = benchmark_retrievers(2000, d=16, batch=8, k=5, iters=1, warmup=0)
    assert {r["retriever"] for r in rows} == set(available_retrievers())
    for r in rows:
        assert r["ms_median"] > 0 and r["gflops"] > 0 and r["gbps"] > 0 and r["items"] == 2000


def _cuda_ok() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ok(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_torch_cuda(dtype):
    n, d, b, k = 5000, 64, 64, 10
    table = _table(n, d)
    q = np.random.default_rng(1).standard_normal((b, d), dtype=np.float32)
    rng = np.random.default_rng(2)
    exclude, allowed = _filters(rng, n, b, 50, "per-row", 0.5)
    r = get_retriever("torch", table, device="cuda", dtype=dtype, tile=1024)
    idx, sc = r.search(q, k, exclude=exclude, allowed_mask=allowed)
    ref_idx, ref_sc, full = oracle(table, q, k, exclude, allowed)
    if dtype == "float32":
        check(idx, sc, ref_idx, ref_sc, full, k, exclude=exclude, allowed=allowed)
    else:  # fp16 table: approximate scores, filters still exact
        valid = idx >= 0
        assert valid.all()
        for r_ in range(b):
            assert not np.isin(idx[r_], exclude[r_]).any() and allowed[r_, idx[r_]].all()
        assert np.mean([len(set(idx[i]) & set(ref_idx[i])) / k for i in range(b)]) > 0.8


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ok(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["onnxruntime", "faiss"])
def test_other_cuda(name):
    table = _table(3000, 32)
    try:
        r = get_retriever(name, table, device="cuda")
    except (DeviceError, ImportError) as exc:
        pytest.skip(f"{name} has no usable CUDA support here: {exc}")
    q = np.random.default_rng(1).standard_normal((16, 32), dtype=np.float32)
    for k in (10, 2500):  # 2500 > faiss GPU's k limit: exact CPU fallback
        idx, sc = r.search(q, k)
        ref_idx, ref_sc, full = oracle(table, q, k)
        check(idx, sc, ref_idx, ref_sc, full, k)


def test_torch_tile_default_is_per_device():
    from dpr.engine.retrieval.torch_retriever import CPU_TILE, CUDA_TILE

    assert get_retriever("torch", _table(10, 4)).tile == CPU_TILE < CUDA_TILE   # CUDA: fewer, larger launches
    assert get_retriever("torch", _table(10, 4), tile=37).tile == 37
    with pytest.raises(InputError, match="tile"):
        get_retriever("torch", _table(10, 4), tile=0)
    # on CUDA the default tile shrinks with the batch so the fp32 score block stays under CUDA_SCORE_BYTES
    from dpr.engine.retrieval.torch_retriever import CUDA_SCORE_BYTES

    r = get_retriever("torch", _table(10, 4))
    r.device, r.tile = "cuda:0", CUDA_TILE                    # the rule alone (no GPU needed)
    assert r._tile_for(1) == CUDA_TILE
    assert r._tile_for(512) == CUDA_SCORE_BYTES // (4 * 512) < CUDA_TILE
    assert r._tile_for(10 ** 6) == 16384                      # never below the CPU tile
    r._auto_tile = False
    assert r._tile_for(512) == CUDA_TILE                      # an explicit tile is kept


@pytest.mark.parametrize("n,tile,block,k", [(1000, 100, 16, 3), (1000, 1001, 16, 5), (4099, 4100, 16, 10),
                                           (777, 250, 7, 20), (50, 50, 16, 2)])
def test_torch_block_max_with_tiles_not_a_multiple_of_the_block(n, tile, block, k):
    """Block-max pruning on the whole multiple-of-block part of every tile, the leftover columns searched
    plainly: still exact, with and without filters."""
    table = _table(n, 16, seed=tile)
    rng = np.random.default_rng(n + tile)
    q = rng.standard_normal((9, 16), dtype=np.float32)
    r = get_retriever("torch", table, tile=tile, block=block)
    idx, sc = r.search(q, k)
    ref_idx, ref_sc, full = oracle(table, q, k)
    check(idx, sc, ref_idx, ref_sc, full, k)
    ex = [rng.choice(np.arange(1, n + 1), size=min(n, 30), replace=False) for _ in range(9)]
    idx, sc = r.search(q, k, exclude=ex)
    ref_idx, ref_sc, full = oracle(table, q, k, ex)
    check(idx, sc, ref_idx, ref_sc, full, k, exclude=ex)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mask_kind", [None, "shared", "per-row"])
def test_exclusions_in_one_array_match_the_per_row_lists(name, mask_kind):
    """``exclude=Exclusions(offsets, items)`` (every row's list in one array, unsorted, repeats, index 0, empty
    rows) gives exactly what the per-row lists give, and the oracle's answer; the subset of rows a
    retriever's fallback takes keeps each row's own exclusions."""
    from dpr.engine.retrieval.base import Filters

    n, d, b, k = 1500, 16, 37, 12
    rng = np.random.default_rng(21)
    table = _table(n, d, seed=3)
    q = rng.standard_normal((b, d), dtype=np.float32)
    order = np.argsort(-(q @ table[1:].T), axis=1) + 1
    exclude = [np.concatenate([order[i, : int(rng.integers(0, 40))], rng.integers(0, n + 1, 5)])
               if i % 5 else np.zeros(0, np.int64) for i in range(b)]
    exclude = [rng.permutation(np.concatenate([e, e[:3]])) for e in exclude]      # any order, repeats
    _, allowed = _filters(rng, n, b, 0, mask_kind, 0.5)
    lens = [len(e) for e in exclude]
    ex = Exclusions(np.concatenate([[0], np.cumsum(lens)]), np.concatenate(exclude).astype(np.int64))
    r = _retriever(name, table)
    got = r.search(q, k, exclude=ex, allowed_mask=allowed)
    ref = r.search(q, k, exclude=exclude, allowed_mask=allowed)
    np.testing.assert_array_equal(got[0], ref[0])
    ref_idx, ref_sc, full = oracle(table, q, k, exclude, allowed)
    check(got[0], got[1], ref_idx, ref_sc, full, k, exclude=exclude, allowed=allowed)
    f1, f2 = Filters.build(b, n, ex, allowed), Filters.build(b, n, exclude, allowed)
    np.testing.assert_array_equal(f1.excl_keys, f2.excl_keys)
    np.testing.assert_array_equal(f1.excl_items, f2.excl_items)
    assert (np.diff(f1.excl_items) >= 0).all()                          # by-item order, for the torch kernel
    sub = f1.subset(np.array([3, 4, 10]))
    offsets, items = sub.excl_lists()
    for j, row in enumerate((3, 4, 10)):
        want = {int(x) for x in exclude[row] if x > 0 and (allowed is None or
                                                            (allowed[x] if allowed.ndim == 1 else allowed[row, x]))}
        assert set(items[offsets[j]:offsets[j + 1]].tolist()) == want


@pytest.mark.parametrize("bad,match", [
    (lambda b: Exclusions(np.arange(b), np.zeros(0, np.int64)), "offsets"),            # B offsets, not B + 1
    (lambda b: Exclusions(np.r_[1, np.ones(b, np.int64)], np.ones(1, np.int64)), "start at 0"),
    (lambda b: Exclusions(np.r_[0, 2, np.ones(b - 1, np.int64)], np.ones(2, np.int64)), "never decrease"),
    (lambda b: Exclusions(np.zeros(b + 1, np.int64), np.ones(3, np.int64)), "end at len"),
    (lambda b: Exclusions(np.zeros(b + 1), np.zeros(0)), "integer"),
    (lambda b: Exclusions(np.r_[0, np.full(b, 1)], np.array([10 ** 6])), "outside"),
])
def test_malformed_exclusions_are_named(bad, match):
    table = _table(100, 8)
    r = get_retriever("torch", table)
    with pytest.raises(InputError, match=match):
        r.search(np.ones((4, 8), np.float32), 3, exclude=bad(4))


def test_auto_cpu_retriever_is_decided_from_the_isa_and_says_why():
    """retriever="auto" on the CPU: fused on AVX-512 / AVX2+FMA, ONNX Runtime when the fused kernel would run
    its portable tile (several times slower there), with the reason in words; unbuilt kernel / no ORT."""
    from dpr.engine.retrieval import auto_cpu_retriever

    both = ["torch", "onnxruntime", "fused"]
    for isa in ("avx512f", "avx2"):
        name, why = auto_cpu_retriever(both, isa)
        assert name == "fused" and why == f"the fused kernel runs its {isa} tile on this CPU"
    name, why = auto_cpu_retriever(both, "generic")
    assert name == "onnxruntime" and "generic tile" in why and "no AVX2+FMA or AVX-512" in why \
        and "ONNX Runtime's MatMul + TopK is faster" in why
    assert auto_cpu_retriever(["torch", "fused"], "generic")[0] == "fused"
    name, why = auto_cpu_retriever(["torch", "onnxruntime"])
    assert name == "onnxruntime" and "not built" in why
    assert auto_cpu_retriever(["torch"])[0] == "torch"
    if _HAS["fused"]:   # default: the kernel's own report on this CPU
        name, why = auto_cpu_retriever(both)
        assert (name == "fused") == (score_topk.isa() != "generic") and score_topk.isa() in why


@pytest.mark.skipif(not (_HAS["fused"] and _HAS["onnxruntime"]), reason="needs the fused kernel and onnxruntime")
def test_auto_cpu_retriever_follows_the_forced_isa():
    """In a child process (-P, cwd tests/) with DPR_TOPK_ISA forced: generic -> onnxruntime, avx2 -> fused
    (where the CPU has AVX2+FMA)."""
    import json
    import os
    import subprocess
    import sys

    code = ("import json\nfrom dpr.engine.retrieval import auto_cpu_retriever, available_retrievers\n"
            "from dpr.kernels import score_topk\n"
            "print(json.dumps([score_topk.isa(), *auto_cpu_retriever(available_retrievers())]))\n")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    got = {}
    for isa in ("generic", "avx2"):
        proc = subprocess.run([sys.executable, "-P", "-c", code], env=dict(os.environ, DPR_TOPK_ISA=isa),
                              capture_output=True, text=True, timeout=180, cwd=tests_dir)
        assert proc.returncode == 0, proc.stderr
        got[isa] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["generic"][:2] == ["generic", "onnxruntime"] and "generic tile" in got["generic"][2]
    if got["avx2"][0] == "avx2":
        assert got["avx2"][1] == "fused" and "avx2 tile" in got["avx2"][2]
