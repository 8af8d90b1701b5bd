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
(:func:`dpr.engine.retrieval.torch_retriever.tiled_topk_filtered`), which is exact by construction.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

import numpy as np

from dpr.errors import DPRError, InputError

__all__ = ["Retriever", "Filters", "DeviceError", "physical_cores", "pad_results"]


class DeviceError(DPRError, RuntimeError):
    """The requested device (e.g. ``cuda``) is not usable by this retriever on this machine."""


def physical_cores() -> int:
    """Number of physical cores this process may use (hyper-threads counted once)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    cores: set[tuple[str, str]] = set()
    try:
        phys = core = None
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("physical id"):
                    phys = line.split(":", 1)[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":", 1)[1].strip()
                elif not line.strip():
                    if core is not None:
                        cores.add((str(phys), core))
                    phys = core = None
    except OSError:
        pass
    return max(1, min(usable, len(cores))) if cores else max(1, usable)


def pad_results(idx: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad ``(B, k')`` results to ``(B, k)`` with index -1 and score -inf."""
    b, kk = idx.shape
    if kk >= k:
        return idx[:, :k], scores[:, :k]
    out_i = np.full((b, k), -1, dtype=np.int64)
    out_s = np.full((b, k), -np.inf, dtype=np.float32)
    out_i[:, :kk] = idx
    out_s[:, :kk] = scores
    return out_i, out_s


@dataclass(frozen=True)
class Exclusions:
    """Every row's exclusion list in one array: row ``b`` excludes ``items[offsets[b]:offsets[b + 1]]``
    (any order, repeats allowed). ``offsets`` int ``(B + 1,)`` from 0, non-decreasing, ending at
    ``len(items)``. ``rows_sorted``: each row's items are ascending. ``checked``: the maker has checked the
    arrays (offsets as above, items in ``1..N``: the engine's own batch). Either lets the fused retriever hand
    the arrays to its kernel as they are (it sorts unsorted rows itself), without building :class:`Filters`."""

    offsets: np.ndarray
    items: np.ndarray
    rows_sorted: bool = False
    checked: bool = False


