"""Generated bad input (hypothesis) against Engine.recommend, Engine.recommend_batch and the DynamicBatcher.

Each generated call breaks exactly one thing of an otherwise valid request or batch (a wrong type, shape or
length, an unknown or non-string id, an empty history, a prompt that is empty, too long, not UTF-8 or holds a
lone surrogate, an impossible k, a bad hard filter, ...). Each must raise the engine's InputError, never
another exception type, with a message that names the field (and the row when the batch has several), and
the engine must give the same answer to a valid request right after. An engine bug found this way (a history
given as a set) is asserted at the end of this file; it was an xfail until engine/validation.py refused it.

CI: derandomized (the same examples every run), at least 1,000 bad requests over the three tests, each test
bounded by its example count, a per-example deadline and a wall-clock guard. ``DPR_FUZZ=long`` (``make
fuzz``) multiplies the counts (``DPR_FUZZ_SCALE``, default 25) and draws new random examples on every run.
"""

from __future__ import annotations

import re
import signal
from collections import Counter
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dpr.errors import InputError




import dpr_tests_fuzz_strategies as fz  # noqa: E402 - tests/fuzz_strategies.py (conftest.py)      # values shared with the HTTP fuzz (tests/test_fuzz_http.py)
LONG, SCALE, fuzz_settings = fz.LONG, fz.SCALE, fz.fuzz_settings
ANY_CODEPOINTS, WEIRD_TEXT, BLANK, LONE_SURROGATE, BAD_UTF8 = (fz.ANY_CODEPOINTS, fz.WEIRD_TEXT, fz.BLANK,
                                                               fz.LONE_SURROGATE, fz.BAD_UTF8)

# generated bad requests per CI run, per test: >= 1,000 together (460 + 416 + 259 with the per-kind rounding,
# the batcher's examples holding one or more bad requests each among valid ones)
N_RECOMMEND, N_BATCH, N_BATCHER = 450, 400, 60
GUARD_S = 240 * SCALE          # wall-clock bound of one test's whole run: a hang fails, it does not stall CI


def _per_kind(total: int, kinds: list) -> int:
    """Examples per kind of damage: every kind is tried (a sampled kind can go untried), ``total`` in all."""
    return -(-total // len(kinds))


@contextmanager
def time_guard(seconds: float):
    """Interrupt the main thread after ``seconds`` (SIGALRM): a hung engine call fails the test."""
    def boom(*_):
        raise TimeoutError(f"fuzz run exceeded its {seconds} s guard (a hang?)")
    old = signal.signal(signal.SIGALRM, boom)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ---- values that are bad wherever they go --------------------------------------------------------------

NON_STRING_IDS = st.one_of(
    st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(), st.binary(max_size=6),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.sampled_from([np.int64(3), np.float32(1.5), float("nan"), float("inf"), object(), b"i1"]))
NOT_A_LIST = st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=6), st.binary(max_size=6))


def bad_k(num_items: int):
    """k values no catalogue of ``num_items`` items can serve, or that are no integer at all."""
    return st.one_of(st.integers(max_value=0), st.integers(min_value=num_items + 1, max_value=10 ** 100),
                     st.booleans(), st.floats(), st.text(max_size=3), st.none(),
                     st.sampled_from([np.float64(3), np.uint64(2 ** 64 - 1), np.int64(-1), 2 ** 63, "10", {3: 3}]))


K_MESSAGE = r"(^|\W)k( must|=)"
# exclude_history is a bool, never coerced: 1, "yes" or None (which would turn the exclusion off) are errors
BAD_BOOL = st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=4), st.binary(max_size=2),
                     st.sampled_from([np.int64(1), np.float32(0), {"a": 1}]))
NOT_A_PROMPT = st.one_of(st.booleans(), st.integers(), st.floats(), st.lists(st.text(max_size=3), max_size=2),
                         st.dictionaries(st.text(max_size=2), st.text(max_size=2), max_size=2),
                         st.sampled_from([object(), np.float32(2)]))


