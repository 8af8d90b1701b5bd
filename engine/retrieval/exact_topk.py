"""The exact tiled top-k kernel in torch, shared by every retriever.

The catalogue is tiled, each tile is scored by one matmul and reduced by ``topk`` into a running top-k,
so the full ``(B, N)`` score matrix is never materialised. Filters are applied per tile BEFORE selection
(allowed mask by ``masked_fill_``, exclusion lists by scattering ``-inf`` at the excluded (row, item)
pairs that fall in the tile), so the result is exact without any over-fetch. When the allowed mask keeps
only a small part of the catalogue, only the allowed rows of the table are gathered and scored.

Used by :class:`~dpr.engine.retrieval.torch_retriever.TorchRetriever` and, as the exact fallback of the
over-fetching retrievers, by :meth:`dpr.engine.retrieval.base.Retriever._exact`. Runs on CPU and CUDA;
on CUDA the table may be ``float16``/``bfloat16``: the matmul reads half-precision operands and
accumulates and writes fp32 (``torch.mm(..., out_dtype=float32)``).
"""

from __future__ import annotations

import numpy as np
import torch

from .filters import Filters, pad_results

__all__ = ["tiled_topk", "tiled_topk_filtered"]


def score_tile(q: torch.Tensor, t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 scores ``q @ t.T``; half-precision operands accumulate in fp32."""
    if t.dtype == torch.float32:
        if out is not None:
            return torch.mm(q, t.T, out=out)
        return torch.mm(q, t.T)
    if q.is_cuda:
        try:
            return torch.mm(q, t.T, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # older torch without mm(out_dtype=): cuBLAS still accumulates fp32
            return torch.mm(q, t.T).float()
    return torch.mm(q.float(), t.float().T)  # CPU: upcast the tile, exact fp32 products of rounded values


def select_tile_topk(s: torch.Tensor, kk: int, lanes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``kk`` (values, columns; unsorted) of each row of the score tile ``s`` (R, w). With ``lanes``
    (``arange(block)`` shaped (1, block, 1)) block-max pruning: the tile's scores are grouped into strided
    blocks of ``block`` columns and only the ``kk`` blocks with the largest maxima are searched (they hold the
    tile's top-k: each top-k score lies in a block whose max is >= the k-th score, and at most k blocks have
    such a max). No host synchronisation and no data-dependent shape: CUDA graphs can capture it."""
    r, w = s.shape
    block = lanes.shape[1] if lanes is not None else 1
    nb = w // block if lanes is not None else 0
    if lanes is None or nb <= kk:
        return torch.topk(s, min(kk, w), dim=1, largest=True, sorted=False)
    # block j = columns j, j + nb, j + 2 nb, ... of the first nb * block columns, read in place (as_strided, no
    # copy, whatever the tile width); the < block leftover columns are searched plainly
    bmax = s.as_strided((r, block, nb), (s.stride(0), nb, 1)).amax(dim=1)
    bi = torch.topk(bmax, kk, dim=1, largest=True, sorted=False)[1]
    cols = (bi.unsqueeze(1) + lanes * nb).reshape(r, -1)
    v, j = torch.topk(torch.gather(s, 1, cols), kk, dim=1, largest=True, sorted=False)
    i = torch.gather(cols, 1, j)
    if w > nb * block:
        vt, it = torch.topk(s[:, nb * block:], min(kk, w - nb * block), dim=1, largest=True, sorted=False)
        v, i = torch.cat((v, vt), dim=1), torch.cat((i, it + nb * block), dim=1)
        v, j = torch.topk(v, kk, dim=1, largest=True, sorted=False)
        i = torch.gather(i, 1, j)
    return v, i


def merge_topk(best_v, best_i, v, i, kk: int):
    """The running top-``kk`` after one more tile's candidates (``best_v`` None: the first tile's)."""
    if best_v is None:
        return v, i
    cv, ci = torch.cat((best_v, v), dim=1), torch.cat((best_i, i), dim=1)
    best_v, j = torch.topk(cv, min(kk, cv.shape[1]), dim=1, largest=True, sorted=False)
    return best_v, torch.gather(ci, 1, j)


def tiled_topk(q: torch.Tensor, table: torch.Tensor, k: int, *, tile: int = 65536,
               col_ids: np.ndarray | None = None, disallowed: torch.Tensor | None = None,
               excl_rows: np.ndarray | None = None, excl_cols: np.ndarray | None = None,
               pad_row0: bool = True, block: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Running top-``k`` over the columns of ``table`` (M, d) for queries ``q`` (R, d).

    ``col_ids`` maps columns to item ids (identity when ``None``, then column 0 is the padding
    row and is masked if ``pad_row0``); ``disallowed`` is a bool tensor ``(M,)`` or ``(R, M)`` of
    columns to mask; ``excl_rows``/``excl_cols`` are (row, column) pairs to mask, sorted by column.
    ``block`` > 1 enables block-max pruning when ``4 * k * block <= tile``: the tile's scores are
    grouped into strided blocks of ``block`` columns, and only the ``k`` blocks with the largest
    maxima are searched (they hold the tile's top-k: each top-k score lies in a block whose max is
    >= the k-th score, and at most k blocks have such a max), which cuts the selection work.
    Returns numpy ``int64 (R, min(k, M))`` item ids and ``float32`` scores, sorted descending;
    masked slots (score ``-inf``) get id -1.
    """
    r, m = q.shape[0], table.shape[0]
    kk = min(k, m)
    tile = max(int(tile), 1)
    q = q.to(table.dtype) if table.dtype != torch.float32 and q.is_cuda else q.float()
    buf = torch.empty((r, tile), dtype=torch.float32, device=table.device) if (table.dtype == torch.float32 and m > tile) else None
    bounds = None
    if excl_cols is not None and excl_cols.size:
        starts = np.arange(0, m, tile)
        bounds = np.searchsorted(excl_cols, np.append(starts, m))
        er_t = torch.from_numpy(np.ascontiguousarray(excl_rows, dtype=np.int64)).to(table.device)
        ec_t = torch.from_numpy(np.ascontiguousarray(excl_cols, dtype=np.int64)).to(table.device)
    use_blocks = block > 1 and 4 * kk * block <= tile
    lanes = torch.arange(block, device=table.device).view(1, block, 1) if use_blocks else None
    best_v = best_i = None
    neg_inf = float("-inf")
    for n_t, s0 in enumerate(range(0, m, tile)):
        s1 = min(m, s0 + tile)
        s = score_tile(q, table[s0:s1], buf if (buf is not None and s1 - s0 == tile) else None)
        if pad_row0 and col_ids is None and s0 == 0:
            s[:, 0] = neg_inf
        if disallowed is not None:
            s.masked_fill_(disallowed[..., s0:s1], neg_inf)
        if bounds is not None and bounds[n_t + 1] > bounds[n_t]:
            lo, hi = int(bounds[n_t]), int(bounds[n_t + 1])
            s[er_t[lo:hi], ec_t[lo:hi] - s0] = neg_inf
        v, i = select_tile_topk(s, kk, lanes if use_blocks else None)
        best_v, best_i = merge_topk(best_v, best_i, v, i + s0, kk)
    best_v, j = torch.sort(best_v, dim=1, descending=True, stable=True)
    best_i = torch.gather(best_i, 1, j)
    vals = best_v.float().cpu().numpy()
    idx = best_i.cpu().numpy().astype(np.int64, copy=False)
    if col_ids is not None:
        idx = np.asarray(col_ids, dtype=np.int64)[idx]
    idx = np.where(np.isneginf(vals), -1, idx)
    return idx, vals


def tiled_topk_filtered(queries: np.ndarray, table: np.ndarray | torch.Tensor, k: int, filters: Filters | None, *,
                        tile: int = 16384, subset_fraction: float = 0.25, block: int = 16,
                        device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Exact filtered top-``k`` (``(R, k)``, padded with -1/-inf) of ``queries`` over ``table`` (N + 1, d).

    ``table`` is a numpy array (CPU) or a tensor already on ``device``.  When the union of the
    allowed masks covers fewer than ``subset_fraction`` of the items, only those rows are scored.
    """
    tab = table if isinstance(table, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(table, np.float32))
    dev = tab.device
    q = torch.from_numpy(np.ascontiguousarray(queries, np.float32)).to(dev)
    r = q.shape[0]
    n = tab.shape[0] - 1
    col_ids = None
    disallowed = None
    er = ec = None
    if filters is not None:
        allowed = filters.allowed
        er, ec = filters.excl_rows, filters.excl_items
        if allowed is not None:
            union = allowed if allowed.ndim == 1 else allowed.any(axis=0)
            cols = np.flatnonzero(union)
            if cols.size == 0:
                return np.full((r, k), -1, np.int64), np.full((r, k), -np.inf, np.float32)
            if cols.size < subset_fraction * n:
                col_ids = cols
                cols_t = torch.from_numpy(cols).to(dev)
                tab = tab.index_select(0, cols_t)
                if allowed.ndim == 2:
                    disallowed = torch.from_numpy(~allowed[:, cols]).to(dev)
                if er.size:  # excluded items are allowed ones (Filters drops the rest): map to columns
                    ec = np.searchsorted(cols, ec)
            else:
                disallowed = torch.from_numpy(~allowed).to(dev)
    idx, vals = tiled_topk(q, tab, k, tile=tile, col_ids=col_ids, disallowed=disallowed, excl_rows=er, excl_cols=ec,
                           block=block)
    if idx.shape[1] < k:
        idx, vals = pad_results(idx, vals, k)
    return idx, vals
