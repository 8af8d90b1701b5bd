"""The native /recommend renderer (kernels/json_render_cpu.cc) against its specification, the Python renderer
(``dpr.serve.render.recommend_json``): the same bytes for random answers over a catalogue with hard titles
(quotes, backslashes, control characters, non-ASCII), short and empty rows, and reasons; and its score text
equal to Python's ``repr`` on float32 and float64 values, edge cases included."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest

from dpr.kernels import json_render
from dpr.serve import render

pytestmark = pytest.mark.skipif(json_render.library() is None,
                                reason="libdpr_id_index.so is not built (python -m dpr.kernels.build)")

EDGES = [0.0, -0.0, 1.0, -1.0, 0.1, 0.5, 1e-4, 1.5e-4, 9.999e-5, 1e-5, 1e15, 1e16, 9999999999999998.0, 1e17,
         123456789012345678.0, 1.7976931348623157e308, 5e-324, 2.2250738585072014e-308, 3.4028234663852886e38,
         1.401298464324817e-45, 100.0, 1234.5, 0.001, 0.30000000000000004, math.pi, -math.e, 2.0 ** 53,
         2.0 ** 53 + 2, 1e22, 1e21, 1e-7, math.inf, -math.inf]


def test_double_repr_edges():
    for v in EDGES:
        assert json_render.double_repr(v) == repr(v), v
    assert json_render.double_repr(math.nan) == "nan"


def test_double_repr_random_float32_and_float64():
    rng = np.random.default_rng(0)
    f32 = (rng.standard_normal(20000) * np.exp(rng.uniform(-40, 40, 20000))).astype(np.float32)
    bits = rng.integers(0, 2 ** 63, 20000, dtype=np.int64)
    f64 = [struct.unpack("<d", struct.pack("<q", int(b)))[0] for b in bits]
    for v in [float(x) for x in f32] + [v for v in f64 if math.isfinite(v)]:
        assert json_render.double_repr(v) == repr(v), v


class Catalogue:
    """What render.Tables reads of an engine: ids, titles, tags (weakref-able, as engines are)."""

    def __init__(self, n: int, rng):
        hard = ['plain', 'quote " inside', 'back\\slash', 'tab\tand\nnewline', 'caf\u00e9 \u2603 \U0001f600',
                'ctrl \x01\x1f', '</script>', '']
        self.item_ids = [f"i{j}" if j % 7 else f"id \"{j}\" \u00e9" for j in range(1, n + 1)]
        self.titles = [hard[int(rng.integers(len(hard)))] + f" {j}" for j in range(n)]
        self.item_tags = [tuple(hard[int(t)] for t in rng.integers(0, len(hard), int(rng.integers(0, 3))))
                          for _ in range(n)]


class Result:
    def __init__(self, indices, scores, counts, k, reasons):
        self.indices, self.scores, self.counts, self.k, self.short_reasons = indices, scores, counts, k, reasons


def _random_result(rng, n, rows, k):
    counts = rng.integers(0, k + 1, rows)
    counts[rng.random(rows) < 0.6] = k
    idx = np.zeros((rows, k), np.int64)
    scores = np.full((rows, k), -np.inf, np.float32)
    for r in range(rows):
        c = int(counts[r])
        idx[r, :c] = rng.choice(np.arange(1, n + 1), c, replace=False)
        scores[r, :c] = np.sort(rng.standard_normal(c).astype(np.float32) * 10 ** rng.uniform(-6, 6))[::-1]
    reasons = [None if c == k else rng.choice(["only 3 items match", "no item matches 'caf\u00e9'", 'a "quoted" one'])
               for c in counts]
    return Result(idx, scores, counts.astype(np.int64), k, reasons)


@pytest.mark.parametrize("rows,k", [(1, 1), (1, 10), (7, 3), (64, 10), (513, 17)])
def test_render_matches_the_python_renderer(rows, k):
    rng = np.random.default_rng(rows * 100 + k)
    cat = Catalogue(max(40, k + 1), rng)
    res = _random_result(rng, len(cat.item_ids), rows, k)
    want = ", ".join(render.recommend_json(cat, res)).encode()
    native = render.tables(cat).native()
    assert native is not None
    assert render.native_body(native, res) == want
    assert render.recommend_body(cat, res) == want          # native or Python by size: the same bytes


@pytest.mark.parametrize("rows,k", [(1, 1), (1, 10), (3, 3), (64, 10), (129, 17)])
def test_row_ends_cut_out_each_row(rows, k):
    """``recommend_rows``: the body and each row's end, by both renderers (native from NATIVE_MIN_SLOTS ranked
    slots up): every row cut out of the body is that row's own JSON text (the batching front answers each call
    with its rows' slice)."""
    rng = np.random.default_rng(rows * 7 + k)
    cat = Catalogue(max(40, k + 1), rng)
    res = _random_result(rng, len(cat.item_ids), rows, k)
    want = [r.encode() for r in render.recommend_json(cat, res)]
    body, ends = render.recommend_rows(cat, res)
    assert body == b", ".join(want) and len(ends) == rows
    starts = [0] + [e + 2 for e in ends[:-1]]
    assert [body[a:b] for a, b in zip(starts, ends)] == want
    native_ends = np.full(rows, -1, np.int64)
    assert render.native_body(render.tables(cat).native(), res, native_ends) == body
    assert native_ends.tolist() == ends
    with pytest.raises(ValueError, match="row_ends"):
        render.native_body(render.tables(cat).native(), res, np.zeros(rows + 1, np.int64))


