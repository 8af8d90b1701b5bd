"""Chunk planning: how a batch's prompts and histories are cut into the calls the backend runs, and the
thread pool that runs several chunks at once.

* Prompts: ordered by token length, each chunk at most ``prompt_chunk_tokens`` tokens (rows x the chunk's
  longest prompt), cut to its own longest prompt (less padding, activations that stay in cache).
* Histories: with a padding-invariant backbone (SASRec), ordered by length, ``history_chunk_rows`` rows per
  chunk, each cut to its longest history.
* A backend whose calls each run on one thread (ONNX Runtime on the CPU, ``concurrent_runs`` > 1): that many
  chunks at once on the engine's pool, and a small batch split so that every worker gets rows.
"""

from __future__ import annotations

import itertools
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dpr.errors import DPRError, InputError

# Prompts are encoded in chunks of similar length, each at most this many (rows x longest-row) tokens.
# "auto": on the CPU, 1024 (less padding, activations stay in cache: ~1.4-1.6x on MiniLM, 2 cores); on a
# GPU, one padded batch (many small chunks are launch-bound there: 3.6x slower on an H200).
DEFAULT_PROMPT_CHUNK_TOKENS = "auto"
CPU_PROMPT_CHUNK_TOKENS = 1024
# With a backend that runs several chunks at once (concurrent_runs > 1), smaller chunks: MiniLM on 640
# unique prompts, 2 cores, two chunks at a time: 771 ms at 1024 tokens, 721 ms at 512 (int8: 258 -> 239).
CPU_CONCURRENT_PROMPT_CHUNK_TOKENS = 512
# Histories are run in chunks of this many rows, ordered by length, each cut to its longest history, when
# the backend allows it (padding-invariant backbone, graph with a dynamic history axis). "auto": 64 on the
# CPU (SASRec user encoder at batch 512, median history 30 of max_len 50, 2 cores: 46 ms uncut -> 26 ms in
# chunks of 256 -> 13 ms in chunks of 64 run two at a time; serially 64 and 256 rows tie); off on a GPU (not
# measured there).
DEFAULT_HISTORY_CHUNK_ROWS = "auto"
CPU_HISTORY_CHUNK_ROWS = 64


def chunk_setting(name: str, v, device: str, cpu_default: int) -> int:
    """A chunking knob: ``"auto"`` (``cpu_default`` on the CPU, 0 = off on a GPU), None/0 (off) or a count."""
    if v is None:
        return 0
    if isinstance(v, str) and v == "auto":
        return 0 if str(device).startswith("cuda") else cpu_default
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise InputError(f"{name} must be 'auto', a non-negative integer or None, got {v!r}")
    if v < 0:
        raise InputError(f"{name} must be >= 0 (0 or None: off), got {v}")
    return int(v)


def history_chunk_rows_setting(v, device: str) -> int:
    return chunk_setting("history_chunk_rows", v, device, CPU_HISTORY_CHUNK_ROWS)


def prompt_chunk_tokens_setting(v, device: str, workers: int = 1) -> int:
    return chunk_setting("prompt_chunk_tokens", v, device,
                         CPU_CONCURRENT_PROMPT_CHUNK_TOKENS if workers > 1 else CPU_PROMPT_CHUNK_TOKENS)


def prompt_chunks(mask: np.ndarray, budget: int, max_batch: int, workers: int):
    """Chunks of a tokenized batch: ``(rows, lo, hi)`` per chunk, ``rows`` indices into the batch, ``[lo,
    hi)`` the token columns any of them uses (the tokenizer pads to the batch's longest prompt; a chunk only
    needs its own longest). With a token ``budget``: length buckets (rows ordered by token length, stable),
    at most that many tokens (rows x longest) and ``max_batch`` rows, at least one row. Without (0):
    consecutive runs of ``max_batch`` rows in the batch's order. With several workers, at most
    ceil(rows / workers) rows per chunk, so that a small batch still keeps every worker busy."""
    lens = mask.sum(axis=1)
    n = len(lens)
    cap = min(max_batch, max(1, math.ceil(n / workers)))
    order = np.argsort(lens, kind="stable") if budget else np.arange(n)
    start = 0
    while start < n:
        end = min(n, start + cap) if not budget else start + 1
        # ascending lengths: adding row `end` makes it the chunk's longest
        while budget and end < n and end - start < cap and (end - start + 1) * int(lens[order[end]]) <= budget:
            end += 1
        rows = order[start:end]
        used = np.flatnonzero(mask[rows].any(axis=0))
        lo, hi = (int(used[0]), int(used[-1]) + 1) if used.size else (0, 1)
        yield rows, lo, hi
        start = end