@dataclass
class Filters:
    """Validated exclusion lists and allowed mask for one batch.

    ``excl_keys`` is the sorted array ``row * (N + 1) + item`` of every (row, item) pair to exclude
    (items in ``1..N``, unique per row, only items the row would otherwise be allowed), for membership
    tests and, in that order, as per-row sorted lists (:meth:`excl_lists`); ``excl_rows``/``excl_items``
    are the same pairs sorted by item (computed when first asked for); ``allowed`` is ``None``, a shared
    ``(N + 1,)`` or a per-row ``(B, N + 1)`` bool array with entry 0 forced false.
    """

    num_rows: int
    num_items: int
    excl_keys: np.ndarray
    excl_count: np.ndarray  # (B,) excluded items per row that would otherwise be allowed
    allowed: np.ndarray | None
    allowed_count: np.ndarray  # (B,) allowed items per row in 1..N
    eligible_count: np.ndarray  # (B,) items a row may receive

    @property
    def shared_mask(self) -> bool:
        return self.allowed is not None and self.allowed.ndim == 1

    @cached_property
    def _pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows, items) of ``excl_keys``, in key order (by row, then item)."""
        return np.divmod(self.excl_keys, self.num_items + 1)

    @cached_property
    def _by_item(self) -> tuple[np.ndarray, np.ndarray]:
        rows, items = self._pairs
        order = np.argsort(items, kind="stable")
        return rows[order], items[order]

    @property
    def excl_rows(self) -> np.ndarray:
        return self._by_item[0]

    @property
    def excl_items(self) -> np.ndarray:
        return self._by_item[1]

    def excl_lists(self) -> tuple[np.ndarray, np.ndarray]:
        """``(offsets (B + 1,), items)``: row ``b``'s exclusions ``items[offsets[b]:offsets[b + 1]]``, sorted."""
        rows, items = self._pairs
        return np.searchsorted(rows, np.arange(self.num_rows + 1)), items

    @classmethod
    def build(cls, num_rows: int, num_items: int, exclude: Any, allowed_mask: Any) -> "Filters | None":
        """Validate ``exclude``/``allowed_mask``; ``None`` when there is nothing to filter."""
        n1 = num_items + 1
        allowed = None
        if allowed_mask is not None:
            allowed = np.asarray(allowed_mask)
            if allowed.dtype != np.bool_:
                if allowed.dtype.kind not in "biu":
                    raise InputError(f"allowed_mask must be a bool array, got dtype {allowed.dtype}")
                allowed = allowed != 0
            if allowed.shape not in ((n1,), (num_rows, n1)):
                raise InputError(
                    f"allowed_mask must have shape ({n1},) or ({num_rows}, {n1}) "
                    f"(catalogue of {num_items} items plus padding row 0), got {allowed.shape}"
                )
            allowed = allowed.copy()
            allowed[..., 0] = False
        rows_l: list[int] = []
        items_l: list[np.ndarray] = []
        rows = items = None
        if isinstance(exclude, Exclusions):
            rows, items = cls._from_exclusions(num_rows, exclude)
        elif exclude is not None:
            if isinstance(exclude, np.ndarray):
                exclude = list(exclude) if exclude.ndim in (1, 2) else exclude
            if not isinstance(exclude, Sequence) or isinstance(exclude, (str, bytes)):
                raise InputError("exclude must be a list with one array-like of item indices per query row")
            if len(exclude) != num_rows:
                raise InputError(f"exclude has {len(exclude)} rows but there are {num_rows} queries")
            for b, ex in enumerate(exclude):
                if ex is None:
                    continue
                arr = np.asarray(ex)
                if arr.size == 0:
                    continue
                if arr.dtype.kind not in "iu":
                    if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
                        arr = arr.astype(np.int64)
                    else:
                        raise InputError(f"exclude[{b}] must hold integer item indices, got dtype {arr.dtype}")
                rows_l.append(b)
                items_l.append(arr.reshape(-1))
        if items_l:
            rows = np.repeat(np.asarray(rows_l, dtype=np.int64), [a.size for a in items_l])
            items = np.concatenate(items_l).astype(np.int64, copy=False)
        if items is not None and items.size:
            # one vectorised pass over the whole batch (a per-row np.unique cost ~9 ms at batch 512)
            bad = (items < 0) | (items > num_items)
            if bad.any():
                j = int(np.argmax(bad))
                raise InputError(f"exclude[{int(rows[j])}] holds item index {int(items[j])}, outside 0..{num_items}")
            keys = rows * n1 + items
            keys.sort()
            keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))]    # sorted, unique per (row, item)
            rows, items = keys // n1, keys % n1
            keep = items > 0
            rows, items = rows[keep], items[keep]
        else:
            rows = np.zeros(0, np.int64)
            items = np.zeros(0, np.int64)
        if allowed is None and not items.size:
            return None
        if allowed is not None and items.size:
            keep = allowed[items] if allowed.ndim == 1 else allowed[rows, items]
            rows, items = rows[keep], items[keep]  # excluded-and-disallowed counts once
        keys = rows * n1 + items                          # sorted: (row, item) order survives the filtering
        excl_count = np.bincount(rows, minlength=num_rows).astype(np.int64)
        if allowed is None:
            allowed_count = np.full(num_rows, num_items, dtype=np.int64)
        elif allowed.ndim == 1:
            allowed_count = np.full(num_rows, int(allowed.sum()), dtype=np.int64)
        else:
            allowed_count = allowed.sum(axis=1).astype(np.int64)
        return cls(num_rows, num_items, keys, excl_count, allowed, allowed_count, allowed_count - excl_count)

    @staticmethod
    def _from_exclusions(num_rows: int, ex: Exclusions) -> tuple[np.ndarray, np.ndarray]:
        offsets, items = np.asarray(ex.offsets), np.asarray(ex.items)
        if offsets.dtype.kind not in "iu" or items.dtype.kind not in "iu":
            raise InputError(f"Exclusions offsets and items must be integer arrays, got {offsets.dtype} / {items.dtype}")
        if offsets.shape != (num_rows + 1,) or items.ndim != 1:
            raise InputError(f"Exclusions must have {num_rows + 1} offsets and 1-D items, got offsets {offsets.shape} "
                             f"and items {items.shape}")
        if offsets[0] != 0 or offsets[-1] != items.size or (np.diff(offsets) < 0).any():
            raise InputError("Exclusions offsets must start at 0, never decrease and end at len(items)")
        rows = np.repeat(np.arange(num_rows, dtype=np.int64), np.diff(offsets))
        return rows, items.astype(np.int64, copy=False)

    def subset(self, rows: np.ndarray) -> "Filters":
        """The filters of a subset of rows, renumbered ``0..len(rows)-1``."""
        rows = np.asarray(rows, dtype=np.int64)
        remap = np.full(self.num_rows, -1, dtype=np.int64)
        remap[rows] = np.arange(rows.size)
        n1 = self.num_items + 1
        kr, ki = self._pairs
        sel = remap[kr] >= 0
        allowed = self.allowed
        if allowed is not None and allowed.ndim == 2:
            allowed = allowed[rows]
        return Filters(rows.size, self.num_items, np.sort(remap[kr[sel]] * n1 + ki[sel]), self.excl_count[rows],
                       allowed, self.allowed_count[rows], self.eligible_count[rows])

    def eligible(self, rows: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """Bool ``(R, kk)``: candidate ``idx[r, j]`` of batch row ``rows[r]`` may be returned."""
        ok = idx > 0
        safe = np.where(ok, idx, 0)
        if self.allowed is not None:
            if self.allowed.ndim == 1:
                ok &= self.allowed[safe]
            else:
                ok &= self.allowed[rows[:, None], safe]
        if self.excl_keys.size:
            keys = rows[:, None] * (self.num_items + 1) + safe
            pos = np.searchsorted(self.excl_keys, keys)
            pos = np.minimum(pos, self.excl_keys.size - 1)
            ok &= self.excl_keys[pos] != keys
        return ok


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
        from .torch_retriever import tiled_topk_filtered

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
        # user's history is not in its top-k, and top-k cost grows with k (k + 50 costs ~2x k = 10 in ONNX
        # Runtime at 10^5 items). Rows left short are re-fetched alone with the full estimate, so the
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
