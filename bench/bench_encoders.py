"""pytest-benchmark suite for the two encoders of the default model (not collected by the test suite):
the prompt encoder (torch eager, ONNX Runtime fp32, ONNX Runtime int8) on 512 distinct prompts and the
user encoder (torch, ONNX Runtime fused graph, ONNX Runtime portable graph) at batch 512.

Run:  .venv/bin/python -m pytest bench/bench_encoders.py --benchmark-only -p no:cacheprovider
The model is dpr-bench's default one (UNTRAINED, cached under build/bench-cache); DPR_BENCH_ITEMS sets
its catalogue size (default 100000).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

BATCH = 512


@pytest.fixture(scope="module")
def export():
    from dpr.bench.config import BenchConfig
    from dpr.bench.default_model import default_model
    from dpr.engine.manifest import load_export

    cfg = BenchConfig(items=int(os.environ.get("DPR_BENCH_ITEMS", "100000")))
    return load_export(default_model(cfg).export_dir)


@pytest.fixture(scope="module")
def inputs(export):
    from dpr.bench.workload import Workload
    from dpr.engine import Engine

    batch = Workload(export.items(), export.max_len).batch(BATCH, "unique", 0)
    engine = Engine.load(export.path, backend="onnxruntime", verify_hashes=False)   # the fixture checked it
    texts = ([p for p in batch.prompts if p] + [p for p in batch.negative_prompts if p])[:BATCH]
    tokens = engine.tokenize(texts)
    users = engine.user_encoder_inputs(batch.histories, batch.prompts, batch.negative_prompts)
    engine.close()
    return tokens, users


def _backend(export, name: str, opts: dict):
    """The backend on the CPU, or a skip naming why it cannot run here."""
    from dpr.engine.backends import backend_class
    from dpr.errors import DPRError

    ok, why = backend_class(name).availability("cpu")
    if not ok:
        pytest.skip(why)
    try:
        return backend_class(name)(export, "cpu", **opts)
    except DPRError as exc:
        pytest.skip(str(exc))


# One backend call on one padded batch, every core inside it (parallel_chunks=False: by default the engine runs
# ONNX Runtime single-threaded per chunk, several chunks at once; dpr-bench times that, as served).
_ONE_CALL = {"parallel_chunks": False}
PROMPT_VARIANTS = {"torch": ("torch", {}), "onnxruntime-fp32": ("onnxruntime", dict(_ONE_CALL)),
                   "onnxruntime-int8": ("onnxruntime", {"prompt_encoder": "int8", **_ONE_CALL})}
USER_VARIANTS = {"torch": ("torch", {}), "onnxruntime-fused": ("onnxruntime", {"fused": True, **_ONE_CALL}),
                 "onnxruntime-portable": ("onnxruntime", {"fused": False, **_ONE_CALL})}


@pytest.mark.parametrize("variant", list(PROMPT_VARIANTS))
def test_prompt_encoder(benchmark, export, inputs, variant):
    be = _backend(export, *PROMPT_VARIANTS[variant])
    ids, mask = inputs[0]
    benchmark.group = f"prompt encoder, {ids.shape[0]} prompts x {ids.shape[1]} tokens"
    benchmark.pedantic(be.encode_prompts, args=(ids, mask), rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("variant", list(USER_VARIANTS))
def test_user_encoder(benchmark, export, inputs, variant):
    be = _backend(export, *USER_VARIANTS[variant])
    seq, p_pos, p_neg, presence = inputs[1]
    benchmark.group = f"user encoder, batch {len(seq)}"
    out = benchmark.pedantic(be.encode_users, args=(seq, p_pos, p_neg, presence), rounds=10, iterations=1,
                             warmup_rounds=2)
    assert np.isfinite(out).all()
