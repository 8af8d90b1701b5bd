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


@pytest.mark.parametrize("n", [1, 7, 1000])
def test_lookup_of_tritons_wire_form_matches_the_reference(n):
    """lookup_wire (the native Triton backend's): elements in Triton's BYTES wire form, empty ones -1, unknown 0;
    invalid UTF-8 and a NUL inside an element are just not ids; truncated data or a miscount gives None."""
    rng = np.random.default_rng(n + 1)
    ids = _catalogue(rng, n)
    idx = id_index.IdIndex(ids)
    elems = [ids[int(i)].encode() for i in rng.integers(0, n, 2 * n + 3)]
    elems += [b"", b"", ids[0].encode() + b"\0", b"\xff\xfe", ids[-1].encode()[:-1] + b"\xc3", b""]
    elems = [elems[i] for i in rng.permutation(len(elems))]
    wire = b"".join(len(e).to_bytes(4, "little") + e for e in elems)
    want = _reference(ids, [e.decode("utf-8", "replace") if e else None for e in elems])
    want[[i for i, e in enumerate(elems) if not e]] = -1
    want[[i for i, e in enumerate(elems) if b"\0" in e or b"\xff" in e or e.endswith(b"\xc3")]] = 0
    np.testing.assert_array_equal(idx.lookup_wire(wire, len(elems)), want)
    assert idx.lookup_wire(wire[:-1], len(elems)) is None             # the last element cut short
    assert idx.lookup_wire(wire + b"\x01\x00", len(elems) + 1) is None  # half a length prefix
    assert idx.lookup_wire(wire, len(elems) - 1) is None               # more elements than asked for
    assert idx.lookup_wire(b"", 0).shape == (0,)


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
