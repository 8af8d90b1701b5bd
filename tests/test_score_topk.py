"""The fused score + top-k kernel (kernels/score_topk*.{h,cc}) against the plain PyTorch reference:
``torch.topk(q @ table[1:].T)`` with the filters applied to the score matrix. Every ISA path (AVX-512
tile, AVX2+FMA tile, portable tile), every thread partition (row split, catalogue split), odd sizes."""

from __future__ import annotations

import dpr_tests_child_process  # tests/child_process.py (conftest.py)
import numpy as np
import pytest
import torch

from dpr.kernels import score_topk

pytestmark = pytest.mark.skipif(not score_topk.library_available(),
                                reason="libdpr_score_topk.so is not built (python -m dpr.kernels.build)")


def reference(q, table, k, exclude=None, allowed=None):
    """Plain PyTorch: scores, -inf where ineligible, topk; (-1, -inf) where fewer than k are eligible."""
    s = torch.from_numpy(q).double() @ torch.from_numpy(table).double().T
    s[:, 0] = -torch.inf
    if allowed is not None:
        s[~torch.from_numpy(np.broadcast_to(allowed, s.shape).copy())] = -torch.inf
    if exclude is not None:
        for b, ex in enumerate(exclude):
            s[b, torch.as_tensor(np.asarray(ex, dtype=np.int64))] = -torch.inf
    kk = min(k, s.shape[1])
    v, i = torch.topk(s, kk, dim=1)
    i = torch.where(torch.isinf(v), -1, i)
    out_i = np.full((q.shape[0], k), -1, np.int64)
    out_s = np.full((q.shape[0], k), -np.inf, np.float32)
    out_i[:, :kk], out_s[:, :kk] = i.numpy(), v.float().numpy()
    return out_i, out_s


def run(q, table, k, exclude=None, allowed=None, threads=0):
    packed = score_topk.pack(table)
    off = items = None
    if exclude is not None:
        rows = [np.unique(np.asarray(e, np.int64)) for e in exclude]
        off = np.concatenate(([0], np.cumsum([r.size for r in rows])))
        items = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    return score_topk.score_topk(q, packed, table.shape[0] - 1, k, off, items, allowed, threads=threads)


def assert_matches(got, ref, min_overlap=1.0):
    gi, gs = got
    ri, rs = ref
    assert gi.shape == ri.shape and gs.dtype == np.float32 and gi.dtype == np.int64
    np.testing.assert_array_equal(gi >= 0, ri >= 0)                  # same number of results per row
    valid = ri >= 0
    err = np.abs(gs[valid] - rs[valid])
    assert err.size == 0 or err.max() <= 1e-4 * max(1.0, float(np.abs(rs[valid]).max()))
    assert np.isneginf(gs[~valid]).all()
    overlap = sum(len(set(a[a >= 0]) & set(b[b >= 0])) for a, b in zip(gi, ri)) / max(1, int(valid.sum()))
    assert overlap >= min_overlap


@pytest.mark.parametrize("n,d,b,k", [
    (1, 1, 1, 1), (31, 7, 3, 5), (32, 64, 12, 10), (33, 13, 13, 40), (1000, 64, 1, 10), (1000, 64, 25, 10),
    (4099, 33, 97, 100), (20000, 64, 512, 10), (500, 64, 5, 500), (65, 8, 2, 200),
])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_matches_torch(n, d, b, k, threads):
    rng = np.random.default_rng(n * 31 + d * 7 + b)
    table = rng.standard_normal((n + 1, d), dtype=np.float32)
    q = rng.standard_normal((b, d), dtype=np.float32)
    assert_matches(run(q, table, k, threads=threads), reference(q, table, k))


@pytest.mark.parametrize("mask", [None, "shared", "per-row"])
@pytest.mark.parametrize("b,threads", [(3, 2), (40, 2), (40, 1)])   # catalogue split / row split / one thread
def test_filters_inside_the_kernel(mask, b, threads):
    n, d, k = 3001, 24, 20
    rng = np.random.default_rng(b + threads)
    table = rng.standard_normal((n + 1, d), dtype=np.float32)
    q = rng.standard_normal((b, d), dtype=np.float32)
    full = q @ table.T
    full[:, 0] = -np.inf
    best = np.argsort(-full, axis=1)
    # histories made of each row's best items (the case over-fetching handles worst), plus random ones
    exclude = [np.concatenate([best[r, :int(rng.integers(0, 300))], rng.integers(1, n + 1, 20)]) for r in range(b)]
    allowed = None if mask is None else (rng.random(n + 1) < 0.3 if mask == "shared" else rng.random((b, n + 1)) < 0.3)
    got = run(q, table, k, exclude, allowed, threads)
    ref = reference(q, table, k, exclude, allowed)
    assert_matches(got, ref)
    for r in range(b):
        g = got[0][r][got[0][r] >= 0]
        assert not np.isin(g, exclude[r]).any()
        if allowed is not None:
            assert (allowed if allowed.ndim == 1 else allowed[r])[g].all()


