"""Vectorised full ranking over the whole catalogue with exact masking (history, padding, tags)."""

from __future__ import annotations

import numpy as np
import torch

NEG_INF = float("-inf")


def history_mask_(scores: torch.Tensor, histories: torch.Tensor) -> torch.Tensor:
    """Set the scores of each row's history items (and of padding, column 0) to -inf, in place.
    ``histories`` is (B, L) int64, left-padded with 0."""
    scores.scatter_(1, histories, NEG_INF)
    scores[:, 0] = NEG_INF
    return scores


def topk_full(user_vecs: torch.Tensor, item_table: torch.Tensor, k: int,
              histories: torch.Tensor | None = None, allowed: torch.Tensor | None = None,
              chunk: int = 1024) -> np.ndarray:
    """(B, k) top-k item indices; -1 where fewer than k items are eligible.

    ``allowed``: bool (B, N + 1) or (N + 1,), items that may be returned (hard filters)."""
    out = []
    with torch.no_grad():
        for s in range(0, user_vecs.shape[0], chunk):
            sc = user_vecs[s:s + chunk] @ item_table.t()
            if histories is not None:
                history_mask_(sc, histories[s:s + chunk])
            else:
                sc[:, 0] = NEG_INF
            if allowed is not None:
                a = allowed if allowed.dim() == 1 else allowed[s:s + chunk]
                sc = sc.masked_fill(~a, NEG_INF)
            vals, idx = torch.topk(sc, min(k, sc.shape[1]), dim=1)
            idx = torch.where(torch.isinf(vals) & (vals < 0), -1, idx)
            out.append(idx.cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, k), dtype=np.int64)


def filter_candidates(candidates: np.ndarray, keep: np.ndarray, k: int) -> np.ndarray:
    """Post-filter: keep the candidates (B, C) whose ``keep`` flag (B, C) is true, in order, first k;
    -1 fills rows with fewer than k survivors."""
    b, c = candidates.shape
    order = np.argsort(~keep, axis=1, kind="stable")          # kept ones first, order preserved
    picked = np.take_along_axis(candidates, order, axis=1)[:, :k]
    kept = np.take_along_axis(keep, order, axis=1)[:, :k]
    res = np.where(kept, picked, -1)
    if res.shape[1] < k:
        res = np.concatenate([res, -np.ones((b, k - res.shape[1]), dtype=res.dtype)], axis=1)
    return res
