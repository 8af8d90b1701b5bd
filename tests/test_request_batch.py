"""The columnar batch API (RequestBatch -> Engine.recommend_batch -> ResultBatch): same results as
recommend() and as the torch reference, whole-batch validation naming the row, zero-copy result arrays."""

from __future__ import annotations

import numpy as np
import pytest

from dpr.errors import InputError


def _requests(engine, b: int, seed: int, filters: str = "none"):
    """Random histories of mixed lengths (some past max_len), mixed prompts/None, and a hard filter:
    "none", "shared" (one dict) or "per_row" (dicts and None)."""
    rng = np.random.default_rng(seed)
    tags = engine.tag_names
    pos = [f"show me more {t} films" for t in tags] + ["something light and funny"]
    neg = [f"no {t} please" for t in tags] + ["nothing too long"]
    hist, p, n = [], [], []
    for _ in range(b):
        ln = int(rng.integers(1, 2 * engine.max_len + 1))
        hist.append([engine.item_ids[j] for j in rng.choice(engine.num_items, size=ln, replace=False)])
        r = rng.integers(0, 4)
        p.append(pos[rng.integers(len(pos))] if r in (1, 3) else None)
        n.append(neg[rng.integers(len(neg))] if r in (2, 3) else None)
    if filters == "shared":
        hf = {"exclude_tags": [tags[0]], "exclude_items": [engine.item_ids[5]]}
    elif filters == "per_row":
        choices = [None, {"include_tags": [tags[1], tags[2]]}, {"exclude_tags": [tags[3]]},
                   {"exclude_items": [engine.item_ids[0], engine.item_ids[1]]}]
        hf = [choices[int(rng.integers(len(choices)))] for _ in range(b)]
    else:
        hf = None
    return hist, p, n, hf


def _columns(engine, hist, form):
    offsets = np.zeros(len(hist) + 1, np.int64)
    np.cumsum([len(h) for h in hist], out=offsets[1:])
    ids = np.array([x for h in hist for x in h])
    if form == "ids":
        return ids, offsets
    index = {a: i + 1 for i, a in enumerate(engine.item_ids)}
    return np.array([index[x] for x in ids], dtype=np.int64), offsets


def _batch(engine, hist, p, n, hf, k, form, exclude_history=True):
    from dpr.engine import RequestBatch

    flat, offsets = _columns(engine, hist, form)
    make = RequestBatch.from_ids if form == "ids" else RequestBatch.from_indices
    return make(flat, offsets, prompts=p, negative_prompts=n, k=k, exclude_history=exclude_history,
                hard_filter=hf)


@pytest.mark.parametrize("form", ["ids", "indices"])
@pytest.mark.parametrize("filters", ["none", "shared", "per_row"])
def test_recommend_batch_equals_recommend(engine, form, filters):
    for seed, b in ((1, 7), (2, 40)):
        hist, p, n, hf = _requests(engine, b, seed=seed * 10 + len(filters), filters=filters)
        want = engine.recommend(hist, p, n, k=10, hard_filter=hf)
        res = engine.recommend_batch(_batch(engine, hist, p, n, hf, 10, form))
        assert res.indices.shape == (b, 10) and res.indices.dtype == np.int64
        assert res.scores.shape == (b, 10) and res.scores.dtype == np.float32
        assert res.counts.dtype == np.int64 and res.counts.tolist() == want.counts
        assert res.ids == want.item_ids
        assert res.titles == want.titles
        assert res.tags == want.tags
        for i in range(b):
            c = int(res.counts[i])
            np.testing.assert_array_equal(res.scores[i, :c], np.asarray(want.scores[i], np.float32))
        assert res.short_reasons == want.short_reasons


def test_recommend_batch_without_history_exclusion(engine):
    hist, p, n, _ = _requests(engine, 9, seed=5)
    want = engine.recommend(hist, p, n, k=6, exclude_history=False)
    res = engine.recommend_batch(_batch(engine, hist, p, n, None, 6, "indices", exclude_history=False))
    assert res.ids == want.item_ids
    np.testing.assert_array_equal(res.scores, np.asarray(want.scores, np.float32))


def test_recommend_batch_agrees_with_torch_reference(engine, reference):
    hist, p, n, hf = _requests(engine, 24, seed=7, filters="per_row")
    got = engine.recommend_batch(_batch(engine, hist, p, n, hf, 10, "ids"))
    ref = reference.recommend_batch(_batch(reference, hist, p, n, hf, 10, "indices"))
    ref_lists = reference.recommend(hist, p, n, k=10, hard_filter=hf)
    assert ref.ids == ref_lists.item_ids                      # the reference's two paths agree exactly
    np.testing.assert_array_equal(got.counts, ref.counts)
    overlaps, errs = [], []
    for i in range(len(hist)):
        c = int(got.counts[i])
        gi, ri = got.indices[i, :c], ref.indices[i, :c]
        overlaps.append(len(set(gi.tolist()) & set(ri.tolist())) / max(c, 1))
        rmap = dict(zip(ri.tolist(), ref.scores[i, :c].tolist()))
        errs += [abs(s - rmap[j]) for j, s in zip(gi.tolist(), got.scores[i, :c].tolist()) if j in rmap]
    assert np.mean(overlaps) >= 0.95, overlaps
    assert max(errs) < 1e-3