def test_fewer_eligible_than_k_pads_and_ties_prefer_lower_index():
    n, d = 100, 4
    table = np.zeros((n + 1, d), np.float32)
    table[1:, 0] = 1.0                        # every item scores the same: ties everywhere
    q = np.ones((2, d), np.float32)
    idx, sc = run(q, table, 5, threads=2)
    np.testing.assert_array_equal(idx, [[1, 2, 3, 4, 5]] * 2)
    allowed = np.zeros(n + 1, bool)
    allowed[[0, 7, 99]] = True                 # row 0 (padding) allowed in the mask is still never returned
    idx, sc = run(q, table, 5, exclude=[[99], []], allowed=allowed)
    np.testing.assert_array_equal(idx, [[7, -1, -1, -1, -1], [7, 99, -1, -1, -1]])
    assert np.isneginf(sc[0, 1:]).all() and sc[1, 1] == 1.0


def test_rejects_malformed_arguments():
    table = np.random.default_rng(0).standard_normal((11, 4), dtype=np.float32)
    packed = score_topk.pack(table)
    q = np.ones((2, 4), np.float32)
    with pytest.raises(score_topk.KernelError, match="exclusion"):      # a row not sorted
        score_topk.score_topk(q, packed, 10, 3, np.array([0, 2, 2]), np.array([5, 3]))
    with pytest.raises(score_topk.KernelError, match="exclusion"):      # item outside 0..N
        score_topk.score_topk(q, packed, 10, 3, np.array([0, 1, 1]), np.array([11]))
    with pytest.raises(ValueError, match="packed"):
        score_topk.score_topk(np.ones((2, 5), np.float32), packed, 10, 3)
    with pytest.raises(ValueError, match="allowed"):
        score_topk.score_topk(q, packed, 10, 3, allowed=np.ones(10, bool))
    with pytest.raises(score_topk.KernelError, match="shape"):
        score_topk.score_topk(q, packed, 10, 0)


_child = dpr_tests_child_process.run_child


def test_portable_tile_matches_the_avx512_tile():
    """The portable tile (forced with DPR_TOPK_ISA=generic, in a child process since the ISA is chosen once)
    returns the same items as the default path on the same inputs."""
    code = ("import json, numpy as np; from dpr.kernels import score_topk as s\n"
            "rng = np.random.default_rng(3); t = rng.standard_normal((2050, 40), dtype=np.float32)\n"
            "q = rng.standard_normal((29, 40), dtype=np.float32)\n"
            "i, v = s.score_topk(q, s.pack(t), 2049, 17, np.arange(30) * 3, np.arange(1, 88), None, threads=2)\n"
            "print(json.dumps({'isa': s.isa(), 'i': i.tolist(), 'v': v.tolist()}))\n")
    outs = {isa: _child(code, {"DPR_TOPK_ISA": isa}) for isa in ("generic", "")}
    assert outs["generic"]["isa"] == "generic"
    np.testing.assert_array_equal(outs["generic"]["i"], outs[""]["i"])
    np.testing.assert_allclose(outs["generic"]["v"], outs[""]["v"], rtol=1e-5, atol=1e-5)


# Inputs of the ISA comparison, built the same way in the child processes and here (numpy only): odd d (not a
# multiple of 8 or 16, and 1), item counts off the 32-item panel, k above some rows' eligible items (and above
# N), history exclusions, shared and per-row allowed masks, both thread partitions (row split, catalogue split).
_ISA_CASES = """
import numpy as np
def isa_cases():
    out = []
    for c, (n, d, b, k, threads, filt) in enumerate([
            (1000, 37, 29, 17, 2, "excl+shared"), (2049, 100, 13, 50, 1, "per-row"), (95, 9, 7, 120, 3, "excl"),
            (4099, 67, 61, 25, 2, "excl+per-row"), (33, 1, 5, 3, 1, None), (500, 16, 12, 10, 2, "shared"),
            (333, 24, 50, 7, 2, "excl"), (1, 3, 2, 4, 1, None)]):
        rng = np.random.default_rng(100 + c)
        table = rng.standard_normal((n + 1, d), dtype=np.float32)
        q = rng.standard_normal((b, d), dtype=np.float32)
        off = items = allowed = None
        if filt and "excl" in filt:
            rows = [np.unique(rng.integers(1, n + 1, int(rng.integers(0, n // 3 + 2)))) for _ in range(b)]
            off = np.concatenate(([0], np.cumsum([r.size for r in rows]))).astype(np.int64)
            items = np.concatenate(rows).astype(np.int64)
        if filt and "shared" in filt:
            allowed = rng.random(n + 1) < 0.6
        if filt and "per-row" in filt:
            allowed = rng.random((b, n + 1)) < rng.uniform(0.005, 0.9, (b, 1))
            allowed[0] = False
            allowed[0, 1:4] = True                   # row 0: 3 eligible items, fewer than k
        out.append((table, q, k, threads, off, items, allowed))
    return out
"""


