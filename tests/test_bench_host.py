"""dpr-bench's host stage (issue 16): the engine reports ``timings["host"]`` (its own time besides the
tokenizer, the model runs and the retrieval kernel) through every entry point, and the bench's host section
records it per entry point. Nothing here asserts a speed."""

from __future__ import annotations


def test_engine_reports_host_time_per_entry_point(engine):
    from dpr.engine import RequestBatch

    h = [[engine.item_ids[0], engine.item_ids[5]], [engine.item_ids[7]]]
    for call in (lambda t: engine.recommend(h, ["more comedy", None], k=3, timings=t),
                 lambda t: engine.recommend_batch(RequestBatch.from_histories(h, ["more comedy", None], k=3), timings=t)):
        t: dict = {}
        call(t)
        assert set(t) >= {"tokenize", "prompt_encoder", "user_encoder", "retrieval", "host"}
        assert all(v >= 0.0 for v in t.values())
        before = t["host"]
        call(t)                                    # a dict that already holds times: host adds this call's
        assert t["host"] >= before


def test_host_section_times_every_entry_point(engine):
    from dpr.bench.host import ENTRY_POINTS, host_section
    from dpr.bench.workload import Workload

    batches = Workload(engine.export.items(), engine.max_len, seed=1).batches(16, "templates", 4)
    out = host_section(engine, batches, k=5, warmup=1, mode="templates")
    assert out["batch"] == 16 and out["prompts"] == "templates" and set(out["entry_points"]) == set(ENTRY_POINTS)
    for e in out["entry_points"].values():
        assert e["samples"] == 3 and e["median_ms"] >= 0 and e["us_per_request"] >= 0
