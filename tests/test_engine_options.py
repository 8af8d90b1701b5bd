"""Options are type-checked, never coerced (issue 16): every option of ``recommend``, ``recommend_batch`` /
``RequestBatch``, ``validate_request`` and the batcher refuses a wrong type with an error naming the field
(and the row, for per-row columns), and the engine keeps serving. Per-row ``k`` and ``exclude_history``
columns give what the rows give one by one."""

from __future__ import annotations

import re

import numpy as np
import pytest

from dpr.errors import InputError


def _hist(engine, b=4, seed=0):
    rng = np.random.default_rng(seed)
    return [[engine.item_ids[j] for j in rng.choice(engine.num_items, size=int(rng.integers(1, 9)), replace=False)]
            for _ in range(b)]


BAD_EXCLUDE = [("yes", "str 'yes'"), (2, "int 2"), (None, "None"), (1.0, "float 1.0"), (np.int64(1), "int64 1")]


@pytest.mark.parametrize("bad,got", BAD_EXCLUDE, ids=["str", "int", "None", "float", "np.int64"])
def test_exclude_history_must_be_a_bool_everywhere(engine, bad, got):
    from dpr.engine import DynamicBatcher, RequestBatch

    h = _hist(engine)
    msg = re.escape(f"exclude_history must be a bool (True or False)") + ".*" + re.escape(got)
    with pytest.raises(InputError, match=msg):
        engine.recommend(h, k=3, exclude_history=bad)
    with pytest.raises(InputError, match=msg):
        engine.recommend_batch(RequestBatch.from_histories(h, k=3, exclude_history=bad))
    # in a per-row column: the row is named
    col = [True, False, bad, True]
    with pytest.raises(InputError, match=r"request 2: " + msg):
        engine.recommend(h, k=3, exclude_history=col)
    with pytest.raises(InputError, match=r"row 2: " + msg):
        engine.recommend_batch(RequestBatch.from_histories(h, k=3, exclude_history=col))
    with pytest.raises(InputError, match=r"request 7: " + msg):
        engine.validate_request({"history": h[0], "exclude_history": bad}, "request 7")
    with DynamicBatcher(engine, max_batch_size=4, max_delay_ms=1) as b:
        with pytest.raises(InputError, match=msg):
            b.submit({"history": h[0], "k": 3, "exclude_history": bad}).result(timeout=30)
        assert len(b.submit({"history": h[0], "k": 3}).result(timeout=30)) == 3      # still serving
    assert engine.recommend(h, k=3).counts == [3] * 4


def test_exclude_history_columns_numpy_and_lengths(engine):
    from dpr.engine import RequestBatch

    h = _hist(engine)
    with pytest.raises(InputError, match=r"request 0: exclude_history must be a bool .*int64 1"):
        engine.recommend(h, k=3, exclude_history=np.array([1, 0, 1, 0]))
    with pytest.raises(InputError, match=r"exclude_history has 3 entries but the batch has 4 rows"):
        engine.recommend_batch(RequestBatch.from_histories(h, k=3, exclude_history=[True] * 3))
    a = engine.recommend(h, k=3, exclude_history=np.array([True, False, True, False]))
    b = engine.recommend(h, k=3, exclude_history=[True, False, True, False])
    assert a.item_ids == b.item_ids


@pytest.mark.parametrize("bad", [True, 2.0, "5", None, 0, -1], ids=["bool", "float", "str", "None", "zero", "neg"])
def test_k_must_be_a_positive_integer(engine, bad):
    from dpr.engine import RequestBatch

    h = _hist(engine)
    with pytest.raises(InputError, match=r"k must be"):
        engine.recommend(h, k=bad)
    with pytest.raises(InputError, match=r"k must be"):
        engine.recommend_batch(RequestBatch.from_histories(h, k=bad))
    with pytest.raises(InputError, match=r"request 1: k must be"):
        engine.recommend(h, k=[3, bad, 3, 3])
    with pytest.raises(InputError, match=r"row 1: k must be"):
        engine.recommend_batch(RequestBatch.from_histories(h, k=[3, bad, 3, 3]))
    with pytest.raises(InputError, match=r"request: k must be"):
        engine.validate_request({"history": h[0], "k": bad})


def test_k_column_out_of_range_names_the_row(engine):
    from dpr.engine import RequestBatch

    h = _hist(engine)
    with pytest.raises(InputError, match=rf"row 3: k={engine.num_items + 1} is larger than the catalogue"):
        engine.recommend_batch(RequestBatch.from_histories(h, k=np.array([1, 2, 3, engine.num_items + 1])))
    with pytest.raises(InputError, match=r"k has 2 entries but the batch has 4 rows"):
        engine.recommend(h, k=[1, 2])


