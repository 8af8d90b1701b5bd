"""The dynamic batcher's queue, kept as columns: each checked request is appended to growing column buffers
(its history's catalogue indices to one int64 buffer, its length, k and exclude flag to others), so a batch
leaves the queue as :class:`Columns` in a few slices, with no Python object per request besides its Future
(and the prompt strings and filter keys it came with).

Not thread-safe on its own: the batcher holds its lock around every call.
"""

from __future__ import annotations

from array import array
from concurrent.futures import Future

import numpy as np

from .columns import Columns, Row, offsets_of

# Taken rows stay in the buffers (a head index moves past them) until they are this many and at least half
# of the buffers: then one compaction, so a long-running queue neither grows nor shifts on every batch.
_COMPACT_AT = 4096


class RequestQueue:
    def __init__(self):
        self._flat = array("q")        # every queued history, concatenated (catalogue indices)
        self._lens = array("q")
        self._ks = array("q")
        self._excl = bytearray()
        self._arrival = array("d")     # time.monotonic() of each request
        self._prompts: list = []
        self._negatives: list = []
        self._filter_keys: list = []
        self._futures: list[Future] = []
        self._head = 0                 # first queued row
        self._flat_head = 0            # its first history entry

    def __len__(self) -> int:
        return len(self._futures) - self._head

    def oldest_arrival(self) -> float:
        return self._arrival[self._head]

    def append(self, row: Row, future: Future, arrival: float) -> None:
        self._flat.frombytes(np.ascontiguousarray(row.seq, dtype=np.int64).tobytes())
        self._lens.append(len(row.seq))
        self._ks.append(row.k)
        self._excl.append(1 if row.exclude_history else 0)
        self._arrival.append(arrival)
        self._prompts.append(row.prompt)
        self._negatives.append(row.negative)
        self._filter_keys.append(row.filter_key)
        self._futures.append(future)

    def take(self, n: int) -> tuple[Columns, list[Future]]:
        """The oldest ``n`` requests as columns, and their futures (same order)."""
        h, e = self._head, self._head + n
        lens = np.frombuffer(self._lens[h:e], np.int64)            # slices of an array are copies
        total = int(lens.sum())
        flat = np.frombuffer(self._flat[self._flat_head:self._flat_head + total], np.int64)
        cols = Columns(flat, offsets_of(lens), self._prompts[h:e], self._negatives[h:e],
                       np.frombuffer(self._ks[h:e], np.int64).copy(),
                       np.frombuffer(bytes(self._excl[h:e]), np.uint8).astype(bool), self._filter_keys[h:e])
        futures = self._futures[h:e]
        self._head, self._flat_head = e, self._flat_head + total
        if self._head >= _COMPACT_AT and self._head * 2 >= len(self._futures):
            self._compact()
        elif self._head == len(self._futures):     # empty: start over without copying anything
            self.__init__()
        return cols, futures

    def _compact(self) -> None:
        h, fh = self._head, self._flat_head
        del self._flat[:fh], self._lens[:h], self._ks[:h], self._excl[:h], self._arrival[:h]
        del self._prompts[:h], self._negatives[:h], self._filter_keys[:h], self._futures[:h]
        self._head = self._flat_head = 0
