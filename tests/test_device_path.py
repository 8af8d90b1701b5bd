"""The device path (engine/device_path.py): user encoder + retrieval on static, bucketed buffers, replayed
from CUDA graphs on a GPU. On the CPU the same bucketed functions run eagerly (``graphs=True``): these
tests check them against the engine's ordinary path and a brute-force top-k; the GPU tests (marked gpu)
check graph replay against eager execution and the fp16 prompt encoder against fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpr.engine import Engine, RequestBatch
from dpr.engine.backends.torch_backend import BackendError
from dpr.engine.device_path import DevicePath, device_topk, next_pow2


def _brute(q, table, k, er, ec):
    s = q.astype(np.float64) @ table.astype(np.float64).T
    s[:, 0] = -np.inf
    s[er, ec] = -np.inf
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), order


@pytest.mark.parametrize("r,m,d,k,tile,block,pairs", [
    (1, 7, 3, 3, 7, 0, 0), (5, 101, 8, 10, 16, 0, 30), (13, 1000, 16, 10, 97, 4, 200),
    (33, 2049, 5, 37, 512, 16, 1000), (7, 300, 4, 299, 64, 16, 50), (9, 5000, 8, 5, 2048, 16, 400)])
def test_device_topk_equals_brute_force(r, m, d, k, tile, block, pairs):
    """Odd sizes, several tiles (a ragged last one), block pruning on and off, k wider than a tile, repeated
    and out-of-tile exclusion pairs: the same items and scores as a float64 brute force."""
    rng = np.random.default_rng(r * m)
    q = rng.standard_normal((r, d)).astype(np.float32)
    table = rng.standard_normal((m, d)).astype(np.float32)
    er = np.sort(rng.integers(0, r, pairs)).astype(np.int64)
    ec = rng.integers(0, m, pairs).astype(np.int64)
    v, i = device_topk(torch.from_numpy(q), torch.from_numpy(table), k, tile, torch.from_numpy(er),
                       torch.from_numpy(ec), block)
    want_v, want_i = _brute(q, table, min(k, m), er, ec)
    v, i = v.numpy(), i.numpy()
    finite = np.isfinite(want_v)
    assert np.array_equal(np.isfinite(v), finite)
    np.testing.assert_allclose(v[finite], want_v[finite], rtol=1e-5, atol=1e-5)
    # the same items wherever the scores are not tied
    with np.errstate(invalid="ignore"):
        gap = np.abs(np.diff(want_v, axis=1, append=-np.inf)) > 1e-5
    assert (i[finite & gap] == want_i[finite & gap]).mean() == 1.0


def test_next_pow2():
    assert [next_pow2(n) for n in (0, 1, 2, 3, 5, 512, 513)] == [1, 1, 2, 4, 8, 512, 1024]
    assert next_pow2(3, 16) == 16


@pytest.fixture(scope="module")
def engines(export_dir, tiny_checkpoint):
    """The torch backend with the bucketed device path (eager on the CPU) and without it."""
    opts = {"checkpoint": str(tiny_checkpoint)}
    bucketed = Engine.load(export_dir, backend="torch", retriever="torch", backend_options={**opts, "graphs": True})
    plain = Engine.load(export_dir, backend="torch", retriever="torch", backend_options={**opts, "graphs": False})
    yield bucketed, plain
    bucketed.close()
    plain.close()


def _random_batch(engine, rng, b):
    ids = engine.item_ids
    hist = [list(rng.choice(ids[1:], int(rng.integers(1, 3 * engine.max_len)))) for _ in range(b)]
    prompts = [None if rng.random() < 0.3 else f"more {engine.tag_names[int(rng.integers(len(engine.tag_names)))]}"
               for _ in range(b)]
    negs = [None if rng.random() < 0.6 else f"no {engine.tag_names[int(rng.integers(len(engine.tag_names)))]}"
            for _ in range(b)]
    return hist, prompts, negs


def _same(a, b, tol=1e-4):
    """Equal counts and scores (float32 rounding aside); equal items wherever a score is apart from both of its
    neighbours by more than ``tol`` (near-ties may swap: the two paths run the user encoder on differently
    shaped batches, so the same user vector can differ in its last bits)."""
    for ra, rb in zip(a, b):
        assert len(ra.item_ids) == len(rb.item_ids)
        np.testing.assert_allclose(ra.scores, rb.scores, rtol=1e-5, atol=1e-5)
        sa = np.asarray(ra.scores, np.float64)
        with np.errstate(invalid="ignore"):
            gap_next = np.abs(np.diff(sa, append=-np.inf))
            gap_prev = np.abs(np.diff(sa, prepend=np.inf))
        untied = (gap_next > tol) & (gap_prev > tol)
        assert [x for x, u in zip(ra.item_ids, untied) if u] == [x for x, u in zip(rb.item_ids, untied) if u]


@pytest.mark.parametrize("b", [1, 3, 17, 64, 700])
def test_bucketed_path_equals_the_ordinary_path(engines, b):
    """Odd batch sizes (spare rows in the bucket), batches over the largest bucket (pieces), histories from 1
    item to 3x max_len (width buckets), mixed prompts, per-row k and exclude_history."""
    bucketed, plain = engines
    assert bucketed._device_path is not None and plain._device_path is None
    rng = np.random.default_rng(b)
    hist, prompts, negs = _random_batch(plain, rng, b)
    k = [int(x) for x in rng.integers(1, 40, b)]
    excl = [bool(x) for x in rng.random(b) < 0.8]
    _same(bucketed.recommend(hist, prompts, negs, k=k, exclude_history=excl),
          plain.recommend(hist, prompts, negs, k=k, exclude_history=excl))


def test_bucketed_path_with_hard_filters_and_the_columnar_api(engines):
    """A batch with hard filters takes the user-encoder step, then the retriever's filtered search."""
    bucketed, plain = engines
    rng = np.random.default_rng(7)
    hist, prompts, negs = _random_batch(plain, rng, 9)
    filt = {"include_tags": [plain.tag_names[0]], "exclude_items": [hist[0][-1]]}
    _same(bucketed.recommend(hist, prompts, negs, k=12, hard_filter=filt),
          plain.recommend(hist, prompts, negs, k=12, hard_filter=filt))
    batch = RequestBatch.from_histories(hist, prompts, negs, k=8)
    a, p = bucketed.recommend_batch(batch), plain.recommend_batch(batch)
    np.testing.assert_allclose(a.scores, p.scores, rtol=1e-5, atol=1e-5)
    assert np.array_equal(a.counts, p.counts)


