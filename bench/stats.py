"""Latency summaries: median / p90 / p99 (linear interpolation between samples; with few iterations
p99 is close to the slowest one) and throughput in requests per second at the median."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def summarise(seconds: Sequence[float], batch: int) -> dict:
    """``{"median_ms", "p90_ms", "p99_ms", "min_ms", "throughput_rps", "samples"}`` of per-call times.
    Throughput is ``batch / median`` (None for a stage that took no time, e.g. no prompts)."""
    t = np.asarray(list(seconds), dtype=np.float64)
    if t.size == 0:
        return {"median_ms": None, "p90_ms": None, "p99_ms": None, "min_ms": None, "throughput_rps": None,
                "samples": 0}
    med = float(np.median(t))
    return {"median_ms": med * 1e3, "p90_ms": float(np.percentile(t, 90)) * 1e3,
            "p99_ms": float(np.percentile(t, 99)) * 1e3, "min_ms": float(t.min()) * 1e3,
            "throughput_rps": (batch / med) if med > 0 else None, "samples": int(t.size)}
