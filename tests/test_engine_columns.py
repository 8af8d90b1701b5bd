"""The columnar core (issue 16): the history exclusion reaches the fused retrieval kernel as sorted rows with
the batch's own offsets, the kernel's direct path equals the generic filtered path, the batcher's queue hands
out the columns the rows make, and the batcher's results equal ``recommend``'s, per-row options included."""

from __future__ import annotations

import numpy as np
import pytest

from dpr.errors import InputError


def _cols(rng, num_items, b, excl=None):
    from dpr.engine.columns import Columns, offsets_of

    lens = rng.integers(1, 40, b)
    flat = rng.integers(1, num_items + 1, int(lens.sum())).astype(np.int64)
    ex = rng.random(b) < 0.7 if excl is None else np.full(b, excl)
    return Columns(flat, offsets_of(lens), [None] * b, [None] * b, np.full(b, 5, np.int64), ex, [None] * b)


def test_exclusions_are_the_batch_arrays_as_they_are():
    """The exclusion handed to the retriever is the batch's own offsets and histories (the very arrays when
    every row excludes its history; else the excluding rows' histories, in order), marked checked."""
    from dpr.engine.pipeline import exclusions

    rng = np.random.default_rng(0)
    for excl in (True, None, False):
        cols = _cols(rng, 300, 37, excl)
        ex = exclusions(cols, 300)
        if not cols.exclude_history.any():
            assert ex is None
            continue
        assert ex.checked and not ex.rows_sorted
        if cols.exclude_history.all():
            assert ex.offsets is cols.offsets and ex.items is cols.flat          # no copy, no keys
        for i in range(len(cols)):
            got = ex.items[ex.offsets[i]:ex.offsets[i + 1]]
            want = cols.flat[cols.offsets[i]:cols.offsets[i + 1]] if cols.exclude_history[i] else []
            np.testing.assert_array_equal(got, want)


