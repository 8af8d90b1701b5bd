"""The soak's answers and how one is judged against the answer its request must get: the same ranking up to
float rounding (:func:`same_ranking`), the engine's own refusal word for word (:func:`same_error`), and a
brute-force exact top-k (:func:`oracle_topk`) the fuzz tests check the engine against."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["ATOL", "Answer", "same_ranking", "same_error", "oracle_topk"]

ATOL = 1e-4                     # a batched answer may differ from the one-row run by float rounding only


@dataclass
class Answer:
    """What a target answered, in a form every front end can give: items and scores, or an error."""
    ok: bool
    item_ids: list = field(default_factory=list)
    scores: list = field(default_factory=list)
    error_type: str = ""
    message: str = ""


def same_ranking(got_ids, got_scores, want_ids, want_scores, atol: float = ATOL) -> bool:
    """True when two top-k lists are the same ranking up to float rounding: the same count, the same
    scores position by position (within ``atol``), no repeated item, every shared item with the same score,
    and an item that only one list holds scoring at the boundary (a tie at the k-th place, where either
    item is a right answer)."""
    if len(got_ids) != len(want_ids) or len(got_scores) != len(got_ids) or len(set(got_ids)) != len(got_ids):
        return False
    if not got_ids:
        return True
    g = np.asarray(got_scores, np.float64)
    w = np.asarray(want_scores, np.float64)
    if not np.all(np.abs(g - w) <= atol):
        return False
    want = dict(zip(want_ids, want_scores))
    last = float(w[-1])
    for i, s in zip(got_ids, got_scores):
        if i in want:
            if abs(s - want[i]) > atol:
                return False
        elif s > last + atol:                  # an outsider above the k-th score: not a tie, a wrong item
            return False
    return True


def oracle_topk(table: np.ndarray, user: np.ndarray, k: int, excluded=(), allowed: np.ndarray | None = None):
    """Brute-force exact top-k over the item table (row 0 is padding): scores of every item, the excluded
    catalogue indices and the ones ``allowed`` (a bool mask over 0..N) forbids removed, sorted by score
    (index order on ties). Returns (catalogue indices, scores), at most ``k`` of them."""
    scores = table[1:].astype(np.float64) @ np.asarray(user, np.float64)
    ok = np.ones(len(scores), bool)
    ex = np.asarray(list(excluded), np.int64)
    if ex.size:
        ok[ex - 1] = False
    if allowed is not None:
        ok &= np.asarray(allowed, bool)[1:]
    cand = np.flatnonzero(ok)
    order = cand[np.lexsort((cand, -scores[cand]))][:k]
    return (order + 1).tolist(), scores[order].tolist()


def same_error(expected: Answer, got: Answer) -> bool:
    """In process the refusal is the engine's own InputError, word for word."""
    return not got.ok and got.error_type == expected.error_type and got.message == expected.message