def test_k_up_to_the_catalogue_pads_like_the_retriever(engines):
    """k = N with the history excluded: fewer eligible items than k; both paths pad with the same count."""
    bucketed, plain = engines
    hist = [list(plain.item_ids[1:30]), [plain.item_ids[5]]]
    a = bucketed.recommend(hist, k=plain.num_items)
    b = plain.recommend(hist, k=plain.num_items)
    assert [len(r.item_ids) for r in a] == [len(r.item_ids) for r in b] == [plain.num_items - 29, plain.num_items - 1]


def test_buckets_are_reused(engines):
    bucketed, _ = engines
    dp = bucketed._device_path
    before = len(dp.describe()["retrieval_graphs"])
    bucketed.recommend([[bucketed.item_ids[1]]] * 3, k=5)
    bucketed.recommend([[bucketed.item_ids[2]]] * 4, k=9)       # same buckets: rows 4, k 16, pairs 256
    after = dp.describe()
    assert len(after["retrieval_graphs"]) <= before + 1
    assert (4, 16, 256) in after["retrieval_graphs"]
    assert all(w == next_pow2(w) or w == bucketed.max_len for _, w in after["user_graphs"])


def test_device_path_choice_is_reported(export_dir, tiny_checkpoint, engines):
    bucketed, plain = engines
    assert "eager" in bucketed.describe()["device_path"]
    assert plain.describe()["device_path"].startswith("off")
    auto = Engine.load(export_dir, backend="torch", retriever="torch",
                       backend_options={"checkpoint": str(tiny_checkpoint)})
    assert auto._device_path is None and "CPU" in auto.describe()["device_path"]
    onnx = Engine.load(export_dir, backend="torch", retriever="onnxruntime",
                       backend_options={"checkpoint": str(tiny_checkpoint), "graphs": True})
    assert onnx._device_path is None and "onnxruntime" in onnx.describe()["device_path"]
    with pytest.raises(BackendError, match="graphs must be"):
        Engine.load(export_dir, backend="torch", backend_options={"checkpoint": str(tiny_checkpoint), "graphs": 1})
    with pytest.raises(BackendError, match="prompt_dtype"):
        Engine.load(export_dir, backend="torch", backend_options={"checkpoint": str(tiny_checkpoint),
                                                                  "prompt_dtype": "int4"})


