"""Benchmarks (pytest-benchmark, not tests) of the fused MoE gate on the CPU, d=64, 4+4 experts, top-2:
the ORT custom op vs the portable standard-ops subgraph in ORT vs the torch reference.

    python -m pytest bench/bench_fused_gate.py --benchmark-only -p no:cacheprovider
    python -m dpr.bench.gate_timing        # the same as a table (dict API: bench_fused_gate())
"""

from __future__ import annotations

import pytest
import torch

from dpr.kernels import build
from dpr.bench.gate_timing import make_inputs, make_sessions
from dpr.model.moe import moe_gate_reference

BATCHES = [1, 64, 512, 4096]
N, K, D = 4, 2, 64


@pytest.fixture(scope="module")
def sessions():
    res = build.build(verbose=False)
    if "ort_lib" not in res.built:
        pytest.skip(f"ORT custom-op library not built: {res.skipped.get('ort_lib') or res.failed.get('ort_lib')}")
    return make_sessions(N, K, D)


@pytest.mark.parametrize("batch", BATCHES)
def test_ort_fused(benchmark, sessions, batch):
    fused, _ = sessions
    x = make_inputs(batch, D, N)
    benchmark.group = f"fused_gate batch={batch}"
    benchmark(fused.run, None, x)


@pytest.mark.parametrize("batch", BATCHES)
def test_ort_portable(benchmark, sessions, batch):
    _, portable = sessions
    x = make_inputs(batch, D, N)
    feed = {i.name: x[i.name] for i in portable.get_inputs()}
    benchmark.group = f"fused_gate batch={batch}"
    benchmark(portable.run, None, feed)


@pytest.mark.parametrize("batch", BATCHES)
def test_torch_reference(benchmark, batch):
    t = [torch.from_numpy(v) for v in make_inputs(batch, D, N).values()]
    benchmark.group = f"fused_gate batch={batch}"
    with torch.inference_mode():
        benchmark(moe_gate_reference, *t, N, K)
