"""The fused kernel's int8 screen (kernels/score_topk.h, dpr_score_topk_int8): an int8 dot product plus a rigorous
bound rules items out, the survivors get their exact fp32 score. It must return the exact top-k: checked against
a float64 brute force (up to provable near-ties) and against the fp32 path (same indices; the same score bits when
the fp32 path runs its AVX-512 / AVX2 FMA tile). Both screen tiles: the portable one (any CPU) and the AVX-512
VNNI one (where the CPU has it). No test here asserts a speed."""

from __future__ import annotations

import dpr_tests_child_process  # tests/child_process.py (conftest.py)
import numpy as np
import pytest

from dpr.kernels import score_topk

pytestmark = pytest.mark.skipif(not score_topk.library_available(),
                                reason="libdpr_score_topk.so is not built (python -m dpr.kernels.build)")

SCREENS = ["generic", pytest.param("avx512vnni", marks=pytest.mark.skipif(
    not (score_topk.library_available() and score_topk.cpu_has_vnni()), reason="this CPU has no AVX-512 VNNI"))]
# the fp32 path's scores are the same FMA chain as the re-score's (bit-identical) on its AVX-512 / AVX2 tiles
FP32_FMA = score_topk.library_available() and score_topk.isa() in ("avx512f", "avx2")


def _lists(exclude):
    if exclude is None:
        return None, None
    rows = [np.unique(np.asarray(e, np.int64)) for e in exclude]
    off = np.concatenate(([0], np.cumsum([r.size for r in rows]))).astype(np.int64)
    return off, (np.concatenate(rows) if rows else np.zeros(0, np.int64))


def run_int8(q, table, k, exclude=None, allowed=None, threads=1, isa="generic", int8=None):
    off, items = _lists(exclude)
    int8 = score_topk.pack_int8(table) if int8 is None else int8
    return score_topk.score_topk_int8(q, table, int8, k, off, items, allowed, threads=threads, isa=isa,
                                      return_rescored=True)


def run_fp32(q, table, k, exclude=None, allowed=None, threads=1):
    off, items = _lists(exclude)
    return score_topk.score_topk(q, score_topk.pack(table), table.shape[0] - 1, k, off, items, allowed,
                                 threads=threads)


def check_exact(got, q, table, k, exclude=None, allowed=None):
    """``got`` is an exact top-k of the float64 scores: the right number of results per row, every one eligible
    and distinct, sorted (ties: lower index first), scores within fp32 rounding of the float64 ones, and the
    true scores of the k returned items equal to the k best true scores up to 1e-5 relative (so two items
    whose scores tie within rounding may swap, nothing else)."""
    gi, gs = got[0], got[1]
    b, n = q.shape[0], table.shape[0] - 1
    s = q.astype(np.float64) @ table.astype(np.float64).T
    elig = np.ones((b, n + 1), bool)
    elig[:, 0] = False
    if allowed is not None:
        elig &= np.broadcast_to(allowed, elig.shape)
    if exclude is not None:
        for r, ex in enumerate(exclude):
            elig[r, np.asarray(ex, np.int64)] = False
    assert gi.shape == (b, k) and gs.shape == (b, k) and gi.dtype == np.int64 and gs.dtype == np.float32
    qn = np.linalg.norm(q.astype(np.float64), axis=1)
    xn = np.linalg.norm(table.astype(np.float64), axis=1)
    for r in range(b):
        cnt = min(k, int(elig[r].sum()))
        assert (gi[r, :cnt] >= 1).all() and (gi[r, cnt:] == -1).all(), (r, gi[r])
        assert np.isneginf(gs[r, cnt:]).all()
        idx = gi[r, :cnt]
        assert len(set(idx.tolist())) == cnt and elig[r, idx].all()
        tol = 1e-5 * qn[r] * xn.max() + 1e-30
        np.testing.assert_allclose(gs[r, :cnt], s[r, idx], rtol=0, atol=tol)
        v = gs[r, :cnt]
        assert (np.diff(v) <= 0).all()
        tie = v[1:] == v[:-1]
        assert (idx[1:][tie] > idx[:-1][tie]).all()
        best = np.sort(s[r][elig[r]])[::-1][:cnt]
        np.testing.assert_allclose(np.sort(s[r, idx])[::-1], best, rtol=0, atol=tol)


def check_same_as_fp32(got, ref):
    """Same results as the fp32 path: indices equal and scores bit-equal when the fp32 path runs an FMA tile;
    else (the portable fp32 tile rounds differently) equal up to rounding."""
    if FP32_FMA:
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])
    else:
        np.testing.assert_allclose(got[1], ref[1], rtol=1e-5, atol=1e-5)