def test_half_precision_prompt_encoder_on_the_cpu(export_dir, tiny_checkpoint, engines):
    """bfloat16 runs on the CPU too: its vectors stay close to fp32's (worst-row cosine), its cache key
    differs (vectors of other numerics are never handed out), and the user encoder stays fp32."""
    _, plain = engines
    bf = Engine.load(export_dir, backend="torch", retriever="torch",
                     backend_options={"checkpoint": str(tiny_checkpoint), "prompt_dtype": "bfloat16"})
    assert bf.prompt_cache_key != plain.prompt_cache_key and bf.prompt_cache_key.endswith(":bf16")
    ids, mask = bf.tokenize(["more " + t for t in bf.tag_names] + ["something quiet for a rainy evening"])
    assert bf.backend.prompt_cosine_to_fp32(ids, mask) >= 0.98
    assert plain.backend.prompt_cosine_to_fp32(ids, mask) == 1.0
    assert next(bf.backend.model.parameters()).dtype == torch.float32


# ---- CUDA (marked gpu: skipped with a reason without one) ------------------------------------------------

@pytest.mark.gpu
def test_graph_replay_equals_eager_and_the_cpu(export_dir, tiny_checkpoint):
    """The same batches through CUDA-graph replay (graphs=None on cuda), eager CUDA (graphs=False) and the
    CPU: equal scores, equal untied items; replaying a captured bucket with new inputs changes the answer."""
    opts = {"checkpoint": str(tiny_checkpoint)}
    g = Engine.load(export_dir, backend="torch", retriever="torch", device="cuda", backend_options=opts)
    e = Engine.load(export_dir, backend="torch", retriever="torch", device="cuda",
                    backend_options={**opts, "graphs": False})
    c = Engine.load(export_dir, backend="torch", retriever="torch", device="cpu",
                    backend_options=opts)
    assert g._device_path is not None and g._device_path.graphs, g.describe()["device_path"]
    rng = np.random.default_rng(0)
    for b in (1, 5, 64, 300):
        hist, prompts, negs = _random_batch(c, rng, b)
        got = g.recommend(hist, prompts, negs, k=10)
        _same(got, e.recommend(hist, prompts, negs, k=10))
        for rg, rc in zip(got, c.recommend(hist, prompts, negs, k=10)):
            np.testing.assert_allclose(rg.scores, rc.scores, rtol=2e-2, atol=2e-2)   # fp16 prompt encoder
    assert g._device_path.describe()["user_graphs"]


