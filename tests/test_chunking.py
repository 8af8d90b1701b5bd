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


# ---- ChunkRunner: the caller takes chunks too ---------------------------------------------------------------
def _runner_case(workers: int, n: int, fn=None):
    import threading

    from dpr.engine.chunking import ChunkRunner

    runner = ChunkRunner(workers)
    seen, lock = [], threading.Lock()

    def record(c):
        with lock:
            seen.append((c, threading.current_thread().name))
        if fn is not None:
            fn(c)
    return runner, seen, record


@pytest.mark.parametrize("workers,n", [(1, 5), (2, 1), (2, 2), (2, 7), (3, 20), (4, 3)])
def test_chunk_runner_runs_every_chunk_once(workers, n):
    runner, seen, record = _runner_case(workers, n)
    try:
        for _ in range(20):
            seen.clear()
            runner.run(record, list(range(n)))
            assert sorted(c for c, _ in seen) == list(range(n))
    finally:
        runner.close()


def test_chunk_runner_uses_the_caller_and_at_most_workers_minus_one_helpers():
    import threading
    import time

    barrier = threading.Barrier(3, timeout=10)           # 3 chunks that only finish together: 3 threads at once

    runner, seen, record = _runner_case(3, 3, lambda c: barrier.wait())
    try:
        runner.run(record, [0, 1, 2])
        names = {t for _, t in seen}
        assert threading.current_thread().name in names   # the caller ran a chunk
        assert len(names) == 3
        helpers = {t for t in names if t.startswith("dpr-chunk")}
        assert len(helpers) == 2                          # workers - 1 pool threads
        # a slow chunk on the caller does not hold back the others: the helper drains the rest
        slow = threading.current_thread().name

        def maybe_slow(c):
            time.sleep(0.5 if threading.current_thread().name == slow else 0.01)
        runner2, seen2, record2 = _runner_case(2, 6, maybe_slow)
        try:
            runner2.run(record2, list(range(6)))
            assert len([c for c, t in seen2 if t == slow]) == 1   # it slept on one; the helper took the other 5
            assert sorted(c for c, _ in seen2) == list(range(6))
        finally:
            runner2.close()
    finally:
        runner.close()


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_chunk_runner_stops_at_an_error_and_raises_it_once_no_chunk_runs(workers):
    import threading
    import time

    running, lock = [0], threading.Lock()

    def fail_some(c):
        with lock:
            running[0] += 1
        try:
            if c == 2:
                raise ValueError(f"chunk {c}")
            time.sleep(0.02)
        finally:
            with lock:
                running[0] -= 1

    runner, seen, record = _runner_case(workers, 40, fail_some)
    try:
        with pytest.raises(ValueError, match="chunk 2"):
            runner.run(record, list(range(40)))
        assert running[0] == 0                            # nothing still runs when the error comes out
        started = sorted(c for c, _ in seen)
        assert 2 in started
        assert len(started) <= 2 + workers                # no chunk claimed after the failure but the ones in flight
        seen.clear()
        runner.run(record, [0, 1, 3])                     # the runner is still usable
        assert sorted(c for c, _ in seen) == [0, 1, 3]
    finally:
        runner.close()


def test_chunk_runner_refuses_work_after_close():
    from dpr.errors import DPRError

    runner, seen, record = _runner_case(2, 4)
    runner.run(record, [0, 1])
    runner.close()
    with pytest.raises(DPRError, match="closed"):
        runner.run(record, [0, 1])


def test_chunk_runner_serves_concurrent_callers():
    import threading

    runner, seen, record = _runner_case(2, 0)
    errors = []

    def caller(base):
        try:
            for _ in range(50):
                runner.run(record, [base + i for i in range(5)])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=caller, args=(100 * j,)) for j in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
        assert not errors
        counts = {}
        for c, _ in seen:
            counts[c] = counts.get(c, 0) + 1
        assert counts == {100 * j + i: 50 for j in range(4) for i in range(5)}
    finally:
        runner.close()
