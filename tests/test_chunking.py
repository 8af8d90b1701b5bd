"""engine.chunking: a small history batch is cut into one chunk per worker where the work is even. Checked
against brute force over every contiguous cut, and as a plan every row of which runs exactly once, at a width that
keeps its whole history."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dpr.engine.chunking import ROW_COST_POSITIONS, balanced_cuts, history_chunks


def _cost(sorted_lens, a, b):
    return (b - a) * (ROW_COST_POSITIONS + max(1, int(sorted_lens[b - 1])))


def _max_cost(sorted_lens, cuts):
    return max(_cost(sorted_lens, a, b) for a, b in cuts)


def _best_by_brute_force(sorted_lens, parts, cap):
    n = len(sorted_lens)
    best = None
    for k in range(1, parts + 1):
        for inner in itertools.combinations(range(1, n), k - 1):
            bounds = (0, *inner, n)
            cuts = list(zip(bounds, bounds[1:]))
            if any(b - a > cap for a, b in cuts):
                continue
            c = _max_cost(sorted_lens, cuts)
            best = c if best is None else min(best, c)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_balanced_cuts_are_a_partition_with_the_smallest_largest_cost(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 13))
    parts = int(rng.integers(2, 4))
    cap = int(rng.integers(-(-n // parts), n + 2))          # always feasible: cap x parts >= n
    lens = np.sort(rng.integers(0, 51, size=n))
    cuts = balanced_cuts(lens, parts, cap)
    assert cuts[0][0] == 0 and cuts[-1][1] == n and len(cuts) <= parts
    assert all(a < b and b - a <= cap for a, b in cuts)
    assert all(b == c for (_, b), (c, _) in zip(cuts, cuts[1:]))        # contiguous, no row twice or lost
    assert _max_cost(lens, cuts) == _best_by_brute_force(lens, parts, cap)
    equal = -(-n // parts)
    rows_cut = [(a, min(a + equal, n)) for a in range(0, n, equal)]
    assert _max_cost(lens, cuts) <= _max_cost(lens, rows_cut)


def test_long_histories_get_the_smaller_chunk():
    lens = np.array([4] * 24 + [50] * 8)
    (a0, b0), (a1, b1) = balanced_cuts(lens, 2, 64)
    assert b1 - a1 < b0 - a0 and lens[a1] == 50               # the 50-long rows alone, the short ones together


def test_balanced_cuts_refuse_an_impossible_plan():
    assert balanced_cuts(np.array([], dtype=np.int64), 2, 4) == []
    with pytest.raises(ValueError, match="do not fit"):
        balanced_cuts(np.full(10, 50), 2, 4)


@pytest.mark.parametrize("n,workers", [(1, 2), (2, 3), (7, 2), (32, 2), (33, 3), (64, 2)])
def test_history_chunks_of_a_small_batch_run_every_row_once_at_its_full_length(n, workers):
    rng = np.random.default_rng(n + workers)
    max_len = 50
    lens = rng.integers(0, max_len + 1, size=n)
    seq = np.zeros((n, max_len), np.int64)
    for r, ln in enumerate(lens):
        seq[r, max_len - ln:] = rng.integers(1, 1000, size=ln)
    if n > 2:
        seq[0, max_len - 5:] = [3, 0, 4, 5, 6]                # a 0 inside a history is kept, not cut at
        lens[0] = 5
    chunks = list(history_chunks(seq, True, 64, 512, workers))
    assert len(chunks) <= workers
    seen = np.concatenate([rows for rows, _ in chunks])
    assert sorted(seen.tolist()) == list(range(n))
    for rows, width in chunks:
        assert width == max(1, int(lens[rows].max()))          # the chunk's longest history, whole
        assert (seq[rows, :max_len - width] == 0).all()        # nothing but padding is cut away
    if n >= workers:
        assert len(chunks) == workers                          # every worker gets rows


def test_a_large_batch_keeps_chunks_of_equal_rows():
    rng = np.random.default_rng(0)
    seq = np.zeros((300, 20), np.int64)
    for r in range(300):
        ln = int(rng.integers(1, 21))
        seq[r, 20 - ln:] = 1
    chunks = list(history_chunks(seq, True, 64, 512, 2))
    assert [len(rows) for rows, _ in chunks] == [64, 64, 64, 64, 44]
