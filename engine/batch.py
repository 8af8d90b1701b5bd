"""The columnar batch API: a whole batch in, a whole batch out, as numpy columns.

    from dpr.engine import Engine, RequestBatch
    batch = RequestBatch.from_ids(["1193", "661", "914"], offsets=[0, 2, 3],
                                  prompts=["more comedy", None], k=10)
    res = engine.recommend_batch(batch)
    res.indices, res.scores, res.counts          # (B, k) int64, (B, k) float32, (B,) int64
    res.ids, res.titles, res.tags                # per-row lists, looked up on first use

:class:`RequestBatch` holds the histories as one flat array plus ``B + 1`` row offsets (row ``i`` is
``flat[offsets[i]:offsets[i + 1]]``, oldest first), either original item ids (:meth:`RequestBatch.from_ids`)
or catalogue indices already mapped (``1..N``, :meth:`RequestBatch.from_indices`; index ``i`` is
``engine.item_ids[i - 1]``). Prompt columns are length-``B`` sequences of str or None (or None for the whole
column); ``k`` and ``exclude_history`` are one value for the whole batch (an int, a bool) or a length-``B``
column of them (ints, bools: never coerced, a wrong type is an error naming the row); ``hard_filter`` is None,
one dict shared by every row or a length-``B`` list of dicts/None (the format ``Engine.recommend`` takes).

:meth:`Engine.recommend_batch` checks the batch once, column by column (an ``InputError`` names the row and
what is wrong), runs it through the same pipeline as ``Engine.recommend`` and returns a :class:`ResultBatch`.
Its arrays are plain C-contiguous, writable numpy arrays owned by the result: ``torch.from_numpy`` and
``np.from_dlpack`` / ``__dlpack__`` take them without a copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Sequence

import numpy as np

ID_FORMS = ("ids", "indices")


@dataclass
class RequestBatch:
    """A batch of requests as columns (see the module docstring). Build it with :meth:`from_ids` or
    :meth:`from_indices`; ``form`` says which the flat array holds (``"ids"`` or ``"indices"``).
    Nothing is checked here: :meth:`Engine.recommend_batch` checks the whole batch against its catalogue."""
    flat: Any                          # (total,) item ids (str) or catalogue indices (int, 1..N)
    offsets: Any                       # (B + 1,) int64, monotonic, offsets[0] == 0, offsets[-1] == len(flat)
    form: str = "ids"                  # "ids" | "indices"
    prompts: Sequence | None = None    # (B,) str | None per row, or None: no prompts
    negative_prompts: Sequence | None = None
    k: Any = 10                        # int for every row | (B,) ints
    exclude_history: Any = True        # bool for every row | (B,) bools
    hard_filter: Any = None            # None | one dict for every row | (B,) list of dicts / None

    @classmethod
    def from_ids(cls, flat_ids, offsets, prompts=None, negative_prompts=None, k: int = 10,
                 exclude_history: bool = True, hard_filter=None) -> "RequestBatch":
        """Histories as original item ids (strings; a numpy ``str``/object array or a list)."""
        return cls(flat_ids, offsets, "ids", prompts, negative_prompts, k, exclude_history, hard_filter)

    @classmethod
    def from_indices(cls, flat_idx, offsets, prompts=None, negative_prompts=None, k: int = 10,
                     exclude_history: bool = True, hard_filter=None) -> "RequestBatch":
        """Histories as catalogue indices already mapped: integers ``1..N`` (``engine.item_ids[i - 1]``)."""
        return cls(flat_idx, offsets, "indices", prompts, negative_prompts, k, exclude_history, hard_filter)

    @classmethod
    def from_histories(cls, histories, prompts=None, negative_prompts=None, k: int = 10,
                       exclude_history: bool = True, hard_filter=None) -> "RequestBatch":
        """Lists of item ids (what ``Engine.recommend`` takes) flattened into columns."""
        lens = [len(h) for h in histories]
        offsets = np.zeros(len(lens) + 1, np.int64)
        np.cumsum(lens, out=offsets[1:])
        flat = [x for h in histories for x in h]
        return cls.from_ids(flat, offsets, prompts, negative_prompts, k, exclude_history, hard_filter)

    def __len__(self) -> int:
        return max(0, len(self.offsets) - 1)


@dataclass(eq=False)
class ResultBatch:
    """A batch's results as columns. ``indices`` (B, k) int64 catalogue indices, best first (index ``i`` is
    ``engine.item_ids[i - 1]``); a row with fewer than its ``k`` eligible items is padded with index **0** and
    score ``-inf`` after its ``counts[i]`` results. ``scores`` (B, k) float32, ``counts`` (B,) int64.
    ``short_reasons[i]`` says why row ``i`` is short (None when full). ``ids`` / ``titles`` / ``tags``: per-row
    lists of the ``counts[i]`` results, looked up from ``indices`` on first use. With a per-row ``k`` column,
    ``k`` is the largest and ``ks`` (B,) holds each row's (rows asking for fewer are padded after them)."""
    indices: np.ndarray
    scores: np.ndarray
    counts: np.ndarray
    k: int
    short_reasons: list = field(default_factory=list)
    _ids: np.ndarray = field(default=None, repr=False)      # the engine's object arrays, for the lookups
    _titles: np.ndarray = field(default=None, repr=False)
    _tags: np.ndarray = field(default=None, repr=False)
    ks: np.ndarray | None = None       # (B,) int64 per-row k, when the batch had a k column

    def __len__(self) -> int:
        return len(self.counts)

    @property
    def short_rows(self) -> list[int]:
        """The rows that got fewer than ``k`` items."""
        return np.flatnonzero(self.counts < (self.k if self.ks is None else self.ks)).tolist()

    def _lookup(self, table: np.ndarray) -> list[list]:
        pos = self.indices - 1
        if len(self.counts) and (self.counts == self.indices.shape[1]).all():
            return table[pos].tolist()
        return [table[pos[i, :c]].tolist() for i, c in enumerate(self.counts.tolist())]

    @cached_property
    def ids(self) -> list[list[str]]:
        return self._lookup(self._ids)

    @cached_property
    def titles(self) -> list[list[str]]:
        return self._lookup(self._titles)

    @cached_property
    def tags(self) -> list[list[list[str]]]:
        return [[list(t) for t in row] for row in self._lookup(self._tags)]
