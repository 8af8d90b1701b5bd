"""The milvus retriever against Milvus Lite (the embedded Milvus from PyPI), never a mock: its FLAT + inner
product answers must be the exact retrievers' (``torch``, and ``fused`` when built), ties aside, with tags as
filter expressions, the hard filter's include / exclude and each row's history excluded exactly."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pymilvus", reason="pymilvus is not installed (pip install -e '.[scale]')")
pytest.importorskip("milvus_lite", reason="milvus-lite is not installed (pip install -e '.[scale]')")

from dpr.engine.retrieval import available_retrievers, get_retriever  # noqa: E402
from dpr.engine.retrieval.base import Exclusions  # noqa: E402
from dpr.errors import InputError  # noqa: E402

N, D, T = 3000, 12, 5


@pytest.fixture(scope="module")
def table_and_tags():
    """A table shaped like the tag channel's: d random columns, then T 0/1 tag columns."""
    rng = np.random.default_rng(5)
    tags = rng.random((N + 1, T)) < 0.3
    tags[0] = False
    tags[1:200] = False                      # some items carry no tag at all
    emb = rng.standard_normal((N + 1, D)).astype(np.float32)
    table = np.hstack([emb, tags.astype(np.float32)])
    table[0] = 0
    return table, tags


@pytest.fixture(scope="module")
def milvus(table_and_tags):
    table, _ = table_and_tags
    r = get_retriever("milvus", table, tags="table", tag_columns=T)
    yield r
    r.close()


@pytest.fixture(scope="module")
def exact_refs(table_and_tags):
    table, _ = table_and_tags
    names = ["torch"] + (["fused"] if "fused" in available_retrievers() else [])
    refs = {n: get_retriever(n, table) for n in names}
    yield refs
    for r in refs.values():
        r.close()


def _same(got, want, atol=1e-4):
    """Equal ids and scores, ties aside: scores agree to float32 rounding and, where the ids differ, the
    scores at those places are tied with a neighbour (the same score within atol)."""
    gi, gs = got
    wi, ws = want
    assert gi.shape == wi.shape
    assert np.array_equal(np.isneginf(gs), np.isneginf(ws))
    fin = np.isfinite(ws)
    assert np.allclose(gs[fin], ws[fin], atol=atol)
    for r, c in zip(*np.nonzero(gi != wi)):
        row = ws[r]
        assert np.isfinite(row[c]) and np.sum(np.abs(row - row[c]) <= atol) >= 2, (r, c, gi[r], wi[r])
    for r in range(gi.shape[0]):              # the same set when no tie sits at the cut
        if ws[r, -1] != -np.inf and not np.any(np.abs(ws[r, :-1] - ws[r, -1]) <= atol):
            assert set(gi[r]) == set(wi[r])


def _queries(b, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, D + T)).astype(np.float32)
    q[:, D:] *= 3                               # the tag weights a prompt sets
    return q


def _histories(b, seed, max_len=60):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, N + 1, size=rng.integers(0, max_len)) for _ in range(b)]


def _tag_mask(tags, include=(), exclude=(), items=()):
    """The engine's hard-filter mask (dpr.engine.catalogue.Catalogue.mask_for)."""
    m = np.ones(N + 1, bool)
    m[0] = False
    if include:
        m &= tags[:, list(include)].any(axis=1)
    if exclude:
        m &= ~tags[:, list(exclude)].any(axis=1)
    m[list(items)] = False
    return m


def test_registered_and_available():
    assert "milvus" in available_retrievers()


def test_unfiltered_and_history_exclusion_match_exact(milvus, exact_refs):
    q = _queries(24, 1)
    hist = _histories(24, 2)
    for name, ref in exact_refs.items():
        for k in (1, 10, 57):
            _same(milvus.search(q, k), ref.search(q, k))
            _same(milvus.search(q, k, exclude=hist), ref.search(q, k, exclude=hist))
    # the engine's own form of the exclusion (all rows' lists in one array)
    offsets = np.concatenate([[0], np.cumsum([len(h) for h in hist])])
    ex = Exclusions(offsets, np.concatenate(hist).astype(np.int64))
    _same(milvus.search(q, 10, exclude=ex), exact_refs["torch"].search(q, 10, exclude=hist))
    idx, _ = milvus.search(q, 10, exclude=hist)
    for h, row in zip(hist, idx):
        assert not set(h.tolist()) & set(row.tolist())


@pytest.mark.parametrize("flt", [
    dict(include=(0,)),
    dict(exclude=(1, 3)),
    dict(include=(0, 2), exclude=(4,)),
    dict(include=(2,), items=(5, 17, 300)),
    dict(items=tuple(range(1, 40))),
])
def test_hard_filters_as_tag_expressions_match_exact(milvus, exact_refs, table_and_tags, flt):
    _, tags = table_and_tags
    mask = _tag_mask(tags, **flt)
    expr = milvus.mask_expression(mask)
    if flt.get("include") or flt.get("exclude"):
        assert "array_contains_any(tags" in expr        # the tag clause, not a list of every allowed id
        assert expr.count(",") < 4096
    q = _queries(16, 3)
    hist = _histories(16, 4)
    for ref in exact_refs.values():
        want = ref.search(q, 10, exclude=hist, allowed_mask=mask)
        got = milvus.search(q, 10, exclude=hist, allowed_mask=mask)
        _same(got, want)
        assert mask[got[0][got[0] > 0]].all()


