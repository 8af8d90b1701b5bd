"""Prompt-cache hit rates across replicas: one cache per replica, or one shared (docs/SCALE.md).

    python -m dpr.bench.prompt_cache_replicas [--requests 200000] [--distinct 100000] [--zipf 1.1]

Replays a skewed prompt mix (Zipf over ``--distinct`` prompts; a few templates are most of the traffic, a long
tail of free text) through the engine's own :class:`~dpr.engine.prompt_cache.PromptCache` (LRU,
``--capacity`` prompts per cache, as ``Engine.load(prompt_cache_size=)``), with requests spread over R replicas
at random (Ray Serve's router: power of two choices, effectively random for equal loads). Layouts: a cache per
replica (the default: each replica warms its own), and a shared cache of the same capacity or of R times it
(what a shared store such as Redis in front of the replicas would give). Prints the hit rate of each.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from dpr.engine.prompt_cache import PromptCache


def replay(stream: np.ndarray, replicas: int, capacity: int, shared: bool, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    route = rng.integers(0, replicas, stream.size)
    caches = [PromptCache(capacity)] if shared else [PromptCache(capacity) for _ in range(replicas)]
    vec = np.zeros((1, 4), np.float32)
    for p, r in zip(stream.tolist(), route.tolist()):
        c = caches[0] if shared else caches[r]
        text = f"p{p}"
        if c.get_many("m", [text])[0] is None:
            c.put_many("m", [text], vec)
    hits = sum(c.hits for c in caches)
    return hits / stream.size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dpr.bench.prompt_cache_replicas", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=200_000)
    p.add_argument("--distinct", type=int, default=100_000)
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the prompt mix (> 1)")
    p.add_argument("--capacity", type=int, default=4096, help="prompts per cache (Engine.load's default)")
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4, 8])
    a = p.parse_args(argv)
    if a.zipf <= 1 or a.requests < 1 or a.distinct < 1 or a.capacity < 1 or min(a.replicas) < 1:
        p.error("--zipf must be > 1; counts >= 1")
    rng = np.random.default_rng(1)
    stream = rng.zipf(a.zipf, a.requests * 2)
    stream = stream[stream <= a.distinct][:a.requests]        # truncated Zipf over the distinct prompts
    rows = []
    for r in a.replicas:
        rows.append({"replicas": r, "per_replica": round(replay(stream, r, a.capacity, False), 4),
                     "shared_same_capacity": round(replay(stream, r, a.capacity, True), 4),
                     "shared_r_x_capacity": round(replay(stream, r, a.capacity * r, True), 4)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"| replicas | a cache per replica ({a.capacity}) | shared, {a.capacity} | shared, R x {a.capacity} |")
    print("|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['replicas']} | {row['per_replica']:.1%} | {row['shared_same_capacity']:.1%} | "
              f"{row['shared_r_x_capacity']:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
