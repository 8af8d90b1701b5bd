"""Generated valid requests (hypothesis): the engine's answer must be the exact one.

Batches of 1-4 requests with histories of every length (one item to thousands, repeated ids), prompts of any
valid text (NUL bytes, emoji, right-to-left scripts, UTF-8 bytes), one k or one per row (1 to the whole
catalogue, so rows run short), exclude_history and hard filters shared or per row. Three oracles:

* the torch reference (backend and retriever ``torch``): the same ranking, scores within 1e-4 (ties aside);
* a brute-force numpy top-k over the item table, from the engine's own user vectors, with the history
  exclusion and the hard filter recomputed here from the catalogue: the same ranking and the same count;
* ``recommend_batch`` on the same requests as columns: identical to ``recommend``.

``DPR_FUZZ=long`` (``make fuzz``) multiplies the example count and draws new examples on every run.
"""

from __future__ import annotations

import os
from datetime import timedelta

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpr.bench.soak import oracle_topk, same_ranking

LONG = os.environ.get("DPR_FUZZ") == "long"
SCALE = int(os.environ.get("DPR_FUZZ_SCALE", "25")) if LONG else 1
N_VALID = 80
REF_ATOL = 1e-4        # ONNX Runtime against torch: float32 graphs of different kernels
ORACLE_ATOL = 1e-4     # the retriever's float32 scores against float64 numpy


def _valid_text(s: str) -> bool:
    return bool(s.strip())


PROMPTS = st.one_of(
    st.sampled_from(["more comedy", "no horror please", "something light and funny", "a\x00b", "\x00",
                     "🙂🙂 funny", "كوميديا", "ＣＯＭＥＤＹ", "comedy " * 200]),
    st.text(min_size=1, max_size=60).filter(_valid_text),
    st.text(min_size=1, max_size=20).filter(_valid_text).map(str.encode))      # UTF-8 bytes are prompts too


def valid_calls(engine):
    ids, tags, n = engine.item_ids, engine.tag_names, engine.num_items

    @st.composite
    def history(draw):
        if draw(st.integers(0, 9)) == 0:                        # a huge history: thousands of ids, repeats
            rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
            return [ids[int(j)] for j in rng.integers(0, n, draw(st.integers(n // 2, 8 * n)))]
        return draw(st.lists(st.sampled_from(ids), min_size=1, max_size=3 * engine.max_len))

    @st.composite
    def hard_filter(draw):
        f = {}
        if draw(st.booleans()):
            f["include_tags"] = draw(st.lists(st.sampled_from(tags), min_size=1, max_size=3))
        if draw(st.booleans()):
            f["exclude_tags"] = draw(st.lists(st.sampled_from(tags), min_size=1, max_size=2))
        if draw(st.booleans()):
            f["exclude_items"] = draw(st.lists(st.sampled_from(ids), max_size=40))
        return f or None

    @st.composite
    def calls(draw):
        b = draw(st.integers(1, 4))
        kw = {"histories": [draw(history()) for _ in range(b)]}
        kw["prompts"] = draw(st.none() | st.lists(st.none() | PROMPTS, min_size=b, max_size=b))
        kw["negative_prompts"] = draw(st.none() | st.lists(st.none() | PROMPTS, min_size=b, max_size=b))
        one_k = st.one_of(st.integers(1, 12), st.integers(1, n))
        kw["k"] = draw(one_k | st.lists(one_k, min_size=b, max_size=b))
        kw["exclude_history"] = draw(st.booleans() | st.lists(st.booleans(), min_size=b, max_size=b))
        kw["hard_filter"] = draw(st.none() | hard_filter() | st.lists(hard_filter(), min_size=b, max_size=b))
        return kw

    return calls()


def _per_row(x, b):
    return list(x) if isinstance(x, list) else [x] * b


def _allowed(engine, f) -> np.ndarray:
    """(N + 1,) bool: what a hard filter allows, computed here from the catalogue (not the engine's mask)."""
    n = engine.num_items
    ok = np.ones(n + 1, bool)
    ok[0] = False
    if f:
        for i, item_tags in enumerate(engine.item_tags, start=1):
            t = set(item_tags)
            if f.get("include_tags") and not t & set(f["include_tags"]):
                ok[i] = False
            if t & set(f.get("exclude_tags") or ()):
                ok[i] = False
        pos = {a: i + 1 for i, a in enumerate(engine.item_ids)}
        for a in f.get("exclude_items") or ():
            ok[pos[a]] = False
    return ok


def test_generated_valid_requests_match_reference_and_oracle(engine, reference):
    from dpr.engine import RequestBatch

    table = engine.export.item_embeddings()
    pos = {a: i + 1 for i, a in enumerate(engine.item_ids)}
    shorts = []

    @settings(max_examples=N_VALID * SCALE, derandomize=not LONG, database=None, deadline=timedelta(seconds=20),
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
              print_blob=True)
    @given(kw=valid_calls(engine))
    def run(kw):
        b = len(kw["histories"])
        got = engine.recommend(**kw)
        ref = reference.recommend(**kw)
        ks = _per_row(kw["k"], b)
        assert got.counts == ref.counts and got.ks == ks
        for i in range(b):
            assert same_ranking(got.item_ids[i], got.scores[i], ref.item_ids[i], ref.scores[i], REF_ATOL), \
                (i, got[i], ref[i])
        # the oracle, from the engine's own user vectors
        seq, p_pos, p_neg, presence = engine.user_encoder_inputs(kw["histories"], kw["prompts"], kw["negative_prompts"])
        users = engine.encode_users(seq, p_pos, p_neg, presence)
        excl, flts = _per_row(kw["exclude_history"], b), _per_row(kw["hard_filter"], b)
        for i in range(b):
            hist = [pos[a] for a in kw["histories"][i]] if excl[i] else []
            o_idx, o_sc = oracle_topk(table, users[i], ks[i], excluded=hist, allowed=_allowed(engine, flts[i]))
            o_ids = [engine.item_ids[j - 1] for j in o_idx]
            assert got.counts[i] == len(o_ids), (i, got.counts[i], len(o_ids))
            assert same_ranking(got.item_ids[i], got.scores[i], o_ids, o_sc, ORACLE_ATOL), (i, got[i], o_ids)
            assert (got.short_reasons[i] is None) == (len(o_ids) == ks[i])
            if len(o_ids) < ks[i]:
                shorts.append(i)
        # the columnar API: the same requests, the same answers
        res = engine.recommend_batch(RequestBatch.from_histories(
            kw["histories"], kw["prompts"], kw["negative_prompts"], kw["k"], kw["exclude_history"], kw["hard_filter"]))
        assert res.ids == got.item_ids
        assert [res.scores[i, :c].tolist() for i, c in enumerate(res.counts.tolist())] == \
            [np.asarray(s, np.float32).tolist() for s in got.scores]

    run()
    assert shorts, "no generated request ran short of eligible items: the strategy lost its edge cases"
