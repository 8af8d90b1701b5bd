"""Results rendered per batch from per-item tables built once per engine: a catalogue item's JSON fragment
(``"id": ..., "title": ..., "tags": [...]``) and its id as bytes (and, for the way in, the id index the native
``/recommend`` body parser maps through: :meth:`Tables.id_index`). ``ResultBatch.ids/titles/tags`` build Python
lists of lists per row; rendering a 512-row answer from them cost more than the engine's own work (36 ms
against 23 ms on the test export), from the tables it costs a few ms."""

from __future__ import annotations

import json
import threading
import weakref

import numpy as np

_lock = threading.Lock()
_tables: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class Tables:
    def __init__(self, engine):
        ids, titles, tags = engine.item_ids, engine.titles, engine.item_tags
        # index 0 is the engine's padding index: never rendered (rows stop at their count)
        self.fragment = [""] + [json.dumps({"id": a, "title": t, "tags": list(g)})[1:-1]
                                for a, t, g in zip(ids, titles, tags)]
        self.ids_str = np.array([""] + list(ids), dtype=object)
        self.ids_bytes = np.array([b""] + [a.encode("utf-8") for a in ids], dtype=object)
        self._item_ids = ids
        self._native = None
        self._json_ids = None
        self._id_index = None
        self._wire = None

    def native(self):
        """The fragments packed for the native renderer (``dpr.kernels.json_render``), or None when its library
        is not built."""
        if self._native is None:
            from dpr.kernels import json_render

            self._native = json_render.Fragments(self.fragment) if json_render.library() is not None else False
        return self._native or None

    def json_ids(self):
        """Each catalogue id's ``json.dumps`` text packed for the native renderer (index 0: the padding's ``""``):
        the v2 route's JSON ``item_ids`` (``json_render.fragment_list_json``), or None when its library is not
        built."""
        if self._json_ids is None:
            from dpr.kernels import json_render

            self._json_ids = (json_render.Fragments([json.dumps(a) for a in self.ids_str.tolist()])
                              if json_render.library() is not None else False)
        return self._json_ids or None

    def id_index(self):
        """The catalogue's id index for the native body readers (``serve/body_columns.py``, ``serve/v2_columns.py``),
        or None when its library is not built or the ids cannot be indexed (a NUL inside one). Its own, not the
        engine's: a reload may close the engine's on another thread while the event loop reads a body."""
        if self._id_index is None:
            ix = None
            try:
                from dpr.kernels import id_index, recommend_parse

                if recommend_parse.library() is not None:
                    ix = id_index.IdIndex(list(self._item_ids))
            except (ValueError, RuntimeError, ImportError):
                ix = None
            self._id_index = ix if ix is not None else False
        return self._id_index or None


    def wire_table(self):
        """The item ids in Triton's BYTES wire form, gathered by index (index 0: the empty string): the native
        Triton backend's ``item_ids`` output (``dpr.kernels.bytes_tensor.WireTable``)."""
        if self._wire is None:
            from dpr.kernels import bytes_tensor

            self._wire = bytes_tensor.WireTable(self.ids_bytes.tolist())
        return self._wire


def tables(engine) -> Tables:
    with _lock:
        t = _tables.get(engine)
        if t is None:
            t = _tables[engine] = Tables(engine)
        return t


def recommend_json(engine, res) -> list[str]:
    """Each row of a ResultBatch as ``Recommendation.to_dict()``'s JSON (same keys, same float text)."""
    frag = tables(engine).fragment
    idx = res.indices.tolist()
    scores = res.scores.tolist()
    rank = _ranks(res.k)
    out = []
    for i, c in enumerate(res.counts.tolist()):
        # C-level map/zip/join over the row (float repr is what json.dumps writes)
        items = ", ".join(map("".join, zip(rank[:c], map(frag.__getitem__, idx[i][:c]), [', "score": '] * c,
                                           map(repr, scores[i][:c]), ["}"] * c)))
        out.append(f'{{"k": {res.k}, "count": {c}, "short_reason": {json.dumps(res.short_reasons[i])}, '
                   f'"items": [{items}]}}')
    return out


# Below this many ranked slots (rows x k) the Python renderer is the faster: the native call's fixed cost (ctypes,
# its arrays) is ~15 us, a Python item ~0.8 us (2-core AMD EPYC VM: one 10-item row 9 us in Python, 18 native;
# 512 rows 4.1 ms in Python, 0.37 ms native)
NATIVE_MIN_SLOTS = 32


def recommend_body(engine, res) -> bytes:
    """The rows of ``recommend_json(engine, res)`` joined by ", ", as UTF-8: by the native renderer
    (:func:`native_body`) for answers of ``NATIVE_MIN_SLOTS`` ranked slots or more when it is built, else by
    ``recommend_json``. Byte for byte the same (tests/test_json_render.py)."""
    native = _native_for(engine, res)
    if native is not None:
        return native_body(native, res)
    return ", ".join(recommend_json(engine, res)).encode()


def recommend_rows(engine, res) -> tuple[bytes, list[int]]:
    """``recommend_body(engine, res)`` and the offset just past each row's text in it (rows are joined by
    ", "): the batching front (``http_front``) renders a batch of calls once and cuts each call's rows out."""
    native = _native_for(engine, res)
    if native is not None:
        ends = np.empty(len(res.counts), np.int64)
        return native_body(native, res, ends), ends.tolist()
    rows = [r.encode() for r in recommend_json(engine, res)]
    ends, at = [], -2
    for r in rows:
        at += 2 + len(r)
        ends.append(at)
    return b", ".join(rows), ends


def _native_for(engine, res):
    """The native renderer's fragments when it should render ``res`` (``NATIVE_MIN_SLOTS`` ranked slots or more,
    float32 scores, the library built), else None."""
    if res.indices.size >= NATIVE_MIN_SLOTS and res.scores.dtype == np.float32:   # native reads float32 scores
        return tables(engine).native()
    return None


def native_body(native, res, row_ends: np.ndarray | None = None) -> bytes:
    """``recommend_body`` through the native renderer, whatever the answer's size (``native``:
    ``tables(engine).native()``)."""
    from dpr.kernels.json_render import render_rows

    reasons = [_reason_json(r) for r in res.short_reasons]
    return render_rows(native, res.indices, res.scores, res.counts, res.k, reasons, row_ends)


def _reason_json(reason) -> bytes:
    return b"null" if reason is None else json.dumps(reason).encode()


_RANKS: list = []


def _ranks(k: int) -> list:
    while len(_RANKS) < k:
        _RANKS.append('{"rank": %d, ' % (len(_RANKS) + 1))
    return _RANKS