@pytest.mark.gpu
def test_fp16_prompt_encoder_cosine(export_dir, tiny_checkpoint):
    g = Engine.load(export_dir, backend="torch", retriever="torch", device="cuda",
                    backend_options={"checkpoint": str(tiny_checkpoint)})
    assert g.backend.prompt_dtype == "float16"
    ids, mask = g.tokenize(["more " + t for t in g.tag_names] + ["nothing too long, something funny"])
    assert g.backend.prompt_cosine_to_fp32(ids, mask) >= 0.999


# ---- the pipelined batcher -----------------------------------------------------------------------------------

def test_pipelined_batcher_overlaps_and_answers_like_the_serial_one(export_dir, engine):
    """With ``pipeline=True`` the first half of batch N + 1 (``_prepare``) runs while batch N is in its
    device half (``_execute``, slowed here so that the overlap must show), never more than two batches are
    between intake and answer, and every answer equals the serial batcher's and a direct call's."""
    import threading
    import time

    from dpr.engine import DynamicBatcher

    rng = np.random.default_rng(11)
    hist, prompts, negs = _random_batch(engine, rng, 60)
    reqs = [{"history": h, "prompt": p, "negative_prompt": n, "k": 5} for h, p, n in zip(hist, prompts, negs)]
    direct = engine.recommend(hist, prompts, negs, k=5)
    log, lock, state = [], threading.Lock(), {"executing": 0, "in_flight": 0, "max_in_flight": 0}
    prepare, execute = engine._prepare, engine._execute

    def slow_prepare(cols, timings=None):
        with lock:
            log.append(("prepare", state["executing"]))
            state["in_flight"] += 1
            state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
        return prepare(cols, timings)

    def slow_execute(prep, timings=None):
        with lock:
            state["executing"] += 1
        try:
            time.sleep(0.03)
            return execute(prep, timings)
        finally:
            with lock:
                state["executing"] -= 1
                state["in_flight"] -= 1

    engine._prepare, engine._execute = slow_prepare, slow_execute
    try:
        answers = {}
        for pipeline in (True, False):
            with DynamicBatcher(engine, max_batch_size=4, max_delay_ms=1, pipeline=pipeline) as b:
                futs = [b.submit(r) for r in reqs]
                answers[pipeline] = [f.result(timeout=60) for f in futs]
            if pipeline:
                overlapped = sum(1 for what, busy in log if what == "prepare" and busy)
                assert overlapped >= 3, log
                assert state["max_in_flight"] <= 2
                log.clear()
    finally:
        del engine._prepare, engine._execute
    for a, s, d in zip(answers[True], answers[False], direct):
        assert a.item_ids == s.item_ids == d.item_ids
        np.testing.assert_allclose(a.scores, d.scores, rtol=1e-6)


def test_batcher_pipeline_setting_is_checked(engine):
    from dpr.engine import DynamicBatcher
    from dpr.errors import InputError

    with pytest.raises(InputError, match="pipeline must be"):
        DynamicBatcher(engine, pipeline="yes")
    with DynamicBatcher(engine) as b:                 # None: pipelined only on CUDA
        assert b.pipeline is (engine.device.startswith("cuda"))


def test_a_failed_capture_falls_back_to_eager(engines):
    """A capture that fails (forced here: CUDA graphs asked for on the CPU, where capture cannot work) turns
    graphs off with the reason, and the batch is still answered exactly."""
    from dpr.engine.device_path import DevicePath

    bucketed, plain = engines
    dp0 = bucketed._device_path
    dp = DevicePath(dp0.model, dp0.table, dp0.max_len, dp0.dim, 64, dp0.trims_history, graphs=False)
    dp.graphs = True
    bucketed._device_path = dp
    try:
        hist = [[plain.item_ids[3], plain.item_ids[9]], [plain.item_ids[1]]]
        _same(bucketed.recommend(hist, ["more " + plain.tag_names[1], None], k=7), plain.recommend(hist, ["more " + plain.tag_names[1], None], k=7))
    finally:
        bucketed._device_path = dp0
    assert dp.graphs is False and "capture" in dp.describe()["fallback"]
