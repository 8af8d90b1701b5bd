"""Timing loops: every runner (the PyTorch pipeline and each backend's engine) over the same batches of a
prompt mode, and the user encoder with the fused vs the portable gating on identical inputs.

The runners are interleaved: batch i goes through every runner (in an order rotated each iteration)
before batch i + 1. On a machine shared with other jobs the load drifts over minutes; interleaving
exposes every runner to the same drift, so the ratios between them stay meaningful even when the
absolute times do not. The first ``warmup`` batches are untimed; of each timed call the wall time and
the per-stage seconds (the engine's ``timings``) are kept, ``other`` being what no stage accounts for
(request validation, id mapping, result assembly), and beside them the engine's own ``host`` seconds (all
but the tokenizer, the model runs and the retrieval kernel; see dpr.bench.host).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .stats import summarise

STAGES = ("tokenize", "prompt_encoder", "user_encoder", "retrieval", "other")


@dataclass
class Runner:
    """One thing to time: ``call(batch, timings) -> list of item-id lists``; ``engine`` when it has a
    prompt cache to report."""
    name: str
    call: Callable
    engine: object = None
    totals: list = field(default_factory=list)
    stages: dict = field(default_factory=lambda: {s: [] for s in STAGES})
    host: list = field(default_factory=list)
    first: list | None = None
    cache_start: tuple = (0, 0)

    def reset(self) -> None:
        self.totals, self.stages, self.first, self.host = [], {s: [] for s in STAGES}, None, []
        if self.engine is not None:
            self.engine.prompt_cache.clear()

    def mark_timed_start(self) -> None:
        if self.engine is not None:
            st = self.engine.prompt_cache.stats()
            self.cache_start = (st["hits"], st["misses"])

    def run(self, batch, timed: bool) -> None:
        timings: dict = {}
        t0 = time.perf_counter()
        out = self.call(batch, timings)
        dt = time.perf_counter() - t0
        if not timed:
            return
        if self.first is None:
            self.first = out
        self.totals.append(dt)
        known = 0.0
        for s in STAGES[:-1]:
            v = float(timings.get(s, 0.0))
            self.stages[s].append(v)
            known += v
        self.stages["other"].append(max(dt - known, 0.0))
        if "host" in timings:
            self.host.append(float(timings["host"]))

    def result(self, batch_size: int) -> dict:
        out = {"total": summarise(self.totals, batch_size),
               "stages": {s: summarise(v, batch_size) for s, v in self.stages.items()},
               "seconds": list(self.totals), "prompt_cache": None,
               "host": summarise(self.host, batch_size) if self.host else None}
        if self.engine is not None:
            st = self.engine.prompt_cache.stats()
            hits, misses = st["hits"] - self.cache_start[0], st["misses"] - self.cache_start[1]
            out["prompt_cache"] = {"hits": hits, "misses": misses,
                                   "hit_rate": hits / (hits + misses) if hits + misses else 0.0}
        return out


def run_mode(runners: list[Runner], batches: list, warmup: int, desc: str, progress: bool) -> None:
    """Every batch through every runner, interleaved; results stay in the runners."""
    from tqdm import tqdm

    for r in runners:
        r.reset()
    with tqdm(total=len(batches) * len(runners), desc=desc, leave=False, disable=not progress,
              mininterval=0.5, dynamic_ncols=True) as bar:
        for i, b in enumerate(batches):
            if i == warmup:
                for r in runners:
                    r.mark_timed_start()
            for j in range(len(runners)):
                r = runners[(i + j) % len(runners)]
                bar.set_postfix_str(r.name, refresh=False)
                r.run(b, timed=i >= warmup)
                bar.update(1)


def engine_call(engine, k: int) -> Callable:
    def call(b, timings):
        return engine.recommend(b.histories, b.prompts, b.negative_prompts, k=k, timings=timings).item_ids
    return call


def pipeline_call(pipe, k: int) -> Callable:
    def call(b, timings):
        return pipe.recommend(b.histories, b.prompts, b.negative_prompts, k=k, timings=timings)
    return call


def overlap(a: list[list[str]] | None, b: list[list[str]] | None) -> float | None:
    """Mean per-row |A & B| / |B| of two batches of top-k id lists (1.0: the same items)."""
    if not a or not b:
        return None
    vals = [len(set(x) & set(y)) / max(len(y), 1) for x, y in zip(a, b) if y]
    return float(np.mean(vals)) if vals else None


def time_user_encoders(encoders: dict, inputs: tuple, iters: int, warmup: int) -> dict:
    """Median ms of each ``encode(item_seq, p_pos, p_neg, presence)`` over the whole batch (an engine's
    ``encode_users``: chunked and run as the engine serves it), interleaved call by call like the runners."""
    seq, p_pos, p_neg, presence = inputs
    times: dict[str, list[float]] = {name: [] for name in encoders}
    for i in range(max(1, warmup) + iters):
        for name, encode in encoders.items():
            t0 = time.perf_counter()
            encode(seq, p_pos, p_neg, presence)
            if i >= max(1, warmup):
                times[name].append(time.perf_counter() - t0)
    return {name: summarise(t, len(seq)) for name, t in times.items()}
