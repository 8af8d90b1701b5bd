"""The C++ item-id index (kernels/id_index*) against its reference, a Python dict ``{id: position + 1}``:
random catalogues (unicode, shared prefixes, keys around the 8-byte head and past 65,535 bytes), unknown
ids, ids it must refuse, concurrent lookups; and the engine giving the same answers with and without it."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from dpr.kernels import id_index

pytestmark = pytest.mark.skipif(not id_index.library_available(),
                                reason="libdpr_id_index.so is not built (python -m dpr.kernels.build)")


def _catalogue(rng, n):
    alphabet = list("abcxyz0123456789_-é漢🙂")
    ids = set()
    while len(ids) < n:
        kind = rng.integers(4)
        if kind == 0:
            ids.add(str(int(rng.integers(0, 10 * n))))                             # MovieLens-like numbers
        elif kind == 1:
            ids.add(f"item_{int(rng.integers(0, 10 * n)):09d}")                     # long shared prefix
        elif kind == 2:
            ids.add("".join(rng.choice(alphabet, size=int(rng.integers(1, 12)))))   # around the 8-byte head
        else:
            ids.add("".join(rng.choice(alphabet, size=int(rng.integers(7, 10)))))
    return sorted(ids, key=lambda _: rng.random())


def _reference(ids, queries):
    ref = {a: i + 1 for i, a in enumerate(ids)}
    return np.array([ref.get(q, 0) for q in queries], np.int64)


@pytest.mark.parametrize("n", [1, 7, 1000, 30011])
def test_lookup_matches_the_dict_reference(n):
    rng = np.random.default_rng(n)
    ids = _catalogue(rng, n)
    idx = id_index.IdIndex(ids)
    known = [ids[int(i)] for i in rng.integers(0, n, 3 * n + 5)]
    unknown = [a + "x" for a in known[:50]] + [a[:-1] for a in known[:50] if len(a) > 1] + ["", " ", "0" * 9]
    queries = known + unknown
    order = rng.permutation(len(queries))
    queries = [queries[i] for i in order]
    got = idx.lookup(queries, len(queries))
    np.testing.assert_array_equal(got, _reference(ids, queries))
    known_set = set(known)
    assert (got[[i for i, q in enumerate(queries) if q in known_set]] > 0).all()
    rows = [queries[:3], queries[3:4], queries[4:]]
    np.testing.assert_array_equal(idx.lookup_many(rows), got)
    assert idx.lookup([], 0).shape == (0,)


def _wire(elems):
    return b"".join(len(e).to_bytes(4, "little") + e for e in elems)


def _rows_reference(ids, rows):
    """lookup_wire_rows's specification: rows of bytes elements (b"" = padding) -> (flat values, lens), or the
    first problem in element order: ("unknown" | "hole", flat element index)."""
    ref = {a.encode(): i + 1 for i, a in enumerate(ids)}
    flat, lens, e = [], [], 0
    for row in rows:
        seen_id = after = False
        count = 0
        for x in row:
            if not x:
                after = after or seen_id
            elif after:
                return ("hole", e)
            else:
                seen_id = True
                if ref.get(x, 0) == 0:
                    return ("unknown", e)
                flat.append(ref[x])
                count += 1
            e += 1
        lens.append(count)
    return np.array(flat, np.int64), np.array(lens, np.int64)


@pytest.mark.parametrize("n", [1, 7, 1000])
def test_lookup_of_tritons_wire_rows_matches_the_reference(n):
    """lookup_wire_rows (the native Triton backend's): padded rows in Triton's BYTES wire form, compacted, with
    each row's count; rows of odd widths (0 included), padding before and after the ids, more than one group of
    32 ids; the first unknown id or hole found by element, also when the other problem comes later in its group;
    invalid UTF-8 and a NUL inside an element are just not ids; a buffer its widths do not describe is malformed."""
    rng = np.random.default_rng(n + 1)
    ids = _catalogue(rng, n)
    idx = id_index.IdIndex(ids)
    rows = []
    for _ in range(40):
        w = int(rng.integers(0, 70))
        c = int(rng.integers(0, w + 1))
        lead = int(rng.integers(0, w - c + 1))
        row = [b""] * w
        row[lead:lead + c] = [ids[int(i)].encode() for i in rng.integers(0, n, c)]
        rows.append(row)
    widths = np.array([len(r) for r in rows], np.int64)
    buf = _wire([x for r in rows for x in r])
    got = idx.lookup_wire_rows(buf, widths)
    want_flat, want_lens = _rows_reference(ids, rows)
    assert got.problem is None and got.element == -1
    np.testing.assert_array_equal(got.flat, want_flat)
    np.testing.assert_array_equal(got.lens, want_lens)

    long_rows = [r for r in rows if sum(map(bool, r)) > 5]
    keys = {a.encode() for a in ids}
    for bad in (ids[0].encode() + b"\0", b"\xff\xfe", ids[-1].encode()[:-1] + b"\xc3", b"no such id"):
        for where in ("first", "last"):
            if bad in keys:          # a cut id that happens to be another id
                continue
            case = [list(r) for r in long_rows]
            r = case[len(case) // 2]
            pos = [i for i, x in enumerate(r) if x][0 if where == "first" else -1]
            r[pos] = bad
            w = np.array([len(x) for x in case], np.int64)
            got = idx.lookup_wire_rows(_wire([x for row in case for x in row]), w)
            assert (got.problem, got.element) == _rows_reference(ids, case)
            assert got.flat is None and got.lens is None
    # a hole, and a hole after an unknown id in the same group of 32: the unknown id is the first problem
    case = [list(r) for r in long_rows]
    r = case[0]
    at = [i for i, x in enumerate(r) if x]
    r[at[2]] = b""
    assert _rows_reference(ids, case)[0] == "hole"
    got = idx.lookup_wire_rows(_wire([x for row in case for x in row]), [len(x) for x in case])
    assert (got.problem, got.element) == _rows_reference(ids, case)
    r[at[1]] = b"unknown!"
    got = idx.lookup_wire_rows(_wire([x for row in case for x in row]), [len(x) for x in case])
    assert (got.problem, got.element) == _rows_reference(ids, case) == ("unknown", at[1])

    assert idx.lookup_wire_rows(buf[:-1], widths).problem == "malformed"          # the last element cut short
    assert idx.lookup_wire_rows(buf + b"\x01\x00", widths).problem == "malformed"  # half a length prefix
    assert idx.lookup_wire_rows(buf + _wire([b""]), widths).problem == "malformed"  # an element left over
    short = widths.copy()
    short[-1] += 1
    assert idx.lookup_wire_rows(buf, short).problem == "malformed"                 # widths past the buffer
    neg = widths.copy()
    neg[0] = -1
    assert idx.lookup_wire_rows(buf, neg).problem == "malformed"
    empty = idx.lookup_wire_rows(b"", np.zeros(3, np.int64))
    assert empty.problem is None and empty.flat.shape == (0,) and empty.lens.tolist() == [0, 0, 0]


def test_keys_of_every_length_and_near_collisions():
    """Keys that share the first 8 bytes, differ only in length, or pass the 65,535-byte length field."""
    base = "abcdefgh"
    ids = [base[:i] for i in range(1, 9)] + [base + t for t in ("", "i", "ij", "ik", "i" * 40)]
    ids = list(dict.fromkeys(ids)) + ["q" * 70000, "q" * 70001, "q" * 69999 + "r"]
    idx = id_index.IdIndex(ids)
    queries = ids + ["abcdefgh\u00e9", "q" * 70002, "q" * 70000 + "r", "abcdefg", "ab"]
    np.testing.assert_array_equal(idx.lookup(queries, len(queries)), _reference(ids, queries))


def test_ids_the_index_cannot_take():
    idx = id_index.IdIndex(["a", "b"])
    assert idx.lookup(["a", 3], 2) is None                        # not a string
    assert idx.lookup(["a", "b\0a"], 2) is None                   # a NUL would split an id in two
    assert idx.lookup(["a", "\ud800"], 2) is None                 # a lone surrogate: not UTF-8
    assert idx.lookup([""], 1) is None                            # the empty id: no token at all
    assert idx.lookup(["a", "b"], 3) is None                      # miscounted
    np.testing.assert_array_equal(idx.lookup(["a", ""], 2), [1, 0])
    for bad, why in ((["a", "a"], "same bytes"), (["a", "b\0"], "NUL"), (["a", 1], "string"),
                     (["\udc00"], "encode")):
        with pytest.raises(ValueError, match=why):
            id_index.IdIndex(bad)
    idx.close()
    with pytest.raises(id_index.KernelError, match="closed"):
        idx.lookup(["a"], 1)


def test_concurrent_lookups():
    rng = np.random.default_rng(5)
    ids = _catalogue(rng, 5000)
    idx = id_index.IdIndex(ids)
    queries = [ids[int(i)] for i in rng.integers(0, 5000, 20000)] + ["nope"]
    ref = _reference(ids, queries)
    errors = []

    def work():
        for _ in range(20):
            if not np.array_equal(idx.lookup(queries, len(queries)), ref):
                errors.append("mismatch")

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