def test_short_rows_are_padded_with_zero_and_minus_inf(engine):
    from dpr.engine import RequestBatch

    tags = engine.tag_names
    allowed = engine._mask_for(engine._filter_key({"include_tags": [tags[0]]}, "f"))
    few = int(allowed.sum())
    k = min(engine.num_items, few + 5)
    idx = np.array([1, 2, 3, 4], dtype=np.int64)
    batch = RequestBatch.from_indices(idx, [0, 2, 4], k=k,
                                      hard_filter=[{"include_tags": [tags[0]]}, None])
    res = engine.recommend_batch(batch)
    want = engine.recommend([[engine.item_ids[0], engine.item_ids[1]], [engine.item_ids[2], engine.item_ids[3]]],
                            k=k, hard_filter=[{"include_tags": [tags[0]]}, None])
    assert res.counts.tolist() == want.counts
    c = int(res.counts[0])
    assert c < k and res.short_rows == want.short_rows == [0]
    assert (res.indices[0, c:] == 0).all() and np.isneginf(res.scores[0, c:]).all()
    assert (res.indices[0, :c] > 0).all()
    assert res.short_reasons[0] == want.short_reasons[0]
    assert len(res.ids[0]) == c and res.ids == want.item_ids


def test_lazy_ids_are_the_catalogue_ids_of_indices(engine):
    hist, p, n, _ = _requests(engine, 5, seed=11)
    res = engine.recommend_batch(_batch(engine, hist, p, n, None, 8, "ids"))
    assert "ids" not in res.__dict__                          # not looked up until asked for
    assert res.ids == [[engine.item_ids[j - 1] for j in row] for row in res.indices.tolist()]
    assert res.titles == [[engine.titles[j - 1] for j in row] for row in res.indices.tolist()]
    assert res.tags == [[list(engine.item_tags[j - 1]) for j in row] for row in res.indices.tolist()]
    assert res.ids is res.ids                                 # computed once


def test_result_arrays_are_zero_copy(engine):
    import torch

    hist, p, n, _ = _requests(engine, 6, seed=13)
    res = engine.recommend_batch(_batch(engine, hist, p, n, None, 5, "ids"))
    t = torch.from_numpy(res.indices)
    assert t.data_ptr() == res.indices.ctypes.data
    assert np.shares_memory(t.numpy(), res.indices)
    t[0, 0] = 12345                                           # one buffer: a write shows through
    assert res.indices[0, 0] == 12345
    s = np.from_dlpack(res.scores)
    assert np.shares_memory(s, res.scores) and s.dtype == np.float32
    ts = torch.from_dlpack(res.scores)
    assert ts.data_ptr() == res.scores.ctypes.data
    c = torch.from_numpy(res.counts)
    assert c.data_ptr() == res.counts.ctypes.data and c.dtype == torch.int64
    for a in (res.indices, res.scores, res.counts):
        assert a.flags.c_contiguous and a.flags.writeable


def _ok(engine):
    from dpr.engine import RequestBatch

    return RequestBatch.from_ids(np.array(engine.item_ids[:5]), [0, 2, 5], prompts=["more action", None], k=3)


