"""The ``host`` stage: everything an engine call does besides the tokenizer, the model runs and the retrieval
kernel (request checks, id mapping, padding, exclusion lists, masks, result assembly). The engine measures it
itself (``timings["host"]``); this section times it per batch through each entry point, on the same batches,
interleaved:

* ``recommend_batch`` with catalogue indices (``RequestBatch.from_indices``: what a serving layer that maps
  ids itself hands over);
* ``recommend_batch`` with item ids (``RequestBatch.from_ids``: the ids mapped by the engine);
* ``recommend()`` (lists in, per-row lists out).

Issue 16's CPU targets at batch 512: <= 1 ms per batch through ``recommend_batch``, <= 3 ms through
``recommend()``. Template prompts (warm prompt cache) so that the prompt encoder does not dominate the call.
"""

from __future__ import annotations

import numpy as np

from .stats import summarise

ENTRY_POINTS = ("recommend_batch_indices", "recommend_batch_ids", "recommend")


def _calls(engine, batches: list, k: int) -> dict:
    from dpr.engine import RequestBatch

    ids = [RequestBatch.from_histories(b.histories, b.prompts, b.negative_prompts, k=k) for b in batches]
    index = engine._id_to_index
    idx = [RequestBatch.from_indices(np.fromiter(map(index.__getitem__, rb.flat), np.int64, len(rb.flat)),
                                     rb.offsets, rb.prompts, rb.negative_prompts, k=k) for rb in ids]
    return {
        "recommend_batch_indices": lambda i, t: engine.recommend_batch(idx[i], timings=t),
        "recommend_batch_ids": lambda i, t: engine.recommend_batch(ids[i], timings=t),
        "recommend": lambda i, t: engine.recommend(batches[i].histories, batches[i].prompts,
                                                   batches[i].negative_prompts, k=k, timings=t).item_ids,
    }


def host_section(engine, batches: list, k: int, warmup: int, mode: str) -> dict:
    """Median (and p90, min) host ms per batch for each entry point, over ``batches`` (each once per entry
    point after ``warmup`` untimed ones, the entry points rotated batch by batch)."""
    calls = _calls(engine, batches, k)
    names = list(calls)
    host: dict[str, list[float]] = {n: [] for n in names}
    for i in range(len(batches)):
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            t: dict = {}
            calls[name](i, t)
            if i >= warmup:
                host[name].append(float(t.get("host", 0.0)))
    size = len(batches[0].histories) if batches else 0
    out = {"batch": size, "prompts": mode, "backend": engine.backend_name, "retriever": engine.retriever_name,
           "targets_ms": {"recommend_batch": 1.0, "recommend": 3.0}, "entry_points": {}}
    for name in names:
        s = summarise(host[name], size)
        out["entry_points"][name] = {"median_ms": s["median_ms"], "p90_ms": s["p90_ms"], "min_ms": s["min_ms"],
                                     "samples": s["samples"],
                                     "us_per_request": 1e3 * s["median_ms"] / size if size and s["median_ms"] else None}
    return out