def test_per_row_k_and_exclude_history_equal_the_rows_one_by_one(engine):
    """A batch with a k column and an exclude_history column: each row gets what it gets alone (both entry
    points); the ResultBatch pads rows asking for fewer than the largest k and records ``ks``."""
    from dpr.engine import RequestBatch

    h = _hist(engine, 6, seed=3)
    ks, ex = [1, 5, 3, 5, 2, 4], [True, False, True, True, False, False]
    p = ["more comedy", None, "something light and funny", None, None, "more comedy"]
    recs = engine.recommend(h, p, None, k=ks, exclude_history=ex)
    res = engine.recommend_batch(RequestBatch.from_histories(h, p, None, k=np.array(ks), exclude_history=np.array(ex)))
    assert recs.ks == ks and res.ks.tolist() == ks and res.k == 5 and res.indices.shape == (6, 5)
    for i in range(6):
        one = engine.recommend([h[i]], [p[i]], None, k=ks[i], exclude_history=ex[i])
        assert recs.item_ids[i] == one.item_ids[0] == res.ids[i]
        np.testing.assert_allclose(recs.scores[i], one.scores[0], rtol=1e-5, atol=1e-6)
        assert res.counts[i] == ks[i] and (res.indices[i, ks[i]:] == 0).all()
        assert np.isneginf(res.scores[i, ks[i]:]).all()
    assert res.short_rows == [] and recs.short_rows == []


def test_prompt_filter_form_offsets_and_timings_types(engine):
    from dpr.engine import RequestBatch

    h = _hist(engine)
    with pytest.raises(InputError, match=r"request 2: prompt must be a string or None, got int"):
        engine.recommend(h, ["a", None, 5, None], k=3)
    with pytest.raises(InputError, match=r"row 1: negative prompt must be a string or None, got float"):
        engine.recommend_batch(RequestBatch.from_histories(h, None, [None, 1.5, None, None], k=3))
    with pytest.raises(InputError, match=r"hard_filter: include_tags must be a string or a list of strings, got int 5"):
        engine.recommend(h, k=3, hard_filter={"include_tags": 5})
    with pytest.raises(InputError, match=r"row 1: hard_filter: exclude_tags: tags are strings \(got int 3\)"):
        engine.recommend_batch(RequestBatch.from_histories(h, k=3, hard_filter=[None, {"exclude_tags": [3]}, None, None]))
    with pytest.raises(InputError, match=r"request 0: hard_filter must be None or a dict"):
        engine.recommend(h, k=3, hard_filter=["x", None, None, None])
    with pytest.raises(InputError, match=r"RequestBatch.form must be one of"):
        engine.recommend_batch(RequestBatch(["i1"], [0, 1], form=5))
    with pytest.raises(InputError, match=r"offsets must be integers"):
        engine.recommend_batch(RequestBatch.from_ids(["i1"], np.array([0.0, 1.0])))
    with pytest.raises(InputError, match=r"offsets must be integers"):
        engine.recommend_batch(RequestBatch.from_ids(["i1"], np.array([False, True])))
    with pytest.raises(InputError, match=r"timings must be None or a dict"):
        engine.recommend(h, k=3, timings=[])
    with pytest.raises(InputError, match=r"timings must be None or a dict"):
        engine.recommend_batch(RequestBatch.from_histories(h, k=3), timings="x")
    t: dict = {}
    engine.recommend(h, k=3, timings=t)
    assert {"user_encoder", "retrieval", "host"} <= set(t) and all(v >= 0 for v in t.values())


@pytest.mark.parametrize("kw,match", [({"max_batch_size": "8"}, "max_batch_size must be an integer"),
                                      ({"max_batch_size": True}, "max_batch_size must be an integer"),
                                      ({"max_queue": 2.5}, "max_queue must be an integer"),
                                      ({"max_delay_ms": "5"}, "max_delay_ms must be a finite number"),
                                      ({"max_delay_ms": float("nan")}, "max_delay_ms must be a finite number"),
                                      ({"max_batch_size": 0}, "max_batch_size must be >= 1")])
def test_batcher_options_are_type_checked(engine, kw, match):
    from dpr.engine import DynamicBatcher

    with pytest.raises(InputError, match=match):
        DynamicBatcher(engine, **kw)
