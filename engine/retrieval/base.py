"""Common interface of the exact top-k retrievers, input checks and exact filtering.

Conventions shared by every retriever
-------------------------------------
* ``item_embeddings`` is a float array of shape ``(N + 1, d)``.  Row 0 is padding and is never
  returned; the catalogue's items are the indices ``1..N``.
* ``search(queries (B, d), k, exclude=None, allowed_mask=None)`` returns ``(indices, scores)``:
  ``int64 (B, k)`` and ``float32 (B, k)``, scores are dot products, sorted descending (ties are
  broken by the lower index where the backend makes that practical: ONNX Runtime and numpy do,
  torch's ``topk`` does not promise it).
* ``exclude[b]``: item indices row ``b`` must never get (the user's history). Index 0 is ignored;
  indices outside ``0..N`` are an error. ``exclude`` may also be an :class:`Exclusions` (all rows'
  lists in one array with offsets: what the engine passes, no per-row arrays to walk).
* ``allowed_mask``: bool ``(N + 1,)`` (shared by all rows) or ``(B, N + 1)`` (one per row); only
  items whose entry is true may be returned.
* Filtering is EXACT: exactly ``k`` results come back whenever ``k`` eligible items exist.  When
  fewer than ``k`` items are eligible (or ``k > N``), the tail of the row is padded with index
  ``-1`` and score ``-inf``.  (The engine checks ``k <= N`` before calling; the retrievers accept
  ``1 <= k <= max_k``, N plus max(N, 1024) padding columns, and pad: an enormous k is an InputError, not a
  k-column allocation.)

How filters are made exact
--------------------------
Backends that score the whole catalogue in one call (ONNX Runtime, faiss) implement
``_fetch(queries, kk)``, an unfiltered top-``kk``.  :meth:`Retriever._search_filtered` over-fetches
``kk = k + min(len(exclude[b]), overfetch)`` (scaled up by the inverse density of the allowed mask),
drops the ineligible candidates with vectorised numpy, and re-fetches the rows still short of ``k``
alone, with ``kk >= k + len(exclude[b])`` (enough whenever no allowed mask thins the catalogue).  Rows whose allowed mask is restrictive (fewer than ``subset_fraction`` of the items
allowed) or that would need more than ``max_fetch`` candidates skip the over-fetch: their allowed
items are scored directly by the tiled torch kernel with the filters applied *before* selection
(:func:`dpr.engine.retrieval.exact_topk.tiled_topk_filtered`), which is exact by construction.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dpr.errors import DPRError, InputError

from .exact_topk import tiled_topk_filtered
from .filters import Exclusions, Filters, pad_results  # re-exported: callers import them from here

__all__ = ["Retriever", "Filters", "Exclusions", "DeviceError", "pad_results"]


class DeviceError(DPRError, RuntimeError):
    """The requested device (e.g. ``cuda``) is not usable by this retriever on this machine."""


class Retriever:
    """Exact maximum-inner-product top-k over an item table; subclasses provide the scoring.

    Parameters: ``item_embeddings`` float ``(N + 1, d)`` (row 0 = padding); ``device`` ``"cpu"``
    or ``"cuda"``/``"cuda:i"``; ``dtype`` of the table on the device (``"float32"`` unless the
    subclass documents more); ``subset_fraction`` (0.25): rows whose allowed mask keeps fewer than
    this fraction of the catalogue are scored on the allowed subset directly; ``max_fetch``
    (4096): the largest over-fetch tried before falling back to exact subset scoring; ``overfetch``
    (16): extra candidates of the first pass for rows with exclusions (rows left short are re-fetched);
    ``exact_tile`` (65536): tile of the exact fallback kernel.
    """

    name = "base"
    supported_dtypes: tuple[str, ...] = ("float32",)
    #: what the retriever chose for itself at construction and why (e.g. the fused kernel's int8 screen), or
    #: None; the engine appends it to its ``choice_reason``
    setup_note: str | None = None

    def __init__(self, item_embeddings: np.ndarray, *, device: str = "cpu", dtype: Any = "float32",
                 subset_fraction: float = 0.25, max_fetch: int = 4096, exact_tile: int = 65536,
                 overfetch: int = 16, **options: Any) -> None:
        if options:
            raise InputError(f"{type(self).__name__} got unknown option(s): {', '.join(sorted(options))}")
        table = np.asarray(item_embeddings)
        if table.ndim != 2 or table.shape[0] < 2 or table.shape[1] < 1:
            raise InputError(
                f"item_embeddings must have shape (N + 1, d) with N >= 1 items (row 0 = padding), got {table.shape}"
            )
        if table.dtype.kind != "f":
            raise InputError(f"item_embeddings must be a float array, got dtype {table.dtype}")
        table = np.ascontiguousarray(table, dtype=np.float32)
        if not np.isfinite(table[1:]).all():
            raise InputError("item_embeddings holds NaN or infinite values")
        self.table = table
        self.num_items = table.shape[0] - 1
        self.dim = table.shape[1]
        self.device = self._normalise_device(device)
        self.dtype = self._normalise_dtype(dtype)
        if not 0.0 <= subset_fraction <= 1.0:
            raise InputError(f"subset_fraction must be in [0, 1], got {subset_fraction}")
        self.subset_fraction = float(subset_fraction)
        self.max_fetch = int(max_fetch)
        self.exact_tile = int(exact_tile)
        self.overfetch = int(overfetch)
        if self.overfetch < 0:
            raise InputError(f"overfetch must be >= 0, got {overfetch}")
        if self.max_fetch < 1 or self.exact_tile < 1:
            raise InputError("max_fetch and exact_tile must be >= 1")

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _normalise_device(device: Any) -> str:
        dev = str(device).lower()
        if dev == "gpu":
            dev = "cuda"
        if dev != "cpu" and not (dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise InputError(f"device must be 'cpu', 'cuda' or 'cuda:<index>', got {device!r}")
        return dev

    @property
    def device_index(self) -> int:
        return int(self.device.split(":", 1)[1]) if ":" in self.device else 0

    def _normalise_dtype(self, dtype: Any) -> str:
        name = str(dtype).replace("torch.", "").replace("numpy.", "")
        name = {"fp32": "float32", "fp16": "float16", "half": "float16", "float": "float32", "bf16": "bfloat16",
                "<class 'float32'>": "float32"}.get(name, name)
        try:
            if name not in ("bfloat16",):
                name = np.dtype(name).name
        except TypeError:
            pass
        if name not in self.supported_dtypes:
            raise InputError(f"{type(self).__name__} supports dtype {self.supported_dtypes}, got {dtype!r}")
        return name

    def _check_queries(self, queries: Any) -> np.ndarray:
        if hasattr(queries, "detach") and not isinstance(queries, np.ndarray):  # torch tensor, any device
            queries = queries.detach().float().cpu().numpy()
        try:
            q = np.asarray(queries)
        except Exception as exc:  # pragma: no cover - exotic inputs
            raise InputError(f"queries must be an array of shape (B, {self.dim})") from exc
        if q.ndim == 1 and q.shape[0] == self.dim:
            raise InputError(f"queries must be 2-D (B, {self.dim}); for one query pass queries[None, :]")
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise InputError(f"queries must have shape (B, {self.dim}) to match the item table, got {q.shape}")
        if q.dtype.kind not in "fiu":
            raise InputError(f"queries must be numeric, got dtype {q.dtype}")
        q = np.ascontiguousarray(q, dtype=np.float32)
        if not np.isfinite(q).all():
            bad = np.flatnonzero(~np.isfinite(q).all(axis=1))
            raise InputError(f"queries hold NaN or infinite values (rows {bad[:8].tolist()})")
        return q

    def _check_k(self, k: Any) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise InputError(f"k must be an integer >= 1, got {k!r}")
        if k < 1:
            raise InputError(f"k must be >= 1, got {k}")
        if k > self.max_k:
            raise InputError(f"k={k} is far beyond the catalogue ({self.num_items} items): at most {self.max_k} "
                             f"(the answer is padded to k columns, so an enormous k would allocate them)")
        return int(k)

    @property
    def max_k(self) -> int:
        """The largest k ``search`` takes: the catalogue plus as many padding columns (at least 1,024)."""
        return self.num_items + max(self.num_items, 1024)

    # ------------------------------------------------------------------ public API
    def search(self, queries: np.ndarray, k: int, exclude: Any = None,
               allowed_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items per query row; see the module docstring for the contract."""
        q = self._check_queries(queries)
        k = self._check_k(k)
        filters = Filters.build(q.shape[0], self.num_items, exclude, allowed_mask)
        if q.shape[0] == 0:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        idx, sc = self._search(q, min(k, self.num_items), filters)
        idx = np.ascontiguousarray(idx, dtype=np.int64)
        sc = np.ascontiguousarray(sc, dtype=np.float32)
        return pad_results(idx, sc, k)

    __call__ = search

    def close(self) -> None:
        """Release backend resources (sessions, GPU memory); the object is unusable afterwards."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(items={self.num_items}, d={self.dim}, device={self.device!r}, dtype={self.dtype!r})"

    # ------------------------------------------------------------------ backend hooks
    def _search(self, q: np.ndarray, kk: int, filters: "Filters | None") -> tuple[np.ndarray, np.ndarray]:
        """Checked queries, ``1 <= kk <= N``, validated filters -> top-``kk`` (may be padded with -1 / -inf).
        Default: an unfiltered ``_fetch``, or exact filtering by over-fetch (``_search_filtered``)."""
        if filters is None:
            return self._fetch(q, kk)
        return self._search_filtered(q, kk, filters)

    def _fetch(self, queries: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        """Unfiltered top-``kk`` (``1 <= kk <= N``) over items ``1..N``, sorted descending."""
        raise NotImplementedError

    def _exact(self, queries: np.ndarray, k: int, filters: "Filters | None") -> tuple[np.ndarray, np.ndarray]:
        """Exact filtered top-``k`` by the tiled torch kernel on the CPU float32 table."""
        return tiled_topk_filtered(queries, self.table, k, filters, tile=self.exact_tile,
                                   subset_fraction=self.subset_fraction)

    # ------------------------------------------------------------------ exact filtering by over-fetch
    def _search_filtered(self, q: np.ndarray, k: int, f: Filters) -> tuple[np.ndarray, np.ndarray]:
        n = self.num_items
        b = q.shape[0]
        out_i = np.full((b, k), -1, dtype=np.int64)
        out_s = np.full((b, k), -np.inf, dtype=np.float32)
        need = np.minimum(k, np.maximum(f.eligible_count, 0))
        density = f.allowed_count / max(n, 1)
        subset_rows = density < self.subset_fraction
        # over-fetch estimate per row: k + excluded, scaled by the inverse mask density, with slack
        est = np.ceil((k + f.excl_count) / np.maximum(density, 1e-12) * (1.0 if f.allowed is None else 1.5))
        est = est + np.where(f.allowed is None, 0, 16)
        subset_rows |= est > self.max_fetch
        todo = np.flatnonzero(~subset_rows & (need > 0))
        # The first pass fetches only ``overfetch`` extra candidates, not one per excluded item: most of a
        # user's history is not in its top-k, and top-k cost grows with k (docs/ARCHITECTURE.md, "Measurements
        # behind the defaults"). Rows left short are re-fetched alone with the full estimate, so the
        # result stays exact; the re-fetch touches only those rows.
        first = np.minimum(est, np.ceil((k + np.minimum(f.excl_count, self.overfetch))
                                         / np.maximum(density, 1e-12)))
        kk = int(min(n, first[todo].max())) if todo.size else 0
        while todo.size:
            idx, sc = self._fetch(q[todo], kk)
            ok = f.eligible(todo, idx)
            cnt = ok.sum(axis=1)
            done = (cnt >= need[todo]) | (kk >= n)
            if done.any():
                rows = todo[done]
                okd, idd, scd = ok[done], idx[done], sc[done]
                order = np.argsort(~okd, axis=1, kind="stable")[:, :k]
                sel_ok = np.take_along_axis(okd, order, 1)
                out_i[rows, : order.shape[1]] = np.where(sel_ok, np.take_along_axis(idd, order, 1), -1)
                out_s[rows, : order.shape[1]] = np.where(sel_ok, np.take_along_axis(scd, order, 1), -np.inf)
            todo = todo[~done]
            if todo.size:
                if kk >= self.max_fetch:
                    subset_rows[todo] = True
                    break
                kk = int(min(n, max(kk * 2, 2 * k, est[todo].max())))
        rows = np.flatnonzero(subset_rows & (need > 0))
        if rows.size:
            idx, sc = self._exact(q[rows], k, f.subset(rows))
            out_i[rows] = idx
            out_s[rows] = sc
        return out_i, out_s