def test_per_row_masks_and_a_filter_leaving_few_items(milvus, exact_refs, table_and_tags):
    _, tags = table_and_tags
    masks = np.stack([_tag_mask(tags, include=(i % T,)) if i % 3 else np.r_[False, np.ones(N, bool)]
                      for i in range(12)])
    few = np.zeros(N + 1, bool)
    few[[7, 9, 11]] = True
    masks[5] = few
    q = _queries(12, 5)
    hist = _histories(12, 6)
    hist[5] = np.array([9])
    want = exact_refs["torch"].search(q, 10, exclude=hist, allowed_mask=masks)
    got = milvus.search(q, 10, exclude=hist, allowed_mask=masks)
    _same(got, want)
    assert set(got[0][5][:2]) == {7, 11} and (got[0][5][2:] == -1).all()


def test_long_histories_go_into_the_expression(table_and_tags, exact_refs):
    """A row whose k + history passes max_topk (16384 in Milvus; 30 here) is searched alone with its
    history as `id not in [...]`: still exact."""
    table, _ = table_and_tags
    r = get_retriever("milvus", table, max_topk=30)
    try:
        q = _queries(6, 7)
        hist = _histories(6, 8, max_len=200)
        _same(r.search(q, 10, exclude=hist), exact_refs["torch"].search(q, 10, exclude=hist))
    finally:
        r.close()


def test_reuse_a_collection_on_a_file_uri(table_and_tags, exact_refs, tmp_path):
    """Two retrievers on one Milvus Lite file (as replicas share one cluster): the second finds the
    collection filled and uploads nothing; both answer as the exact retriever does."""
    table, _ = table_and_tags
    uri = str(tmp_path / "items.db")
    a = get_retriever("milvus", table, uri=uri, collection="shared_items")
    q = _queries(8, 9)
    want = exact_refs["torch"].search(q, 10)
    _same(a.search(q, 10), want)
    # a marker on the collection: it survives only as long as the collection is not dropped and re-created
    a._client.alter_collection_properties("shared_items", properties={"test.marker": "a"})
    a.close()
    b = get_retriever("milvus", table, uri=uri, collection="shared_items", reuse=True)
    try:
        _same(b.search(q, 10), want)
        assert b._client.describe_collection("shared_items")["properties"].get("test.marker") == "a"  # not re-made
        assert b.table is None                                # the table lives in Milvus only
    finally:
        b.close()
    # another table of the same size under that name is never served from the old collection
    other = table.copy()
    other[1:, :D] *= -1
    c = get_retriever("milvus", other, uri=uri, collection="shared_items", reuse=True)
    try:
        _same(c.search(q, 10), get_retriever("torch", other).search(q, 10))
        assert "test.marker" not in c._client.describe_collection("shared_items")["properties"]   # re-uploaded
    finally:
        c.close()


def test_approximate_index_recall(table_and_tags, exact_refs):
    """HNSW is approximate; at this size with ef >= the catalogue it must find nearly all of the top 10."""
    table, _ = table_and_tags
    r = get_retriever("milvus", table, index="HNSW", search_params={"ef": 512})
    try:
        q = _queries(32, 10)
        got, _ = r.search(q, 10)
        want, _ = exact_refs["torch"].search(q, 10)
        recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want)])
        assert recall >= 0.9
    finally:
        r.close()


def test_bad_options_are_clear_errors(table_and_tags):
    table, _ = table_and_tags
    with pytest.raises(InputError, match="index must be one of"):
        get_retriever("milvus", table, index="PQ9")
    with pytest.raises(InputError, match="device='cpu'"):
        get_retriever("milvus", table, device="cuda")
    with pytest.raises(InputError, match="tag_columns"):
        get_retriever("milvus", table, tags="table")
    with pytest.raises(InputError, match="not 0/1 tags"):
        get_retriever("milvus", table, tags="table", tag_columns=T + 1)
    with pytest.raises(InputError, match="collection"):
        get_retriever("milvus", table, collection="drop table;")


def test_engine_with_milvus_equals_engine_with_torch(export_dir):
    """The whole engine: Engine.load(retriever='milvus') gives the torch retriever's recommendations, with the
    history excluded and hard filters (tags from the export's tag channel or its catalogue)."""
    from dpr.engine import Engine

    ref = Engine.load(export_dir, backend="onnxruntime", retriever="torch")
    tags = ref.catalogue.tag_matrix
    eng = Engine.load(export_dir, backend="onnxruntime", retriever="milvus", retriever_options={"tags": tags})
    try:
        rng = np.random.default_rng(12)
        ids = ref.item_ids
        hist = [[ids[j] for j in rng.integers(0, len(ids), size=rng.integers(1, 12))] for _ in range(20)]
        prompts = [None, "more comedy", "no horror please", None] * 5
        t0, t1 = ref.tag_names[0], ref.tag_names[1]
        filters = [None, {"include_tags": [t0]}, {"exclude_tags": [t1], "exclude_items": ids[:5]},
                   {"include_tags": [t0, t1]}] * 5
        for kw in (dict(k=10), dict(k=10, hard_filter=filters), dict(k=7, exclude_history=False)):
            a = eng.recommend(hist, prompts, **kw)
            b = ref.recommend(hist, prompts, **kw)
            for ra, rb in zip(a, b):
                _same((np.array([[ref.catalogue.id_to_index[i] for i in ra.item_ids]]), np.array([ra.scores])),
                      (np.array([[ref.catalogue.id_to_index[i] for i in rb.item_ids]]), np.array([rb.scores])))
    finally:
        eng.close()
        ref.close()