@pytest.mark.parametrize("form,flat,offsets,kw,match", [
    ("indices", [1, 2, 3, 4], [0, 3, 2, 4], {}, r"row 1: offsets are not monotonic"),
    ("indices", [1, 2, 3, 4], [0, 2, 3], {}, r"offsets\[-1\] is 3 but the flat history array has 4 entries"),
    ("indices", [1, 2, 3, 4], [1, 2, 4], {}, r"offsets\[0\] must be 0"),
    ("indices", [1, 2, 3, 4], [0], {}, r"offsets has 1 entries"),
    ("indices", [1, 2, 3, 4], [0.0, 2.0, 4.0], {}, r"offsets must be integers .*float64"),
    ("indices", [1, 2, 3, 4], [[0, 2, 4]], {}, r"offsets must be 1-D"),
    ("indices", [1, 2, 3, 4], [0, 2, 2, 4], {}, r"row 1: history is empty"),
    ("indices", [1, 2, 0, 4], [0, 2, 4], {}, r"row 1: history: catalogue index 0 at position 0 is out of range"),
    ("indices", [1, 2, 3, 401], [0, 1, 3, 4], {}, r"row 2: history: catalogue index 401 at position 0 .*1\.\.400"),
    ("indices", [1, -3, 3, 4], [0, 2, 4], {}, r"row 0: history: catalogue index -3 at position 1"),
    ("indices", [1.0, 2.0, 3.0], [0, 1, 3], {}, r"catalogue indices must be integers 1\.\.400, got dtype float64"),
    ("indices", [True, False, True], [0, 1, 3], {}, r"catalogue indices must be integers .*got dtype bool"),
    ("indices", np.array([1, 2, None], dtype=object), [0, 1, 3], {}, r"row 1: history: .*got None at position 1"),
    ("indices", np.array([1, 2, True], dtype=object), [0, 1, 3], {},
     r"row 1: history: .*got bool True at position 1"),
    ("indices", np.array(["i1", "i2"]), [0, 1, 2], {}, r"got dtype <U2 \(use RequestBatch.from_ids"),
    ("ids", ["i1", "i2", "nope", "i4"], [0, 2, 4], {}, r"row 1: history holds unknown item id 'nope' at position 0"),
    ("ids", ["i1", "i2", "i3", None], [0, 1, 4], {},
     r"row 1: history: item ids are strings \(got None at position 2\)"),
    ("ids", ["i1", "i2", "i3", 2.5], [0, 3, 4], {},
     r"row 1: history: item ids are strings \(got float 2.5 at position 0\)"),
    ("ids", ["i1", "i2", "i3", "i4"], [0, 2, 4], {"prompts": ["more comedy"]},
     r"prompts has 1 entries but the batch has 2 rows"),
    ("ids", ["i1", "i2", "i3", "i4"], [0, 2, 4], {"prompts": "more comedy"}, r"prompts must be None or a column"),
    ("ids", ["i1", "i2", "i3", "i4"], [0, 2, 4], {"prompts": [None, 7]},
     r"row 1: prompt must be a string or None, got int"),
    ("ids", ["i1", "i2", "i3", "i4"], [0, 2, 4], {"negative_prompts": ["  ", None]},
     r"row 0: negative prompt is empty"),
    ("ids", ["i1", "i2", "i3", "i4"], [0, 2, 4], {"negative_prompts": [None, None, None]},
     r"negative_prompts has 3 entries but the batch has 2 rows"),
    ("ids", ["i1", "i2", "i3", "i4"], [0, 2, 4], {"k": 0}, r"k must be >= 1"),
    ("ids", ["i1", "i2", "i3", "i4"], [0, 2, 4], {"k": 2.0}, r"k must be an integer"),
    ("ids", ["i1", "i2", "i3", "i4"], [0, 2, 4], {"k": True}, r"k must be an integer"),
    ("ids", ["i1", "i2", "i3", "i4"], [0, 2, 4], {"k": 401}, r"larger than the catalogue"),
    ("ids", ["i1", "i2", "i3", "i4"], [0, 2, 4], {"exclude_history": "yes"}, r"exclude_history must be a bool"),
    ("ids", ["i1", "i2", "i3", "i4"], [0, 2, 4], {"hard_filter": [None, {"include_tags": ["nope"]}]},
     r"row 1: hard_filter: unknown tag"),
    ("ids", ["i1", "i2", "i3", "i4"], [0, 2, 4], {"hard_filter": [None]}, r"hard_filter has 1 entries"),
    ("ids", "i1", [0, 1], {}, r"flat history array must be an array or list"),
])
def test_malformed_columns_name_the_row_and_engine_keeps_serving(engine, form, flat, offsets, kw, match):
    from dpr.engine import RequestBatch

    make = RequestBatch.from_ids if form == "ids" else RequestBatch.from_indices
    with pytest.raises(InputError, match=match):
        engine.recommend_batch(make(flat, offsets, **kw))
    res = engine.recommend_batch(_ok(engine))                 # the engine still serves a valid batch
    want = engine.recommend([engine.item_ids[:2], engine.item_ids[2:5]], prompts=["more action", None], k=3)
    assert res.ids == want.item_ids and res.counts.tolist() == [3, 3]


def test_not_a_request_batch(engine):
    from dpr.engine import RequestBatch

    with pytest.raises(InputError, match="recommend_batch takes a RequestBatch, got list"):
        engine.recommend_batch([["i1"]])
    with pytest.raises(InputError, match="form must be one of"):
        engine.recommend_batch(RequestBatch(["i1"], [0, 1], form="names"))


def test_integer_ids_and_ignored_unknowns_follow_recommend(export_dir, engine):
    from dpr.engine import Engine, RequestBatch

    # an integer whose decimal form is an id is that id, as in recommend(): this export's ids are i1..,
    # so a numeric id is unknown and named with its row
    with pytest.raises(InputError, match=r"row 0: history: item ids are strings \(got int 7 at position 1\)"):
        engine.recommend_batch(RequestBatch.from_ids([engine.item_ids[0], 7], [0, 2]))
    lenient = Engine.load(export_dir, backend="onnxruntime", retriever="onnxruntime", unknown_items="ignore")
    try:
        hist = [["i1", "zzz", "i2"], ["i3", "i4"]]
        want = lenient.recommend(hist, k=5)
        res = lenient.recommend_batch(RequestBatch.from_histories(hist, k=5))
        assert res.ids == want.item_ids
        with pytest.raises(InputError, match=r"row 1: history holds no known item id"):
            lenient.recommend_batch(RequestBatch.from_ids(["i1", "zzz"], [0, 1, 2]))
    finally:
        lenient.close()


def test_timings_are_filled(engine):
    t: dict = {}
    engine.recommend_batch(_ok(engine), timings=t)
    assert {"user_encoder", "retrieval"} <= set(t)
