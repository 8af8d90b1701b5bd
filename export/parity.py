"""Parity of an exported graph against the PyTorch model: max abs / max rel error and the top-10 overlap
of retrieval over the item table."""

from __future__ import annotations

import numpy as np


def topk_ids(vectors: np.ndarray, table: np.ndarray, k: int = 10) -> np.ndarray:
    """(B, k) indices (1-based item indices) of the k best items by dot product; row 0 (padding) excluded."""
    scores = vectors.astype(np.float64) @ table[1:].astype(np.float64).T
    k = min(k, scores.shape[1])
    idx = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return idx + 1


def topk_overlap(a: np.ndarray, b: np.ndarray, table: np.ndarray, k: int = 10) -> float:
    """Mean over rows of |top-k(a) & top-k(b)| / k (1.0 = identical retrieval)."""
    ta, tb = topk_ids(a, table, k), topk_ids(b, table, k)
    kk = ta.shape[1]
    return float(np.mean([len(set(x.tolist()) & set(y.tolist())) / kk for x, y in zip(ta, tb)]))


def compare(out: np.ndarray, ref: np.ndarray, table: np.ndarray, k: int = 10) -> dict:
    """Errors of ``out`` (exported graph) against ``ref`` (PyTorch): max abs, max rel (per row,
    ``max|out-ref| / max|ref|``), top-k overlap, rows."""
    out = np.asarray(out, dtype=np.float32)
    ref = np.asarray(ref, dtype=np.float32)
    if out.shape != ref.shape:
        raise ValueError(f"output shape {out.shape} != reference shape {ref.shape}")
    if not np.all(np.isfinite(out)):
        return {"max_abs": float("inf"), "max_rel": float("inf"), "top10_overlap": 0.0, "rows": int(out.shape[0])}
    diff = np.abs(out - ref)
    denom = np.maximum(np.abs(ref).max(axis=1), 1e-12)
    return {
        "max_abs": float(diff.max()) if diff.size else 0.0,
        "max_rel": float((diff.max(axis=1) / denom).max()) if diff.size else 0.0,
        "top10_overlap": topk_overlap(out, ref, table, k),
        "rows": int(out.shape[0]),
    }


def merge(results: list[dict]) -> dict:
    """Worst case over several comparisons (overlap: row-weighted mean and minimum)."""
    rows = sum(r["rows"] for r in results)
    return {
        "max_abs": max(r["max_abs"] for r in results),
        "max_rel": max(r["max_rel"] for r in results),
        "top10_overlap": sum(r["top10_overlap"] * r["rows"] for r in results) / max(rows, 1),
        "min_top10_overlap": min(r["top10_overlap"] for r in results),
        "rows": rows,
    }
