"""Ranking metrics with one target per case (leave-one-out): NDCG@k, Recall@k (= HR@k), and the
tag metrics of the steering tasks. Inputs are top-k index lists (B, k), -1 marking an empty slot."""

from __future__ import annotations

import numpy as np


def target_ranks(topk: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank of each target inside its row of ``topk``; -1 when absent."""
    hit = topk == targets[:, None]
    return np.where(hit.any(axis=1), hit.argmax(axis=1), -1)


def ndcg_at_k(topk: np.ndarray, targets: np.ndarray, k: int = 10) -> np.ndarray:
    """Per-case NDCG@k with a single relevant item: 1 / log2(rank + 2) if ranked in the top k."""
    r = target_ranks(topk[:, :k], targets)
    return np.where(r >= 0, 1.0 / np.log2(np.maximum(r, 0) + 2.0), 0.0)


def recall_at_k(topk: np.ndarray, targets: np.ndarray, k: int = 10) -> np.ndarray:
    return (target_ranks(topk[:, :k], targets) >= 0).astype(np.float64)


def tag_share_at_k(topk: np.ndarray, item_tags: np.ndarray, tags: np.ndarray, k: int = 10) -> np.ndarray:
    """Share of the k slots holding an item that carries the row's tag (empty slots count as 0):
    tag_precision@k for positive steering, violation@k for negative steering."""
    top = topk[:, :k]
    valid = top >= 0
    carries = item_tags[np.where(valid, top, 0), tags[:, None]] & valid
    return carries.sum(axis=1) / float(k)
