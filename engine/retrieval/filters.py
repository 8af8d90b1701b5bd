"""The filters of one search: exclusion lists and allowed masks, validated once per batch.

:class:`Exclusions` is every row's exclusion list in one array (what the engine passes);
:meth:`Filters.build` checks ``exclude``/``allowed_mask`` against the catalogue and keeps the
(row, item) pairs to exclude in the forms the retrievers need. :func:`pad_results` pads rows with fewer
than ``k`` eligible items (index -1, score -inf). The contract is in :mod:`dpr.engine.retrieval.base`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

import numpy as np

from dpr.errors import InputError

__all__ = ["Exclusions", "Filters", "pad_results"]


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
            # one vectorised pass over the whole batch (a per-row np.unique is a Python loop over the rows)
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