def test_render_zero_rows():
    cat = Catalogue(5, np.random.default_rng(1))
    res = Result(np.zeros((0, 4), np.int64), np.zeros((0, 4), np.float32), np.zeros(0, np.int64), 4, [])
    assert render.recommend_body(cat, res) == b""
    assert render.native_body(render.tables(cat).native(), res) == b""


def test_render_refuses_bad_input():
    cat = Catalogue(5, np.random.default_rng(2))
    frags = render.tables(cat).native()
    idx = np.array([[1, 2]], np.int64)
    sc = np.zeros((1, 2), np.float32)
    with pytest.raises(json_render.KernelError, match="outside the catalogue"):
        json_render.render_rows(frags, np.array([[1, 6]]), sc, np.array([2]), 2, [b"null"])
    with pytest.raises(json_render.KernelError, match="outside the catalogue"):
        json_render.render_rows(frags, np.array([[0, 1]]), sc, np.array([1]), 2, [b"null"])
    with pytest.raises(json_render.KernelError, match="count"):
        json_render.render_rows(frags, idx, sc, np.array([3]), 2, [b"null"])
    with pytest.raises(ValueError, match="same rows"):
        json_render.render_rows(frags, idx, sc, np.array([2, 2]), 2, [b"null"])
    # a padded slot past the count is never read (index 0 there is fine)
    assert json_render.render_rows(frags, np.array([[3, 0]]), sc, np.array([1]), 2, [b"null"]).count(b'"rank"') == 1


@pytest.mark.parametrize("n", [0, 1, 7, 5120])
def test_float_list_is_json_dumps_of_the_float32_values(n):
    """The v2 route's FP32 ``data`` text: json.dumps of the values as Python floats, NaN / Infinity included."""
    rng = np.random.default_rng(n)
    v = (rng.standard_normal(n) * np.exp(rng.uniform(-40, 40, n))).astype(np.float32)
    if n >= 7:
        v[:7] = [np.nan, np.inf, -np.inf, -0.0, np.finfo(np.float32).min, np.finfo(np.float32).tiny,
                 1.401298464324817e-45]
    for arr in (v, v.reshape(-1, 1) if n else v):
        assert json_render.float_list_json(arr) == json.dumps(v.tolist()).encode()
    # bit patterns across the whole float32 range, signalling NaNs and subnormals among them
    bits = rng.integers(0, 2 ** 32, 4096, dtype=np.uint64).astype(np.uint32).view(np.float32)
    assert json_render.float_list_json(bits) == json.dumps(bits.tolist()).encode()


@pytest.mark.parametrize("n", [0, 1, 9, 5120])
def test_fragment_list_is_json_dumps_of_the_ids(n):
    """The v2 route's JSON ``item_ids``: each id's json.dumps text gathered by index is json.dumps of the list,
    for ids with quotes, backslashes, control characters and non-ASCII, and the padding's empty string."""
    ids = ["", "i1", 'q"uote', "back\\slash", "é漢🙂", "tab\there\n", "\x00\x1f", "x" * 300, "i1 "]
    frags = json_render.Fragments([json.dumps(a) for a in ids])
    rng = np.random.default_rng(n)
    idx = rng.integers(0, len(ids), n)
    want = json.dumps([ids[i] for i in idx.tolist()]).encode()
    for shaped in (idx, idx.reshape(-1, 1) if n else idx, idx.astype(np.int32)):
        assert json_render.fragment_list_json(frags, shaped) == want


@pytest.mark.parametrize("bad", [-1, 9, 2 ** 40])
def test_fragment_list_refuses_an_index_outside_the_fragments(bad):
    frags = json_render.Fragments([json.dumps(a) for a in ["", "a", "b", "c", "d", "e", "f", "g", "h"]])
    with pytest.raises(json_render.KernelError, match="index"):
        json_render.fragment_list_json(frags, np.array([1, bad, 2]))
