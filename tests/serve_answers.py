"""What a serving front end (HTTP, Ray, the fault tests) must answer for one ``/recommend`` request, and the
comparison every serving test uses. Not a test module: conftest.py registers it as ``dpr_tests_serve_answers``
(see tests/fuzz_strategies.py for why)."""

from __future__ import annotations

import numpy as np


def expected(engine, req: dict) -> dict:
    """What Engine.recommend answers for one /recommend request."""
    return engine.recommend([req["history"]], prompts=[req.get("prompt")],
                            negative_prompts=[req.get("negative_prompt")], k=req.get("k", 10),
                            exclude_history=req.get("exclude_history", True),
                            hard_filter=req.get("hard_filter"))[0].to_dict()


def assert_same(got: dict, want: dict) -> None:
    """The same items, ranks, titles, tags, count and reason; scores within float32 rounding (a request's scores
    may differ in their last bits with the rows it is batched with)."""
    assert {k: got[k] for k in ("k", "count", "short_reason")} == {k: want[k] for k in ("k", "count", "short_reason")}
    assert [(i["rank"], i["id"], i["title"], i["tags"]) for i in got["items"]] == \
           [(i["rank"], i["id"], i["title"], i["tags"]) for i in want["items"]]
    np.testing.assert_allclose([i["score"] for i in got["items"]], [i["score"] for i in want["items"]],
                               rtol=1e-5, atol=1e-5)