def test_kernel_any_order_entry_equals_the_sorted_entry():
    """``score_topk(rows_sorted=False)`` (rows in any order, repeats, sorted inside the kernel) gives what the
    sorted entry gives on the same lists sorted beforehand; malformed offsets and items are still refused."""
    from dpr.kernels import score_topk

    if not score_topk.library_available():
        pytest.skip("libdpr_score_topk.so is not built")
    rng = np.random.default_rng(9)
    n, d, b = 517, 13, 29
    table = rng.standard_normal((n + 1, d)).astype(np.float32)
    packed = score_topk.pack(table)
    q = rng.standard_normal((b, d)).astype(np.float32)
    lens = rng.integers(0, 60, b)
    offsets = np.zeros(b + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    items = rng.integers(0, n + 1, int(offsets[-1])).astype(np.int64)          # 0 (padding) and repeats too
    sorted_items = np.concatenate([np.sort(items[offsets[i]:offsets[i + 1]]) for i in range(b)])
    for k in (1, 10, n):
        for allowed in (None, rng.random(n + 1) < 0.4):
            a = score_topk.score_topk(q, packed, n, k, offsets, items, allowed, rows_sorted=False)
            s = score_topk.score_topk(q, packed, n, k, offsets, sorted_items, allowed)
            np.testing.assert_array_equal(a[0], s[0])
            np.testing.assert_array_equal(a[1], s[1])
    with pytest.raises(score_topk.KernelError, match="exclusion"):
        score_topk.score_topk(q, packed, n, 3, offsets, np.where(items == items[0], n + 5, items), rows_sorted=False)
    bad = offsets.copy()
    bad[3] = bad[4] + 1
    with pytest.raises(score_topk.KernelError, match="exclusion"):
        score_topk.score_topk(q, packed, n, 3, bad, items, rows_sorted=False)


def test_fused_direct_path_equals_the_filtered_path():
    """The fused retriever's direct path (the engine's checked Exclusions in any order, or sorted ones; bool
    masks straight to the kernel) gives the indices and scores of its generic path (Filters built from the
    lists), on odd sizes, with shared and per-row masks, a row with nothing allowed, k above the eligible
    count."""
    from dpr.engine.pipeline import exclusions
    from dpr.engine.retrieval import available_retrievers, get_retriever
    from dpr.engine.retrieval.base import Exclusions

    if "fused" not in available_retrievers():
        pytest.skip("the fused retriever is not built (python -m dpr.kernels.build)")
    rng = np.random.default_rng(1)
    n, d, b = 203, 24, 19
    table = rng.standard_normal((n + 1, d)).astype(np.float32)
    r = get_retriever("fused", table)
    q = rng.standard_normal((b, d)).astype(np.float32)
    cols = _cols(rng, n, b)
    ex = exclusions(cols, n)                              # checked, rows as they are: the kernel sorts them
    srt = Exclusions(ex.offsets, np.concatenate([np.sort(ex.items[ex.offsets[i]:ex.offsets[i + 1]])
                                                 for i in range(b)]), rows_sorted=True)
    unsorted = Exclusions(ex.offsets, ex.items)           # neither flag: the generic path (Filters)
    shared = rng.random(n + 1) < 0.5
    per_row = rng.random((b, n + 1)) < 0.3
    per_row[3] = False                                    # a row with nothing allowed
    for k in (1, 7, 150):
        for mask in (None, shared, per_row):
            i1, s1 = r.search(q, k, exclude=ex, allowed_mask=mask)
            i2, s2 = r.search(q, k, exclude=unsorted, allowed_mask=mask)
            i3, s3 = r.search(q, k, exclude=srt, allowed_mask=mask)
            for i, s in ((i2, s2), (i3, s3)):
                np.testing.assert_array_equal(i1, i)
                np.testing.assert_array_equal(s1, s)
    bad = Exclusions(np.array([0, 2] + [2] * (b - 1)), np.array([9, 4]), rows_sorted=True)    # a row not sorted
    with pytest.raises(InputError, match="refused by the fused kernel"):
        r.search(q, 3, exclude=bad)
    with pytest.raises(InputError, match="allowed_mask must have shape"):
        r.search(q, 3, exclude=ex, allowed_mask=np.ones(n, bool))


def test_columns_select_and_from_rows():
    from dpr.engine.columns import Columns

    rng = np.random.default_rng(2)
    cols = _cols(rng, 50, 9)
    rows = list(cols)
    back = Columns.from_rows(rows)
    np.testing.assert_array_equal(back.flat, cols.flat)
    np.testing.assert_array_equal(back.offsets, cols.offsets)
    sub = cols.select([7, 2, 2])
    for j, i in enumerate([7, 2, 2]):
        np.testing.assert_array_equal(sub.row(j).seq, rows[i].seq)
        assert sub.row(j)[1:] == rows[i][1:]


def test_request_queue_hands_out_the_columns_of_its_rows(monkeypatch):
    """Rows appended one at a time leave as the columns ``Columns.from_rows`` makes of them, in order,
    across batches of every size and across compactions."""
    from concurrent.futures import Future

    from dpr.engine import request_queue
    from dpr.engine.columns import Columns, Row

    monkeypatch.setattr(request_queue, "_COMPACT_AT", 5)
    rng = np.random.default_rng(3)
    q = request_queue.RequestQueue()
    rows, futs = [], []
    taken = []
    for step in range(60):
        for _ in range(int(rng.integers(0, 6))):
            r = Row(rng.integers(1, 100, int(rng.integers(1, 12))), str(rng.integers(3)) if rng.random() < .5 else None,
                    None, int(rng.integers(1, 9)), bool(rng.random() < .5), ("x",) if rng.random() < .2 else None)
            f = Future()
            q.append(r, f, float(step))
            rows.append(r)
            futs.append(f)
        if len(q) and rng.random() < 0.5:
            taken.append(q.take(int(rng.integers(1, len(q) + 1))))
    if len(q):
        taken.append(q.take(len(q)))
    assert len(q) == 0
    at = 0
    for cols, fs in taken:
        want = Columns.from_rows(rows[at:at + len(fs)])
        assert fs == futs[at:at + len(fs)]
        for name in ("flat", "offsets", "ks", "exclude_history"):
            np.testing.assert_array_equal(getattr(cols, name), getattr(want, name), err_msg=name)
        assert cols.prompts == want.prompts and cols.filter_keys == want.filter_keys
        at += len(fs)
    assert at == len(rows)


def test_batcher_rows_equal_recommend_with_per_row_options(engine):
    """Requests of different k, exclude_history and filters through the batcher's columns give what
    ``recommend`` gives each of them."""
    from dpr.engine import DynamicBatcher

    rng = np.random.default_rng(5)
    ids, tags = engine.item_ids, engine.tag_names
    reqs = []
    for i in range(24):
        h = [ids[j] for j in rng.choice(engine.num_items, int(rng.integers(1, 15)), replace=False)]
        reqs.append({"history": h, "k": int(rng.integers(1, 12)), "exclude_history": bool(i % 3),
                     "prompt": "more comedy" if i % 2 else None,
                     "hard_filter": {"exclude_tags": [tags[i % len(tags)]]} if i % 4 == 0 else None})
    with DynamicBatcher(engine, max_batch_size=16, max_delay_ms=50) as b:
        futs = [b.submit(r) for r in reqs]
        got = [f.result(timeout=60) for f in futs]
    for r, g in zip(reqs, got):
        want = engine.recommend([r["history"]], [r["prompt"]], None, k=r["k"], exclude_history=r["exclude_history"],
                                hard_filter=[r["hard_filter"]])[0]
        assert g.item_ids == want.item_ids and g.k == r["k"] and g.count == want.count
        np.testing.assert_allclose(g.scores, want.scores, rtol=1e-5, atol=1e-5)


def test_recommendations_lists_are_built_on_first_access(engine):
    """``recommend`` returns lists built from the batch's arrays on first access, each on its own, equal to
    what the ResultBatch gives; pickling and copying build them all; equality and indexing work as for a
    Recommendations made by hand."""
    import copy
    import pickle

    from dpr.engine import RequestBatch
    from dpr.engine.results import Recommendations

    ids = engine.item_ids
    h = [ids[:5], ids[10:12], ids[30:31]]
    recs = engine.recommend(h, ["more comedy", None, None], k=4, hard_filter=[None, {"exclude_items": ids[3:]}, None])
    assert "item_ids" not in recs.__dict__ and "tags" not in recs.__dict__
    assert len(recs) == 3 and recs.counts[1] < 4
    res = engine.recommend_batch(RequestBatch.from_histories(h, ["more comedy", None, None], k=4,
                                                             hard_filter=[None, {"exclude_items": ids[3:]}, None]))
    assert recs.item_ids == res.ids and "tags" not in recs.__dict__
    assert recs.titles == res.titles and recs.tags == res.tags
    assert all(type(s) is float for row in recs.scores for s in row)
    back = pickle.loads(pickle.dumps(recs))
    assert type(back) is Recommendations and back == recs and "_lazy" not in back.__dict__
    assert copy.deepcopy(recs) == recs
    made = Recommendations(recs.item_ids, recs.scores, recs.titles, recs.tags, recs.ks, recs.counts, recs.short_reasons)
    assert made == recs and made[1].to_dict() == recs[1].to_dict()
    with pytest.raises(AttributeError):
        recs.no_such_field
