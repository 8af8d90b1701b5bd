"""The request forms inside the engine: one request as a user writes it (:class:`Request`), one checked row
(:class:`Row`: what ``Engine.validate_request`` returns) and a checked batch as columns (:class:`Columns`:
what every entry point turns its input into and the stage pipeline runs).

A :class:`Columns` holds no Python object per request besides the prompt strings and filter keys the caller
handed in: the histories are one int64 array of catalogue indices with ``B + 1`` offsets, ``k`` and
``exclude_history`` are arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import numpy as np


@dataclass
class Request:
    """One recommendation request (what :class:`~dpr.engine.batcher.DynamicBatcher` takes; a dict with
    these keys works too)."""
    history: Sequence
    prompt: Any = None
    negative_prompt: Any = None
    k: int = 10
    exclude_history: bool = True
    hard_filter: Any = None


class Row(NamedTuple):
    """One checked request: ``seq`` its full known history as catalogue indices (chronological)."""
    seq: np.ndarray
    prompt: str | None
    negative: str | None
    k: int
    exclude_history: bool
    filter_key: tuple | None


def offsets_of(lens) -> np.ndarray:
    """(B + 1,) int64 row offsets of rows of these lengths, from 0."""
    out = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=out[1:])
    return out


def flatten(seqs) -> tuple[np.ndarray, np.ndarray]:
    """Rows of item indices as one int64 array and its row offsets."""
    seqs = [np.asarray(s, dtype=np.int64).reshape(-1) for s in seqs]
    flat = np.concatenate(seqs) if seqs else np.zeros(0, np.int64)
    return flat, offsets_of([len(s) for s in seqs])


@dataclass
class Columns:
    """A checked batch, column by column. Row ``i``'s history is ``flat[offsets[i]:offsets[i + 1]]``
    (catalogue indices 1..N, oldest first)."""
    flat: np.ndarray               # int64, every row's history concatenated
    offsets: np.ndarray            # (B + 1,) int64
    prompts: list                  # (B,) checked str | None
    negatives: list
    ks: np.ndarray                 # (B,) int64, each in 1..N
    exclude_history: np.ndarray    # (B,) bool
    filter_keys: list              # (B,) checked filter key | None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def kmax(self) -> int:
        return int(self.ks.max())

    def row(self, i: int) -> Row:
        o = self.offsets
        return Row(self.flat[o[i]:o[i + 1]], self.prompts[i], self.negatives[i], int(self.ks[i]),
                   bool(self.exclude_history[i]), self.filter_keys[i])

    def __iter__(self):
        """Row views, made on demand (for debugging and tests; the pipeline never iterates rows)."""
        return (self.row(i) for i in range(len(self)))

    def select(self, rows) -> "Columns":
        """The batch of these rows, in this order."""
        rows = np.asarray(rows, dtype=np.int64)
        lens = np.diff(self.offsets)[rows]
        starts = self.offsets[rows]
        take = np.repeat(starts - offsets_of(lens)[:-1], lens) + np.arange(int(lens.sum()))
        r = rows.tolist()
        return Columns(self.flat[take], offsets_of(lens), [self.prompts[i] for i in r],
                       [self.negatives[i] for i in r], self.ks[rows], self.exclude_history[rows],
                       [self.filter_keys[i] for i in r])

    @classmethod
    def from_rows(cls, rows: Sequence[Row]) -> "Columns":
        flat, offsets = flatten([r.seq for r in rows])
        return cls(flat, offsets, [r.prompt for r in rows], [r.negative for r in rows],
                   np.array([r.k for r in rows], dtype=np.int64),
                   np.array([r.exclude_history for r in rows], dtype=bool), [r.filter_key for r in rows])
