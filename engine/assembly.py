"""Result assembly: the retriever's top-k arrays -> a :class:`ResultBatch` (counts per row, short rows padded
with index 0 and score -inf, a reason per short row) -> for ``recommend`` and the batcher, per-row lists
(:class:`Recommendations`). Everything runs over whole arrays; only short rows are visited one by one."""

from __future__ import annotations

import numpy as np

from .batch import ResultBatch
from .catalogue import Catalogue
from .columns import Columns
from .results import Recommendations


def result_batch(idx: np.ndarray, sc: np.ndarray, cols: Columns, catalogue: Catalogue, mask: np.ndarray | None,
                 retriever_name: str) -> ResultBatch:
    """``idx`` / ``sc``: the retriever's (B, >= kmax) indices (-1 padded) and scores for ``cols``."""
    ks = cols.ks
    kmax = cols.kmax
    same_k = bool((ks == kmax).all())
    idx, sc = idx[:, :kmax], sc[:, :kmax]
    valid = idx > 0
    if not same_k:
        valid &= np.arange(kmax) < ks[:, None]
    full = bool(valid.all())
    counts = np.full(len(ks), kmax, np.int64) if full else valid.sum(axis=1).astype(np.int64)
    if not full:
        idx = np.where(valid, idx, 0)
        sc = np.where(valid, sc, np.float32(-np.inf))
    # owned, C-contiguous, writable: torch.from_numpy / DLPack take them as they are
    idx = np.require(idx, np.int64, ("C", "W", "O"))
    sc = np.require(sc, np.float32, ("C", "W", "O"))
    reasons: list = [None] * len(ks)
    if not full:
        for i in np.flatnonzero(counts < ks).tolist():
            reasons[i] = short_reason(cols, i, int(counts[i]), mask, catalogue.num_items, retriever_name)
    return ResultBatch(idx, sc, counts, kmax, reasons, catalogue.ids_obj, catalogue.titles_obj, catalogue.tags_obj,
                       ks=None if same_k else ks.copy())


def short_reason(cols: Columns, i: int, count: int, mask: np.ndarray | None, n: int, retriever_name: str) -> str:
    """Why row ``i`` got ``count`` < k items: how many items its excluded history and hard filter leave."""
    k = int(cols.ks[i])
    row_mask = None
    if cols.filter_keys[i] is not None and mask is not None:
        row_mask = mask if mask.ndim == 1 else mask[i]
    hist = (np.unique(cols.flat[cols.offsets[i]:cols.offsets[i + 1]]) if cols.exclude_history[i]
            else np.zeros(0, np.int64))
    allowed = n if row_mask is None else int(row_mask.sum())
    eligible = allowed - (hist.size if row_mask is None else int(row_mask[hist].sum()))
    if eligible > count:          # exact retrievers never do this; say so rather than guess a cause
        return f"only {count} of the {eligible} eligible items came back (k={k}; retriever {retriever_name!r})"
    steps = []
    if hist.size:
        steps.append(f"excluding the {hist.size} history item{'s' if hist.size != 1 else ''}")
    if row_mask is not None:
        steps.append(f"applying the hard filter, which allows {allowed} of the {n} items")
    elif hist.size:
        steps[-1] += f" from the {n} in the catalogue"
    left = "no items remain" if count == 0 else ("only 1 item remains" if count == 1 else f"only {count} items remain")
    return f"{left} after {' and '.join(steps) or 'filtering'} (k={k})"


def recommendations(res: ResultBatch) -> Recommendations:
    """Per-row lists of a ResultBatch: ids, float scores, titles and tags, each list built on first access
    (fresh lists: mutating them leaves the catalogue alone)."""
    ks = (res.ks if res.ks is not None else np.full(len(res.counts), res.k, np.int64)).tolist()
    counts = res.counts.tolist()
    full = res.ks is None and not any(res.short_reasons)
    pos = res.indices - 1

    def build(name: str) -> list:
        if name == "scores":
            rows = res.scores.tolist()
            return rows if full else [row[:c] for row, c in zip(rows, counts)]
        if not full:                           # short rows or several k: the ResultBatch's per-row lookups
            return {"item_ids": lambda: res.ids, "titles": lambda: res.titles, "tags": lambda: res.tags}[name]()
        # every row full: the batch looked up in one go (object arrays, C loops) instead of per item
        if name == "tags":
            return [list(map(list, row)) for row in res._tags[pos].tolist()]
        return (res._ids if name == "item_ids" else res._titles)[pos].tolist()

    out = Recommendations.__new__(Recommendations)    # the four lists are left to __getattr__ (lazy)
    out.ks, out.counts, out.short_reasons = ks, counts, list(res.short_reasons)
    out._lazy = build
    return out
