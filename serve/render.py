"""Results rendered per batch from per-item tables built once per engine: a catalogue item's JSON fragment
(``"id": ..., "title": ..., "tags": [...]``) and its id as bytes. ``ResultBatch.ids/titles/tags`` build Python
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


_RANKS: list = []


def _ranks(k: int) -> list:
    while len(_RANKS) < k:
        _RANKS.append('{"rank": %d, ' % (len(_RANKS) + 1))
    return _RANKS


def id_array(engine, res, as_bytes: bool) -> np.ndarray:
    """(B, k) item ids (``""`` where a short row is padded: index 0)."""
    t = tables(engine)
    return (t.ids_bytes if as_bytes else t.ids_str)[res.indices]