def bad_prompts(max_bytes: int):
    """(value, message pattern after the field name) of a prompt the engine must refuse."""
    chars = st.sampled_from(["a", "é", "字", "🙂", "a\x00"])
    too_long = st.tuples(st.integers(max_bytes + 1, 3 * max_bytes), chars).map(
        lambda t: t[1] * (t[0] // len(t[1].encode()) + 1))
    return st.one_of(NOT_A_PROMPT.map(lambda v: (v, "must be a string")),
                     BLANK.map(lambda v: (v, "is empty or whitespace")),
                     too_long.map(lambda v: (v, "is too long")),
                     BAD_UTF8.map(lambda v: (v, "is not valid UTF-8")),
                     LONE_SURROGATE.map(lambda v: (v, "cannot be encoded as UTF-8")))


def unknown_ids(engine):
    known = set(engine.item_ids)
    return WEIRD_TEXT.filter(lambda s: s not in known)


def unknown_tags(engine):
    known = set(engine.tag_names)
    return WEIRD_TEXT.filter(lambda s: str(s) not in known)


def _insert(row: list, pos: int, value) -> list:
    row = list(row)
    row.insert(pos % (len(row) + 1), value)
    return row


# ---- Engine.recommend -----------------------------------------------------------------------------------

RECOMMEND_KINDS = ["histories-type", "histories-empty", "row-type", "row-empty", "unknown-id", "non-string-id",
                   "prompts-length", "prompts-type", "prompt-value", "negative-value", "k", "k-column",
                   "exclude-history", "exclude-history-column", "filter-type", "filter-length", "filter-row",
                   "filter-key", "filter-tag", "filter-tag-type", "filter-value", "filter-item", "filter-item-type"]


def bad_recommend_calls(engine, kind: str):
    ids, tags = engine.item_ids, engine.tag_names

    @st.composite
    def calls(draw):
        b = draw(st.integers(1, 4))
        r = draw(st.integers(0, b - 1))
        hist = [draw(st.lists(st.sampled_from(ids), min_size=1, max_size=8)) for _ in range(b)]
        prompts = draw(st.none() | st.lists(st.sampled_from(["more comedy", None, "no horror"]),
                                            min_size=b, max_size=b))
        kw = dict(histories=hist, prompts=prompts, negative_prompts=None, k=draw(st.integers(1, 10)), hard_filter=None)
        at = rf"request {r}: "
        if kind == "histories-type":
            kw["histories"] = draw(NOT_A_LIST | st.sets(st.integers(), max_size=2)
                                   | st.dictionaries(st.text(max_size=2), st.lists(st.sampled_from(ids)), max_size=2))
            pat = r"histories must be a list"
        elif kind == "histories-empty":
            kw["histories"], pat = draw(st.sampled_from([[], (), np.array([], dtype=object)])), r"histories is empty"
        elif kind == "row-type":
            hist[r], pat = draw(NOT_A_LIST), at + "history must be a list of item ids"
        elif kind == "row-empty":
            hist[r], pat = draw(st.sampled_from([[], (), np.array([], dtype=str)])), at + "history is empty"
        elif kind == "unknown-id":
            hist[r] = _insert(hist[r], draw(st.integers(0, 20)), draw(unknown_ids(engine)))
            pat = at + "history holds unknown item id"
        elif kind == "non-string-id":
            hist[r] = _insert(hist[r], draw(st.integers(0, 20)), draw(NON_STRING_IDS))
            pat = at + "history: item ids are strings"
        elif kind == "prompts-length":
            n = draw(st.integers(0, b + 3).filter(lambda n: n != b))
            kw[draw(st.sampled_from(["prompts", "negative_prompts"]))] = ["fun"] * n
            pat = r"prompts has \d+ entries but there are \d+ histories"
        elif kind == "prompts-type":
            field = draw(st.sampled_from(["prompts", "negative_prompts"]))
            kw[field] = draw(st.text(max_size=5) | st.binary(max_size=5) | st.integers() | st.floats()
                             | st.sets(st.text(max_size=2), max_size=2))
            pat = rf"{field} must be a list"
        elif kind in ("prompt-value", "negative-value"):
            field, name = ("prompts", "prompt") if kind == "prompt-value" else ("negative_prompts", "negative prompt")
            value, problem = draw(bad_prompts(engine.max_prompt_bytes))
            col = [None] * b
            col[r] = value
            kw[field], pat = col, at + f"{name} .*{problem}"
        elif kind == "k":
            kw["k"], pat = draw(bad_k(engine.num_items)), K_MESSAGE
        elif kind == "k-column":                                  # one k per row
            if draw(st.booleans()):
                col = [draw(st.integers(1, 10)) for _ in range(b)]
                col[r] = draw(bad_k(engine.num_items))
                kw["k"], pat = col, at + "k"
            else:
                kw["k"], pat = [3] * draw(st.integers(0, b + 3).filter(lambda n: n != b)), r"k has \d+ entries"
        elif kind == "exclude-history":
            kw["exclude_history"], pat = draw(BAD_BOOL), r"exclude_history must be a bool"
        elif kind == "exclude-history-column":
            if draw(st.booleans()):
                col = [True] * b
                col[r] = draw(BAD_BOOL)
                kw["exclude_history"], pat = col, at + "exclude_history must be a bool"
            else:
                kw["exclude_history"] = [True] * draw(st.integers(0, b + 3).filter(lambda n: n != b))
                pat = r"exclude_history has \d+ entries"
        elif kind == "filter-type":
            kw["hard_filter"] = draw(st.integers() | st.floats() | st.text(min_size=1, max_size=4)
                                     | st.sets(st.integers(), max_size=2))
            pat = r"hard_filter must be a list"
        elif kind == "filter-length":
            kw["hard_filter"] = [None] * draw(st.integers(0, b + 3).filter(lambda n: n != b))
            pat = r"hard_filter has \d+ entries but there are \d+ histories"
        elif kind == "filter-row":
            col = [None] * b
            col[r] = draw(st.integers() | st.text(max_size=4) | st.lists(st.text(max_size=2), max_size=2))
            kw["hard_filter"] = col
            pat = (at if b > 1 else "") + "hard_filter must be None or a dict"
        else:
            if kind == "filter-key":
                f = {draw(WEIRD_TEXT.filter(lambda s: s not in ("include_tags", "exclude_tags", "exclude_items"))):
                     [tags[0]]}
                pat = "unknown key"
            elif kind == "filter-tag":
                f = {draw(st.sampled_from(["include_tags", "exclude_tags"])): [draw(unknown_tags(engine))]}
                pat = "unknown tag"
            elif kind == "filter-tag-type":
                f = {draw(st.sampled_from(["include_tags", "exclude_tags"])): [tags[0], draw(NON_STRING_IDS)]}
                pat = "tags are strings"
            elif kind == "filter-value":                          # a filter value that is no list of values
                key = draw(st.sampled_from(["include_tags", "exclude_tags", "exclude_items"]))
                f = {key: draw(st.integers() | st.floats() | st.dictionaries(st.text(max_size=2), st.integers(),
                                                                            max_size=2) | st.just(object()))}
                pat = f"{key} must be a string or a list of strings"
            elif kind == "filter-item":
                f = {"exclude_items": [ids[0], draw(unknown_ids(engine))]}
                pat = "unknown item id"
            else:
                f = {"exclude_items": [ids[1], draw(NON_STRING_IDS.filter(
                    lambda v: not isinstance(v, (int, np.integer)) or isinstance(v, bool)))]}
                pat = "exclude_items: item ids are strings"
            if draw(st.booleans()) or b == 1:
                kw["hard_filter"] = f                              # one filter for the batch: checked once
            else:
                col = [None] * b
                col[r] = f
                kw["hard_filter"], pat = col, at + "hard_filter.*" + pat
        return kind, kw, pat

    return calls()


def _same(a, b) -> bool:
    return a.item_ids == b.item_ids and a.scores == b.scores and a.counts == b.counts


def test_recommend_refuses_generated_bad_input(engine):
    probe = dict(histories=[engine.item_ids[3:9], [engine.item_ids[0]]], prompts=["more comedy", None], k=7)
    want = engine.recommend(**probe)
    seen: Counter = Counter()

    def run(kind):
        @fuzz_settings(_per_kind(N_RECOMMEND, RECOMMEND_KINDS))
        @given(call=bad_recommend_calls(engine, kind))
        def one(call):
            kind, kw, pat = call
            with pytest.raises(InputError) as info:           # any other exception type fails the test
                engine.recommend(**kw)
            assert re.search(pat, str(info.value)), (kind, pat, str(info.value))
            assert _same(engine.recommend(**probe), want)     # still serving, the same answer
            seen[kind] += 1
        one()

    with time_guard(GUARD_S):
        for kind in RECOMMEND_KINDS:
            run(kind)
    print(f"recommend: {sum(seen.values())} generated bad calls")
    assert sum(seen.values()) >= N_RECOMMEND * SCALE, seen
    assert set(seen) == set(RECOMMEND_KINDS), set(RECOMMEND_KINDS) - set(seen)


# ---- Engine.recommend_batch -------------------------------------------------------------------------------

BATCH_KINDS = ["not-batch", "form", "flat-type", "flat-2d", "offsets-type", "offsets-dtype", "offsets-2d",
               "offsets-short", "offsets-start", "offsets-order", "offsets-end", "row-empty", "index-range",
               "index-dtype", "index-object", "id-unknown", "id-type", "prompts-length", "prompts-2d",
               "prompts-type", "prompt-value", "negative-value", "k", "exclude-history", "filter-length", "filter-row"]


def bad_batches(engine, kind: str):
    from dpr.engine import RequestBatch

    ids, n_items = engine.item_ids, engine.num_items

    @st.composite
    def batches(draw):
        b = draw(st.integers(1, 4))
        r = draw(st.integers(0, b - 1))
        lens = draw(st.lists(st.integers(1, 6), min_size=b, max_size=b))
        offsets = np.zeros(b + 1, np.int64)
        np.cumsum(lens, out=offsets[1:])
        idx = draw(st.lists(st.integers(1, n_items), min_size=int(offsets[-1]), max_size=int(offsets[-1])))
        form = "indices" if kind.startswith("index") else "ids" if kind.startswith("id-") else \
            draw(st.sampled_from(["ids", "indices"]))
        flat = np.array(idx, np.int64) if form == "indices" else [ids[i - 1] for i in idx]
        if form == "ids" and draw(st.booleans()):
            flat = np.array(flat)                                  # a numpy str column works as well as a list
        kw = dict(flat=flat, offsets=offsets, form=form, prompts=None, negative_prompts=None,
                  k=draw(st.integers(1, 10)), exclude_history=True, hard_filter=None)
        p = draw(st.integers(0, int(offsets[r + 1] - offsets[r]) - 1)) + int(offsets[r])   # a position in row r
        row = rf"row {r}: "
        if kind == "not-batch":
            return kind, draw(st.none() | st.lists(st.sampled_from(ids), max_size=3)
                              | st.dictionaries(st.sampled_from(list(kw)), st.integers(), max_size=3)
                              | st.tuples(st.just(flat), st.just(offsets))), r"recommend_batch takes a RequestBatch"
        if kind == "form":
            kw["form"], pat = draw(WEIRD_TEXT.filter(lambda s: s not in ("ids", "indices"))), r"RequestBatch\.form"
        elif kind == "flat-type":
            kw["flat"], pat = draw(st.none() | st.integers() | st.floats() | st.text(max_size=4)
                                   | st.binary(max_size=4)), r"flat history array must be an array or list"
        elif kind == "flat-2d":
            kw["flat"], pat = np.asarray(flat).reshape(-1, 1), r"flat history array must be 1-D"
        elif kind == "offsets-type":
            kw["offsets"], pat = draw(NOT_A_LIST), r"offsets must be an int64 array"
        elif kind == "offsets-dtype":
            kw["offsets"] = draw(st.sampled_from([offsets.astype(np.float64), offsets.astype(str),
                                                  offsets.astype(bool), [str(o) for o in offsets]]))
            pat = r"offsets must be integers"
        elif kind == "offsets-2d":
            kw["offsets"], pat = offsets.reshape(1, -1), r"offsets must be 1-D"
        elif kind == "offsets-short":
            kw["offsets"], pat = draw(st.sampled_from([np.zeros(0, np.int64), [0], np.zeros(1, np.int64)])), \
                r"offsets has [01] entries"
        elif kind == "offsets-start":
            kw["offsets"] = offsets + draw(st.integers(-5, 5).filter(bool))
            pat = r"offsets\[0\] must be 0"
        elif kind == "offsets-order":
            if b < 2:
                kw["offsets"], pat = np.array([0, -1 - draw(st.integers(0, 9))]), r"row 0: offsets are not monotonic"
            else:
                o = offsets.copy()
                j = draw(st.integers(1, b - 1))
                o[j] = o[j + 1] + draw(st.integers(1, 5))
                kw["offsets"], pat = o, rf"row {j}: offsets are not monotonic"
        elif kind == "offsets-end":
            o = offsets.copy()
            o[-1] += draw(st.integers(1, 10 ** 6))
            kw["offsets"], pat = o, r"offsets\[-1\] is \d+ but the flat history array has"
        elif kind == "row-empty":
            o = np.insert(offsets, r + 1, offsets[r + 1])          # row r + 1 is now empty (offsets repeat)
            kw["offsets"], pat = o, rf"row {r + 1}: history is empty"
        elif kind == "index-range":
            f = np.array(flat, np.int64)
            f[p] = draw(st.integers(-2 ** 63, 0) | st.integers(n_items + 1, 2 ** 63 - 1))
            kw["flat"], pat = f, row + "history: catalogue index -?\\d+ at position \\d+ is out of range"
        elif kind == "index-dtype":
            kw["flat"] = draw(st.sampled_from([np.asarray(flat, np.float64), np.asarray(flat) > 0,
                                               np.asarray(flat).astype(str)]))
            pat = r"catalogue indices must be integers"
        elif kind == "index-object":
            f = list(np.asarray(flat).tolist())
            f[p] = draw(NON_STRING_IDS.filter(lambda v: not isinstance(v, (int, np.integer)) or isinstance(v, bool))
                        | st.text(max_size=3))
            col = np.empty(len(f), dtype=object)                   # an object column, element by element
            col[:] = [None] * len(f)
            for i, v in enumerate(f):
                col[i] = v
            kw["flat"] = col
            pat = row + "history: catalogue indices are integers"
        elif kind == "id-unknown":
            f = list(flat)
            f[p] = draw(unknown_ids(engine))
            kw["flat"], pat = f, row + "history holds unknown item id"
        elif kind == "id-type":
            f = list(flat)
            f[p] = draw(NON_STRING_IDS)
            kw["flat"], pat = f, row + "history: item ids are strings"
        elif kind == "prompts-length":
            field = draw(st.sampled_from(["prompts", "negative_prompts"]))
            kw[field], pat = ["fun"] * draw(st.integers(0, b + 3).filter(lambda n: n != b)), \
                rf"{field} has \d+ entries but the batch has \d+ rows"
        elif kind == "prompts-2d":
            kw["prompts"], pat = np.array([["fun"]] * b), r"prompts must be a 1-D column"
        elif kind == "prompts-type":
            field = draw(st.sampled_from(["prompts", "negative_prompts"]))
            kw[field] = draw(st.text(max_size=5) | st.binary(max_size=5) | st.integers() | st.floats()
                             | st.sets(st.text(max_size=2), max_size=2))
            pat = rf"{field} must be None or a column"
        elif kind in ("prompt-value", "negative-value"):
            field, name = ("prompts", "prompt") if kind == "prompt-value" else ("negative_prompts", "negative prompt")
            value, problem = draw(bad_prompts(engine.max_prompt_bytes))
            col = ["fun"] * b
            col[r] = value
            kw[field], pat = col, row + f"{name} .*{problem}"
        elif kind == "k":
            kw["k"], pat = draw(bad_k(engine.num_items)), K_MESSAGE
        elif kind == "exclude-history":
            kw["exclude_history"], pat = draw(BAD_BOOL), r"exclude_history must be a bool"
        elif kind == "filter-length":
            kw["hard_filter"] = [None] * draw(st.integers(0, b + 3).filter(lambda n: n != b))
            pat = r"hard_filter has \d+ entries but the batch has \d+ rows"
        else:   # filter-row
            col = [None] * b
            col[r] = draw(st.integers() | st.text(max_size=4) | st.just({"include_tags": ["no-such-tag"]})
                          | st.just({"exclude_items": ["no-such-item"]}) | st.just({"nope": []}))
            kw["hard_filter"] = col
            pat = (row if b > 1 else "") + "hard_filter"
        return kind, RequestBatch(**kw), pat

    return batches()


def test_recommend_batch_refuses_generated_bad_batches(engine):
    from dpr.engine import RequestBatch

    ids = engine.item_ids
    probe = RequestBatch.from_ids(ids[3:9] + ids[:1], [0, 6, 7], prompts=["more comedy", None], k=7)
    want = engine.recommend_batch(probe)
    seen: Counter = Counter()

    def run(kind):
        @fuzz_settings(_per_kind(N_BATCH, BATCH_KINDS))
        @given(case=bad_batches(engine, kind))
        def one(case):
            kind, batch, pat = case
            with pytest.raises(InputError) as info:
                engine.recommend_batch(batch)
            assert re.search(pat, str(info.value)), (kind, pat, str(info.value))
            got = engine.recommend_batch(probe)
            assert np.array_equal(got.indices, want.indices) and np.array_equal(got.scores, want.scores)
            seen[kind] += 1
        one()

    with time_guard(GUARD_S):
        for kind in BATCH_KINDS:
            run(kind)
    print(f"recommend_batch: {sum(seen.values())} generated bad batches")
    assert sum(seen.values()) >= N_BATCH * SCALE, seen
    assert set(seen) == set(BATCH_KINDS), set(BATCH_KINDS) - set(seen)


# ---- the DynamicBatcher: bad requests among good ones, each future its own answer --------------------------

REQUEST_KINDS = ["not-a-request", "unknown-field", "no-history", "history-type", "history-empty", "unknown-id",
                 "non-string-id", "prompt", "negative", "k", "exclude-history", "filter", "filter-tag", "filter-item"]


def bad_requests(engine, kind: str):
    """(kind, request, pattern) of a single request (a dict, sometimes a Request) the batcher must refuse."""
    from dpr.engine import Request

    ids = engine.item_ids

    @st.composite
    def requests(draw):
        req = {"history": draw(st.lists(st.sampled_from(ids), min_size=1, max_size=6)), "k": draw(st.integers(1, 8))}
        if kind == "not-a-request":
            return kind, draw(NOT_A_LIST | st.lists(st.sampled_from(ids), max_size=3)), \
                r"request must be a Request or a dict"
        if kind == "unknown-field":
            req[draw(WEIRD_TEXT.filter(lambda s: s not in Request.__dataclass_fields__) | st.integers())] = 1
            return kind, req, r"request has unknown field"
        if kind == "no-history":
            del req["history"]
            return kind, req, r"request has no 'history'"
        if kind == "history-type":
            req["history"], pat = draw(NOT_A_LIST), r"request: history must be a list of item ids"
        elif kind == "history-empty":
            req["history"], pat = [], r"request: history is empty"
        elif kind == "unknown-id":
            req["history"] = _insert(req["history"], draw(st.integers(0, 9)), draw(unknown_ids(engine)))
            pat = r"request: history holds unknown item id"
        elif kind == "non-string-id":
            req["history"] = _insert(req["history"], draw(st.integers(0, 9)), draw(NON_STRING_IDS))
            pat = r"request: history: item ids are strings"
        elif kind in ("prompt", "negative"):
            value, problem = draw(bad_prompts(engine.max_prompt_bytes))
            name = "prompt" if kind == "prompt" else "negative prompt"
            req["prompt" if kind == "prompt" else "negative_prompt"], pat = value, rf"request: {name} .*{problem}"
        elif kind == "k":
            req["k"], pat = draw(bad_k(engine.num_items)), K_MESSAGE
        elif kind == "exclude-history":
            req["exclude_history"], pat = draw(BAD_BOOL), r"request: exclude_history must be a bool"
        elif kind == "filter":
            req["hard_filter"], pat = draw(st.integers() | st.text(max_size=4) | st.lists(st.integers(), max_size=2)
                                           | st.just({"colour": ["red"]})), r"request: hard_filter"
        elif kind == "filter-tag":
            req["hard_filter"] = {"exclude_tags": [draw(unknown_tags(engine))]}
            pat = r"request: hard_filter: unknown tag"
        else:
            req["hard_filter"], pat = {"exclude_items": [draw(unknown_ids(engine))]}, \
                r"request: hard_filter: unknown item id"
        if draw(st.booleans()):
            req = Request(**req)                                   # the dataclass goes through the same checks
        return kind, req, pat

    return requests()


def test_batcher_refuses_generated_bad_requests_among_good_ones(engine):
    """Mixed lists of valid and bad requests submitted at once: submit never raises, every bad request's
    future fails alone with its InputError, every valid one gets its own answer (that of a direct call)."""
    from dpr.bench.soak import same_ranking
    from dpr.engine import DynamicBatcher

    rng = np.random.default_rng(7)
    valid = []
    for i in range(24):
        req = {"history": [engine.item_ids[int(j)] for j in rng.choice(engine.num_items, 1 + i % 9, replace=False)],
               "prompt": [None, "more comedy", "something funny"][i % 3], "k": 1 + i % 12}
        rec = engine.recommend([req["history"]], prompts=[req["prompt"]], k=req["k"])[0]
        valid.append((req, rec))
    seen: Counter = Counter()
    answered = Counter()
    with DynamicBatcher(engine, max_batch_size=16, max_delay_ms=1) as batcher:
        def run(kind):
            @fuzz_settings(_per_kind(N_BATCHER, REQUEST_KINDS))
            @given(mix=st.lists(st.one_of(st.integers(0, len(valid) - 1), bad_requests(engine, kind)),
                                min_size=2, max_size=12).filter(lambda m: any(not isinstance(x, int) for x in m)))
            def one(mix):
                check(mix)
            one()

        def check(mix):
            futures = [(x, batcher.submit(valid[x][0] if isinstance(x, int) else x[1])) for x in mix]
            for x, fut in futures:
                if isinstance(x, int):
                    rec, want = fut.result(timeout=30), valid[x][1]
                    assert same_ranking(rec.item_ids, rec.scores, want.item_ids, want.scores), (x, rec, want)
                    answered["valid"] += 1
                else:
                    kind, _, pat = x
                    exc = fut.exception(timeout=30)
                    assert isinstance(exc, InputError), (kind, repr(exc))
                    assert re.search(pat, str(exc)), (kind, pat, str(exc))
                    seen[kind] += 1

        with time_guard(GUARD_S):
            for kind in REQUEST_KINDS:
                run(kind)
        stats = batcher.stats()
    assert stats["queued"] == 0 and stats["failed"] == 0
    print(f"batcher: {sum(seen.values())} generated bad requests among {answered['valid']} valid ones")
    assert sum(seen.values()) >= N_BATCHER * SCALE, seen              # at least one bad request per example
    assert set(seen) == set(REQUEST_KINDS), set(REQUEST_KINDS) - set(seen)


# ---- engine bugs found by these strategies, fixed and now asserted -------------------------------------------

@pytest.mark.parametrize("entry", ["recommend", "recommend_batch", "batcher"])
def test_an_unordered_history_is_refused(engine, entry):
    from dpr.engine import RequestBatch

    hist = set(engine.item_ids[:5])
    with pytest.raises(InputError, match="history"):
        if entry == "recommend":
            engine.recommend([hist], k=3)
        elif entry == "recommend_batch":
            engine.recommend_batch(RequestBatch.from_ids(hist, [0, len(hist)], k=3))
        else:
            engine.validate_request({"history": hist, "k": 3})