def make_case(n, d, b, seed, kind="gauss"):
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((n + 1, d)).astype(np.float32)
    q = rng.standard_normal((b, d)).astype(np.float32)
    if kind == "spread":      # item norms from 1e-3 to 1e3, query norms too
        table *= (10.0 ** rng.uniform(-3, 3, (n + 1, 1))).astype(np.float32)
        q *= (10.0 ** rng.uniform(-3, 3, (b, 1))).astype(np.float32)
    elif kind == "dups":      # every item has duplicates: exact ties everywhere
        base = rng.standard_normal((max(1, n // 4), d)).astype(np.float32)
        table[1:] = base[rng.integers(0, base.shape[0], n)]
    elif kind == "near":      # near-duplicates: score gaps far below the int8 error (the bound decides everything)
        base = rng.standard_normal(d).astype(np.float32)
        table = (base + 1e-3 * rng.standard_normal((n + 1, d))).astype(np.float32)
    elif kind == "zeros":     # zero items and zero query rows mixed in
        table[rng.random(n + 1) < 0.3] = 0.0
        q[::2] = 0.0
    elif kind == "quantized": # values already on the int8 grid: error terms zero, scores tie often
        table = rng.integers(-3, 4, (n + 1, d)).astype(np.float32)
        q = rng.integers(-2, 3, (b, d)).astype(np.float32)
    return table, q


GRID = [(n, d) for n in (1, 7, 33, 1001, 4099) for d in (1, 3, 17, 64, 100)]


@pytest.mark.parametrize("screen", SCREENS)
@pytest.mark.parametrize("n,d", GRID)
def test_matches_float64_and_fp32_path(n, d, screen):
    """Odd sizes; k = 1, 10, more than the eligible items, and N; no filter, history exclusions, shared and
    per-row allowed masks; one thread and the catalogue split (small batches on 3 threads)."""
    for c, (b, k, filt, threads) in enumerate([(1, 1, None, 1), (5, 10, "excl", 3), (13, n + 5, "per-row", 2),
                                               (5, n, "shared", 1), (13, 10, "excl+shared", 3)]):
        table, q = make_case(n, d, b, seed=n * 1000 + d * 10 + c)
        rng = np.random.default_rng(c)
        exclude = allowed = None
        if filt and "excl" in filt:
            exclude = [rng.integers(1, n + 1, int(rng.integers(0, n // 3 + 2))) for _ in range(b)]
        if filt and "shared" in filt:
            allowed = rng.random(n + 1) < 0.6
        if filt == "per-row":
            allowed = rng.random((b, n + 1)) < 0.5
        got = run_int8(q, table, k, exclude, allowed, threads=threads, isa=screen)
        check_exact(got, q, table, k, exclude, allowed)
        check_same_as_fp32(got, run_fp32(q, table, k, exclude, allowed, threads=threads))


@pytest.mark.parametrize("screen", SCREENS)
@pytest.mark.parametrize("kind", ["spread", "dups", "near", "zeros", "quantized"])
@pytest.mark.parametrize("threads", [1, 2])
def test_hard_inputs(kind, threads, screen):
    """Norms spread over six decades, duplicate item vectors (exact ties: lower index first), near-duplicates
    (gaps far below the int8 error: a screen without its bound fails here), zero items and zero query rows,
    values on the int8 grid; with histories and k above some rows' eligible items."""
    for n, d, b, k in [(4099, 64, 13, 10), (1001, 17, 5, 40), (33, 3, 13, 50)]:
        table, q = make_case(n, d, b, seed=n + d + b, kind=kind)
        rng = np.random.default_rng(n)
        exclude = [rng.integers(1, n + 1, int(rng.integers(0, 30))) for _ in range(b)]
        got = run_int8(q, table, k, exclude, threads=threads, isa=screen)
        check_exact(got, q, table, k, exclude)
        check_same_as_fp32(got, run_fp32(q, table, k, exclude, threads=threads))


@pytest.mark.parametrize("screen", SCREENS)
def test_all_excluded_rows_and_adversarial_histories(screen):
    """Rows whose every item is excluded or masked out (all -1), rows with one eligible item, and histories
    made of each row's best items (the screen must not stop at excluded survivors)."""
    n, d, b, k = 2000, 32, 6, 10
    table, q = make_case(n, d, b, seed=5)
    best = np.argsort(-(q @ table.T)[:, 1:], axis=1) + 1
    exclude = [np.arange(1, n + 1), best[1, :500], [], best[3, :n - 1], best[4, :10], [1, 2, 3]]
    allowed = np.ones((b, n + 1), bool)
    allowed[5] = False
    got = run_int8(q, table, k, exclude, allowed, isa=screen)
    check_exact(got, q, table, k, exclude, allowed)
    assert (got[0][0] == -1).all() and (got[0][5] == -1).all()
    assert (got[0][3, 1:] == -1).all() and got[0][3, 0] == best[3, n - 1]
    check_same_as_fp32(got, run_fp32(q, table, k, exclude, allowed))


@pytest.mark.parametrize("screen", SCREENS)
def test_unsorted_exclusions(screen):
    """Exclusion rows in any order with repeats (rows_sorted=False): sorted inside the kernel, same result."""
    n, d, b, k = 3000, 24, 7, 15
    table, q = make_case(n, d, b, seed=11)
    rng = np.random.default_rng(2)
    rows = [rng.integers(1, n + 1, 40) for _ in range(b)]
    off = np.concatenate(([0], np.cumsum([len(r) for r in rows]))).astype(np.int64)
    items = np.concatenate(rows).astype(np.int64)
    int8 = score_topk.pack_int8(table)
    got = score_topk.score_topk_int8(q, table, int8, k, off, items, threads=2, rows_sorted=False, isa=screen)
    check_exact(got, q, table, k, rows)
    check_same_as_fp32(got, run_fp32(q, table, k, rows, threads=2))
    with pytest.raises(score_topk.KernelError, match="exclusion"):   # unsorted rows said to be sorted
        score_topk.score_topk_int8(q, table, int8, k, off, items, rows_sorted=True, isa=screen)


def test_screens_agree_and_skip_work():
    """The screen rules most items out (the count of exact re-scores is small next to N; not a speed test), and
    both tiles make the same decisions (the same float ops on the same int dots): the same re-score counts."""
    n, d, b, k = 20000, 64, 24, 10
    table, q = make_case(n, d, b, seed=3)
    exclude = [np.random.default_rng(r).integers(1, n + 1, 50) for r in range(b)]
    int8 = score_topk.pack_int8(table)
    gen = run_int8(q, table, k, exclude, isa="generic", int8=int8)
    check_exact(gen, q, table, k, exclude)
    assert (gen[2] >= k).all() and gen[2].mean() < n / 20
    if score_topk.cpu_has_vnni():
        vnni = run_int8(q, table, k, exclude, isa="avx512vnni", int8=int8)
        np.testing.assert_array_equal(vnni[0], gen[0])
        np.testing.assert_array_equal(vnni[1], gen[1])
        np.testing.assert_array_equal(vnni[2], gen[2])
    else:
        with pytest.raises(score_topk.KernelError, match="VNNI"):
            run_int8(q, table, k, isa="avx512vnni", int8=int8)


def test_pack_int8_tables():
    """The layout and the per-item statistics pack_int8 documents."""
    rng = np.random.default_rng(0)
    n, d = 40, 6
    table = rng.standard_normal((n + 1, d)).astype(np.float32)
    table[3] = 0.0
    t8 = score_topk.pack_int8(table)
    assert t8.packed8.shape == (2, 2, 32, 4) and t8.stats.shape == (2, 4, 32)
    for item in (1, 3, 17, 33, 40):
        p, j = divmod(item - 1, 32)
        x = table[item].astype(np.float64)
        s = t8.stats[p, 0, j]
        assert s == np.float32(np.abs(table[item]).max() / np.float32(127))
        x8 = np.concatenate([t8.packed8[p, g, j] for g in range(2)]).astype(np.int64)[:d] - 128
        assert np.abs(x8).max() <= 127
        np.testing.assert_array_equal(t8.packed8[p, 1, j, 2:], 128)           # dims past d
        if s > 0:
            np.testing.assert_array_equal(x8, np.rint(x / s))
        assert t8.stats[p, 1, j] >= np.linalg.norm(x - float(s) * x8)         # rounded up
        assert t8.stats[p, 2, j] >= np.linalg.norm(x)
    assert t8.stats[0, 3, 0] == t8.stats[0, 1].max() and t8.stats[1, 3, 1] == t8.stats[1, 2].max()
    np.testing.assert_array_equal(t8.packed8[1, :, 8:], 128)                   # tail of the last panel
    with pytest.raises(ValueError, match="int8"):
        score_topk.score_topk_int8(np.ones((1, 5), np.float32), table, t8, 3)


def test_retriever_screen_option():
    from dpr.engine.retrieval import get_retriever
    from dpr.errors import InputError

    table, q = make_case(5000, 32, 9, seed=8)
    ex = [[1, 2, 3]] * 9
    off = get_retriever("fused", table, screen="off")
    on = get_retriever("fused", table, screen="int8")
    auto = get_retriever("fused", table)
    assert off.screen == "off" and on.screen == "int8" and "requested" in on.screen_reason
    assert off._int8 is None and on._packed is None
    if score_topk.screen_isa() == "avx512vnni":
        assert auto.screen == "int8" and "VNNI" in auto.screen_reason
    else:
        assert auto.screen == "off" and "fp32" in auto.screen_reason
    assert auto.describe()["screen_reason"] == auto.screen_reason
    want = off.search(q, 12, exclude=ex)
    for r in (on, auto):
        got = r.search(q, 12, exclude=ex)
        check_same_as_fp32(got, want)
    with pytest.raises(InputError, match="screen"):
        get_retriever("fused", table, screen="fp16")
    on.close()
    with pytest.raises(InputError, match="closed"):
        on.search(q, 5)


_child = dpr_tests_child_process.run_child


def test_isa_cap_turns_the_auto_screen_off():
    """DPR_TOPK_ISA=generic / avx2 (read once per process: a child each) makes the auto screen the portable one,
    which the retriever does not prefer to fp32; screen='int8' still runs it, with the same results."""
    code = ("import json, numpy as np; from dpr.kernels import score_topk as s\n"
            "from dpr.engine.retrieval import get_retriever\n"
            "rng = np.random.default_rng(1); t = rng.standard_normal((700, 20)).astype(np.float32)\n"
            "q = rng.standard_normal((4, 20)).astype(np.float32)\n"
            "a = get_retriever('fused', t); i = get_retriever('fused', t, screen='int8')\n"
            "print(json.dumps({'isa': s.screen_isa(), 'auto': a.screen, 'why': a.screen_reason,\n"
            "                  'int8': i.screen_isa, 'same': bool((a.search(q, 9)[0] == i.search(q, 9)[0]).all())}))\n")
    for cap in ("generic", "avx2"):
        out = _child(code, {"DPR_TOPK_ISA": cap})
        assert out["isa"] == "generic" and out["auto"] == "off" and out["int8"] == "generic" and out["same"]
        assert "auto:" in out["why"]


def test_bench_case_runs_small():
    """bench/retrieval_screen.py on a small case: both screens give identical results (no timing asserted)."""
    from dpr.bench.retrieval_screen import run_case

    res = run_case(3000, batch=20, d=16, history=5, iters=1, threads=1)
    assert res["identical"] and res["int8"]["rescored_per_row"] >= 10


def test_engine_reports_the_screen_and_answers_alike_with_it_off(export_dir):
    """The engine's choice_reason ends with the fused retriever's screen choice; retriever_options turns the
    screen off, and the answers are the same either way."""
    if not score_topk.library_available():
        pytest.skip("libdpr_score_topk.so is not built (python -m dpr.kernels.build)")
    from dpr.engine import Engine

    on = Engine.load(export_dir, backend="onnxruntime", retriever="fused", retriever_options={"screen": "int8"})
    off = Engine.load(export_dir, backend="onnxruntime", retriever="fused", retriever_options={"screen": "off"})
    try:
        assert "int8 screen" in on.choice_reason and "screen='off' requested" in off.choice_reason
        hist = [["i1", "i2", "i3"], ["i10"], ["i4", "i9", "i33", "i7"]]
        prompts = ["something funny", None, "more comedy"]
        a = on.recommend(hist, prompts=prompts, k=7)
        b = off.recommend(hist, prompts=prompts, k=7)
        assert a.item_ids == b.item_ids
        np.testing.assert_array_equal(np.array(a.scores), np.array(b.scores))
    finally:
        on.close()
        off.close()


@pytest.mark.parametrize("screen", SCREENS)
@pytest.mark.parametrize("threads", [2, 3])
def test_batch_sizes_around_the_row_split(threads, screen):
    """Small batches split by rows from 5 rows per thread (even ranges, a tail tile each) and by catalogue parts
    below (score_topk_cpu.cc, catalogue_parts): the same top-k on both sides of the switch and across the
    whole-block split, with histories excluded."""
    n, d, k = 3001, 64, 10
    for b in (2 * threads + 1, 5 * threads - 1, 5 * threads, 5 * threads + 1, 23, 24, 25, 47, 48, 49):
        table, q = make_case(n, d, b, seed=b * 7 + threads)
        rng = np.random.default_rng(b)
        exclude = [rng.integers(1, n + 1, int(rng.integers(0, 40))) for _ in range(b)]
        got = run_int8(q, table, k, exclude, threads=threads, isa=screen)
        check_exact(got, q, table, k, exclude)
        check_same_as_fp32(got, run_fp32(q, table, k, exclude, threads=threads))
        alone = run_int8(q, table, k, exclude, threads=1, isa=screen)
        assert np.array_equal(got[0], alone[0]) and np.array_equal(got[1], alone[1])
