"""DynamicBatcher settings: any valid setting serves every request (or refuses it with OverloadedError) and never
hangs; a setting that is not a number in range is an InputError when the batcher is made, naming the setting.
The bad settings below were bugs (compared, not type-checked) until engine/batcher.py checked them.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpr.errors import InputError

LONG = os.environ.get("DPR_FUZZ") == "long"
SCALE = int(os.environ.get("DPR_FUZZ_SCALE", "25")) if LONG else 1


def test_any_valid_setting_serves_and_never_hangs(engine):
    from dpr.bench.soak import same_ranking
    from dpr.engine import DynamicBatcher, OverloadedError

    reqs = [{"history": engine.item_ids[i:i + 3], "k": 1 + i % 7, "prompt": [None, "more comedy"][i % 2]}
            for i in range(12)]
    want = [engine.recommend([r["history"]], prompts=[r["prompt"]], k=r["k"])[0] for r in reqs]

    @settings(max_examples=25 * SCALE, derandomize=not LONG, database=None, deadline=timedelta(seconds=30),
              suppress_health_check=[HealthCheck.too_slow], print_blob=True)
    @given(size=st.integers(1, 64), delay=st.floats(0, 20), queue=st.integers(1, 64), n=st.integers(1, 12))
    def run(size, delay, queue, n):
        with DynamicBatcher(engine, max_batch_size=size, max_delay_ms=delay, max_queue=queue) as b:
            futs = []
            for i in range(n):
                try:
                    futs.append((i, b.submit(reqs[i])))
                except OverloadedError:           # back-pressure is an answer; a hang is not
                    assert i >= queue
            for i, f in futs:
                rec = f.result(timeout=20)
                assert same_ranking(rec.item_ids, rec.scores, want[i].item_ids, want[i].scores)
            assert b._worker.is_alive()

    run()


# (setting, what the batcher did with it before it checked its settings)
BAD_SETTINGS = [
    ({"max_batch_size": "8"}, "TypeError from a comparison"),
    ({"max_batch_size": 2.5}, "taken as 2"),
    ({"max_batch_size": True}, "taken as 1"),
    ({"max_delay_ms": "5"}, "TypeError from a comparison"),
    ({"max_delay_ms": float("nan")}, "accepted: every request then waits forever"),
    ({"max_delay_ms": float("inf")}, "accepted: the worker thread dies (OverflowError), every request hangs"),
    ({"max_delay_ms": 1e308}, "accepted: the worker thread dies (OverflowError), every request hangs"),
    ({"max_queue": float("inf")}, "OverflowError"),
    ({"max_queue": "10"}, "TypeError from a comparison"),
    ({"max_queue": 2.0}, "taken as 2"),
    ({"max_delay_ms": -1}, "negative"),
    ({"max_batch_size": 0}, "zero"),
]


@pytest.mark.parametrize("kwargs,now", BAD_SETTINGS, ids=[f"{next(iter(k))}={next(iter(k.values()))!r}"
                                                          for k, _ in BAD_SETTINGS])
def test_a_bad_setting_is_refused_when_the_batcher_is_made(engine, kwargs, now):
    from dpr.engine import DynamicBatcher

    try:
        b = DynamicBatcher(engine, **kwargs)
    except InputError as exc:
        assert next(iter(kwargs)) in str(exc)
        return
    except Exception as exc:  # noqa: BLE001 - another type is the bug documented here
        pytest.fail(f"{type(exc).__name__} instead of an InputError: {exc}")
    b.close(timeout=5)
    pytest.fail(f"{kwargs} was accepted ({now})")