def test_avx2_tile_matches_the_portable_and_avx512_tiles():
    """Every ISA path (DPR_TOPK_ISA=generic, avx2, unset = AVX-512 here), each in its own child process,
    returns the same items as the others and as the torch reference, on odd sizes with filters. AVX2 and
    AVX-512 do the same FMAs in the same order: their scores are bit-identical; the portable tile's differ
    by float rounding only."""
    code = (_ISA_CASES + "import json\nfrom dpr.kernels import score_topk as s\nres = []\n"
            "for table, q, k, threads, off, items, allowed in isa_cases():\n"
            "    i, v = s.score_topk(q, s.pack(table), table.shape[0] - 1, k, off, items, allowed, threads=threads)\n"
            "    res.append([i.tolist(), v.tolist()])\n"
            "print(json.dumps({'isa': s.isa(), 'res': res}))\n")
    outs = {isa: _child(code, {"DPR_TOPK_ISA": isa}) for isa in ("generic", "avx2", "")}
    assert outs["generic"]["isa"] == "generic"
    best = outs[""]["isa"]
    if best == "generic":
        pytest.skip("this CPU has neither AVX2+FMA nor AVX-512: only the portable tile runs")
    assert outs["avx2"]["isa"] == "avx2"
    ns: dict = {}
    exec(_ISA_CASES, ns)
    for c, (table, q, k, threads, off, items, allowed) in enumerate(ns["isa_cases"]()):
        exclude = None if off is None else [items[off[b]:off[b + 1]] for b in range(q.shape[0])]
        ref = reference(q, table, k, exclude, allowed)
        gen_i, gen_v = (np.asarray(a) for a in outs["generic"]["res"][c])
        for isa in ("avx2", ""):
            got_i, got_v = (np.asarray(a) for a in outs[isa]["res"][c])
            np.testing.assert_array_equal(got_i, gen_i, err_msg=f"case {c}, {isa or best} vs generic")
            np.testing.assert_allclose(got_v, gen_v, rtol=1e-5, atol=1e-5)
            assert_matches((got_i.astype(np.int64), got_v.astype(np.float32)), ref)
        if c in (1, 2, 7):                           # k above some rows' eligible items: -1 padding
            assert (gen_i == -1).any()
        if best == "avx512f":
            np.testing.assert_array_equal(outs["avx2"]["res"][c][1], outs[""]["res"][c][1])    # same FMA order


def test_retriever_large_k_and_closed():
    """k above the heap limit goes to the exact tiled path (same answer); a closed retriever says so."""
    from dpr.engine.retrieval import get_retriever
    from dpr.errors import InputError

    rng = np.random.default_rng(9)
    table = rng.standard_normal((6001, 8), dtype=np.float32)
    q = rng.standard_normal((3, 8), dtype=np.float32)
    r = get_retriever("fused", table)
    r.max_heap_k = 50
    ex = [[1, 2, 3], [], [7]]
    got = r.search(q, 60, exclude=ex)
    assert_matches(got, reference(q, table, 60, ex), min_overlap=0.99)
    r.close()
    with pytest.raises(InputError, match="closed"):
        r.search(q, 5)


@pytest.mark.parametrize("bad", [0, -2, 1.5, "2", True])
def test_retriever_rejects_bad_thread_counts(bad):
    from dpr.engine.retrieval import get_retriever
    from dpr.errors import InputError

    with pytest.raises(InputError, match="threads"):
        get_retriever("fused", np.ones((5, 4), np.float32), threads=bad)


def test_concurrent_searches_from_many_threads():
    """One retriever shared by several threads (the engine is thread-safe): each gets its own answer."""
    from concurrent.futures import ThreadPoolExecutor

    from dpr.engine.retrieval import get_retriever

    rng = np.random.default_rng(4)
    table = rng.standard_normal((3001, 16), dtype=np.float32)
    r = get_retriever("fused", table)
    qs = [rng.standard_normal((int(rng.integers(1, 40)), 16), dtype=np.float32) for _ in range(24)]
    exs = [[rng.integers(1, 3001, 20) for _ in range(q.shape[0])] for q in qs]
    want = [r.search(q, 7, exclude=ex) for q, ex in zip(qs, exs)]
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda a: r.search(a[0], 7, exclude=a[1]), zip(qs, exs)))
    for (gi, gs), (wi, ws) in zip(got, want):
        np.testing.assert_array_equal(gi, wi)
        np.testing.assert_array_equal(gs, ws)