def history_chunks(seq: np.ndarray, trims: bool, rows_per_chunk: int, max_batch: int, workers: int):
    """``(rows, width)`` per chunk of a left-padded (B, max_len) history batch. Trimming (``trims``): rows
    ordered by history length (stable), ``rows_per_chunk`` (and at most ``max_batch``) per chunk, ``width``
    the chunk's longest history (>= 1), measured from the first non-padding column so that a history with a 0
    inside is never cut; a batch small enough for one chunk per worker is cut where the work is even
    (:func:`balanced_cuts`: fewer rows in the chunk of long histories). Otherwise consecutive rows at full
    width: ``max_batch`` per chunk, or with several workers ``rows_per_chunk`` (when set). Several workers: at
    most ceil(rows / workers) rows per chunk, but for the balanced cut."""
    n, max_len = seq.shape
    spread = max(1, math.ceil(n / workers))
    if not trims:
        step = rows_per_chunk if workers > 1 and rows_per_chunk else max_batch
        step = max(1, min(step, max_batch, spread))
        for s in range(0, n, step):
            yield slice(s, min(s + step, n)), max_len
        return
    nz = seq > 0
    lens = np.where(nz.any(axis=1), max_len - nz.argmax(axis=1), 0)
    order = np.argsort(lens, kind="stable")
    cap = max(1, min(rows_per_chunk, max_batch))
    if workers > 1 and spread <= cap:
        # one chunk per worker: cut where the work is even, not the rows (the long-history chunk sets the time)
        for a, b in balanced_cuts(lens[order], workers, cap):
            yield order[a:b], max(1, int(lens[order[b - 1]]))
        return
    step = max(1, min(cap, spread))
    for s in range(0, n, step):
        rows = order[s:s + step]
        yield rows, max(1, int(lens[rows].max()))


# The cost model of a user-encoder chunk: rows x (ROW_COST_POSITIONS + width), in history positions. Measured on
# the default bench model (SASRec d=64, ONNX Runtime, one thread, 2-core AMD EPYC VM): 21.5 us per row at width
# 10 and 69.5 at width 50 (64 rows), so about 1.2 us per position plus 9.5 us per row, i.e. 8 positions. With
# the cuts it gives, the user encoder on the load test's histories (two workers, medians of three alternations,
# same run) takes 0.60 / 0.83 / 1.32 / 2.46 ms at 8 / 16 / 32 / 64 rows, against 0.70 / 0.87 / 1.43 / 2.59 ms
# for chunks of equal rows; 512 rows (chunks of 64) are cut as before.
ROW_COST_POSITIONS = 8


def balanced_cuts(sorted_lens: np.ndarray, parts: int, cap: int) -> list[tuple[int, int]]:
    """``[a, b)`` ranges over ascending history lengths, at most ``parts`` of them and ``cap`` rows each,
    covering every row, whose largest ``rows x (ROW_COST_POSITIONS + longest)`` is as small as the greedy
    from the longest rows down can make it (a binary search on that cost)."""
    n = len(sorted_lens)
    if n == 0:
        return []
    if n > cap * parts:
        raise ValueError(f"{n} rows do not fit {parts} chunks of at most {cap}")
    per_row = ROW_COST_POSITIONS + np.maximum(np.asarray(sorted_lens, dtype=np.int64), 1)

    def cuts_within(limit: int):
        out, end = [], n
        while end > 0:
            take = max(1, min(cap, end, int(limit // int(per_row[end - 1]))))
            out.append((end - take, end))
            end -= take
            if len(out) > parts:
                return None
        return out[::-1]

    # at this bound every chunk may hold `cap` rows of the longest width: the equal-rows cut fits, so it is feasible
    lo, hi = 0, int(per_row[-1]) * cap
    best = cuts_within(hi)
    while lo < hi:
        mid = (lo + hi) // 2
        got = cuts_within(mid)
        if got is None:
            lo = mid + 1
        else:
            hi, best = mid, got
    return best


class ChunkRunner:
    """Runs ``fn(chunk)`` for every chunk, ``workers`` at a time: the calling thread and ``workers - 1`` threads
    of its own pool (created on first use) claim the chunks in order until none is left; one chunk, or one
    worker, runs in order on the caller's thread.

    The caller takes chunks too rather than sleeping while the pool runs them all: one thread wake-up fewer per
    call (two chunks: one hand-off, not two out and one back), which the single-request serving path, one call
    of a few rows per engine batch, pays on every batch (docs/ARCHITECTURE.md, "Measurements behind the
    defaults")."""

    def __init__(self, workers: int):
        self.workers = max(1, int(workers))
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False

    def run(self, fn, chunks: list) -> None:
        """``fn`` writes disjoint rows. Once a chunk has failed no other starts; the ones running finish before
        the error (of the first failed chunk, in order) is raised."""
        n = len(chunks)
        if self.workers <= 1 or n <= 1:
            for c in chunks:
                fn(c)
            return
        claim = itertools.count().__next__          # atomic under the GIL: each chunk is claimed once
        failed: list[tuple[int, BaseException]] = []

        def drain():
            while not failed and (i := claim()) < n:
                try:
                    fn(chunks[i])
                except BaseException as exc:  # noqa: BLE001 - re-raised below, once no chunk runs
                    failed.append((i, exc))

        with self._lock:
            if self._closed:
                raise DPRError("the engine is closed")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers - 1, thread_name_prefix="dpr-chunk")
            helpers = [self._pool.submit(drain) for _ in range(min(self.workers, n) - 1)]
        drain()
        for h in helpers:
            if not h.cancel():                      # a helper not started finds nothing left: skip its wake-up
                h.result()
        if failed:
            raise min(failed, key=lambda f: f[0])[1]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
