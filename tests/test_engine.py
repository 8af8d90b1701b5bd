"""dpr.engine: backends and retrievers against the torch reference, exclusion, errors, prompt cache,
the dynamic batcher and the CLI. TensorRT / GPU tests skip here (no GPU)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from dpr.errors import DPRError, InputError


@pytest.fixture(scope="session")
def other_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """Same architecture and catalogue, different projection weights: a different model."""
    import torch

    from dpr.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(tiny_checkpoint)
    g = torch.Generator().manual_seed(1)
    ck.state_dict = dict(ck.state_dict)
    ck.state_dict["projection.weight"] = torch.randn(ck.state_dict["projection.weight"].shape, generator=g)
    return save_checkpoint(ck, tmp_path_factory.mktemp("ckpt2") / "other.pt")


def _requests(engine, b: int, seed: int):
    rng = np.random.default_rng(seed)
    tags = engine.tag_names
    pos = [f"show me more {t} films" for t in tags] + ["something light and funny"]
    neg = [f"no {t} please" for t in tags] + ["nothing too long"]
    hist, p, n = [], [], []
    for _ in range(b):
        ln = int(rng.integers(1, 2 * engine.max_len + 1))          # some longer than max_len (truncated)
        hist.append([engine.item_ids[j] for j in rng.choice(engine.num_items, size=ln, replace=False)])
        r = rng.integers(0, 4)                                      # none, positive, negative, both
        p.append(pos[rng.integers(len(pos))] if r in (1, 3) else None)
        n.append(neg[rng.integers(len(neg))] if r in (2, 3) else None)
    return hist, p, n


_REF: dict = {}


def _ref(reference, b):
    if b not in _REF:
        h, p, n = _requests(reference, b, seed=b)
        _REF[b] = ((h, p, n), reference.recommend(h, p, n, k=10))
    return _REF[b]


def _agree(got, ref):
    overlaps, errs = [], []
    for gi, gs, ri, rs in zip(got.item_ids, got.scores, ref.item_ids, ref.scores):
        assert len(gi) == len(ri) == 10
        overlaps.append(len(set(gi) & set(ri)) / 10)
        rmap = dict(zip(ri, rs))
        errs += [abs(s - rmap[i]) for i, s in zip(gi, gs) if i in rmap]
        errs.append(abs(gs[-1] - rs[-1]))                            # k-th score agrees even when ids tie-swap
    return float(np.mean(overlaps)), float(max(errs))


def _fused_ok(export_dir):
    man = json.loads((Path(export_dir) / "manifest.json").read_text())
    if "user_encoder" not in man["graphs"]:
        return False
    from dpr.kernels.build import ort_library_path
    return ort_library_path(cuda=False) is not None


BACKENDS = [("onnxruntime", {"fused": False}), ("onnxruntime", {"fused": True}), ("torch", {})]


@pytest.mark.parametrize("backend,opts", BACKENDS, ids=["ort-portable", "ort-fused", "torch"])
@pytest.mark.parametrize("retriever", ["torch", "onnxruntime", "faiss"])
def test_backend_and_retriever_agree_with_torch_reference(export_dir, reference, tiny_checkpoint, backend, opts,
                                                          retriever):
    from dpr.engine import Engine
    from dpr.engine.retrieval import available_retrievers

    if retriever not in available_retrievers():
        pytest.skip(f"retriever {retriever} not installed")
    if opts.get("fused") and not _fused_ok(export_dir):
        pytest.skip("fused user encoder / custom-op library unavailable")
    if backend == "torch":
        opts = {"checkpoint": str(tiny_checkpoint)}
    eng = Engine.load(export_dir, backend=backend, retriever=retriever, backend_options=opts)
    if backend == "onnxruntime":
        assert eng.backend.fused is bool(opts["fused"])
    for b in (1, 7, 512):
        (h, p, n), ref = _ref(reference, b)
        got = eng.recommend(h, p, n, k=10)
        overlap, err = _agree(got, ref)
        assert overlap >= 0.99, (b, overlap)
        assert err <= 1e-4, (b, err)


def test_stages_match_reference(engine, reference):
    texts = ["show me more comedy films", "no horror please"]
    assert np.abs(engine.encode_prompts(texts) - reference.encode_prompts(texts)).max() <= 1e-4
    h, p, n = _requests(engine, 16, seed=5)
    pp = engine.encode_prompts(["more comedy"] * 16)
    pres = np.tile(np.array([[1, 0]]), (16, 1))
    u = engine.encode_users(h, pp, None, pres)
    assert u.shape == (16, engine.retrieval_dim)      # d, plus a column per tag with the tag channel
    assert np.abs(u - reference.encode_users(h, pp, None, pres)).max() <= 1e-4
    idx, sc = engine.retrieve(u, 5)
    assert idx.shape == (16, 5) and (idx > 0).all()
    timings = {}
    engine.recommend(h, p, n, k=3, timings=timings)
    assert set(timings) >= {"tokenize", "prompt_encoder", "user_encoder", "retrieval"}


def test_tokenization_matches_training_tokenizer(engine, text_encoder):
    texts = ["show me more comedy films", "no horror please", "a much longer prompt " * 40, "x"]
    ids, mask = engine.tokenize(texts)
    hf = text_encoder.tokenizer(texts, padding=True, truncation=True, max_length=text_encoder.max_tokens,
                                return_tensors="np")
    assert np.array_equal(ids, hf["input_ids"]) and np.array_equal(mask, hf["attention_mask"])


def test_auto_backend_choice_is_explained(export_dir):
    from dpr.engine import Engine

    eng = Engine.load(export_dir)
    assert eng.backend_name == "onnxruntime"                        # no GPU here
    assert "tensorrt" in eng.choice_reason and "onnxruntime" in eng.choice_reason
    d = eng.describe()
    assert d["backend"]["backend"] == "onnxruntime" and d["choice_reason"] == eng.choice_reason


def test_no_prompt_is_backbone(engine):
    h, _, _ = _requests(engine, 4, seed=9)
    a = engine.encode_users(h)
    b = engine.encode_users(h, np.ones((4, engine.dim), np.float32), np.ones((4, engine.dim), np.float32),
                            np.zeros((4, 2), np.int64))
    assert np.allclose(a, b, atol=1e-6)


def test_history_and_filter_exclusion_exact(engine):
    h, p, n = _requests(engine, 64, seed=11)
    k = 25
    recs = engine.recommend(h, p, n, k=k)
    for hist, ids in zip(h, recs.item_ids):
        assert len(ids) == k and not set(ids) & set(hist) and len(set(ids)) == k
    tag = engine.tag_names[0]
    bad = engine.tag_names[1]
    flt = {"include_tags": [tag], "exclude_tags": [bad]}
    recs = engine.recommend(h, p, n, k=10, hard_filter=flt)
    for hist, ids, tags in zip(h, recs.item_ids, recs.tags):
        assert len(ids) == 10 and not set(ids) & set(hist)
        assert all(tag in t and bad not in t for t in tags)
    # per-request filters, mixed with None
    per = [flt if i % 2 else None for i in range(64)]
    recs = engine.recommend(h, p, n, k=10, hard_filter=per)
    for i, tags in enumerate(recs.tags):
        if i % 2:
            assert all(tag in t and bad not in t for t in tags)
    # keep history when asked
    recs = engine.recommend([h[0]], k=engine.num_items, exclude_history=False)
    assert len(recs.item_ids[0]) == engine.num_items
    # a filter leaving few items: fewer results, never an excluded one
    only = engine.item_ids[:3]
    recs = engine.recommend([[engine.item_ids[0]]], k=10,
                            hard_filter={"exclude_items": [x for x in engine.item_ids if x not in only]})
    assert set(recs.item_ids[0]) == set(only[1:])


def test_truncation_keeps_most_recent(engine):
    L = engine.max_len
    long = engine.item_ids[:L + 7]
    a = engine.encode_users([long])
    b = engine.encode_users([long[-L:]])
    assert np.allclose(a, b, atol=1e-6)
    assert engine.pad_histories([np.arange(1, L + 8)])[0].tolist() == list(range(8, L + 8))


GOOD = dict(histories=[["__first__"]], prompts=["more comedy"], k=5)


def test_batch_validation_names_the_request(engine):
    """The batch fast path (all ids known) falls back to per-row checks that name the offending request."""
    first, second = engine.item_ids[:2]
    h = [[first], [second, first], ["no-such-item"], [first]]
    with pytest.raises(InputError, match=r"request 2: history holds unknown item id 'no-such-item'"):
        engine.recommend(h, k=3)
    with pytest.raises(InputError, match=r"request 1: history"):
        engine.recommend([[first], [[first]]], k=3)                    # an unhashable id
    with pytest.raises(InputError, match=r"request 3: history is empty"):
        engine.recommend([[first]] * 3 + [[]], k=3)
    with pytest.raises(InputError, match=r"request 1: prompt is empty"):
        engine.recommend([[first]] * 3, prompts=["fun", " ", "fun"], k=3)
    recs = engine.recommend([[first], (second,), np.array([first, second])], k=3)   # tuples and arrays work
    assert len(recs) == 3 and all(len(r) == 3 for r in recs.item_ids)


@pytest.mark.parametrize("kwargs,match", [
    (dict(histories=[[]]), "empty"),
    (dict(histories=[]), "empty"),
    (dict(histories=[["no-such-item"]]), "no-such-item"),
    (dict(k=0), "k must be >= 1"),
    (dict(k=10 ** 6), "larger than the catalogue"),
    (dict(k="3"), "k must be an integer"),
    (dict(prompts=[""]), "empty"),
    (dict(prompts=["   \n\t"]), "whitespace"),
    (dict(prompts=["x" * 100_000]), "too long"),
    (dict(prompts=[b"\xff\xfe bad"]), "UTF-8"),
    (dict(prompts=[123]), "must be a string"),
    (dict(negative_prompts=["\ud800"]), "UTF-8"),
    (dict(prompts=["a", "b"]), "lengths must match"),
    (dict(negative_prompts=[None, None]), "lengths must match"),
    (dict(prompts="more comedy"), "not a single string"),
    (dict(hard_filter={"include_tags": ["no-such-tag"]}), "unknown tag"),
    (dict(hard_filter={"colour": ["red"]}), "unknown key"),
    (dict(histories="i1"), "must be a list"),
])
def test_bad_inputs_fail_clearly_and_engine_keeps_serving(engine, kwargs, match):
    first = engine.item_ids[0]
    good = {k: ([[first]] if v == [["__first__"]] else v) for k, v in GOOD.items()}
    call = dict(good, **kwargs)
    with pytest.raises(InputError, match=match):
        engine.recommend(**call)
    recs = engine.recommend(**good)
    assert len(recs.item_ids[0]) == 5


def test_unknown_items_ignore_mode(export_dir):
    from dpr.engine import Engine

    eng = Engine.load(export_dir, backend="onnxruntime", unknown_items="ignore")
    a = eng.recommend([[eng.item_ids[3], "nope", eng.item_ids[4]]], k=5)
    b = eng.recommend([[eng.item_ids[3], eng.item_ids[4]]], k=5)
    assert a.item_ids == b.item_ids
    with pytest.raises(InputError, match="no known item"):
        eng.recommend([["nope"]], k=5)
    # bytes prompts that are valid UTF-8 are accepted
    assert eng.recommend([[eng.item_ids[3]]], prompts=["more comedy".encode()], k=2).item_ids


def test_export_validation_errors(export_dir, tmp_path):
    from dpr.engine import BackendError, Engine, ExportFolderError

    with pytest.raises(ExportFolderError, match="not found"):
        Engine.load(tmp_path / "nope")
    with pytest.raises(ExportFolderError, match="manifest"):
        Engine.load(tmp_path)
    d = tmp_path / "copy"
    shutil.copytree(export_dir, d)
    with pytest.raises(BackendError, match="unknown backend"):
        Engine.load(d, backend="tensorflow")
    with pytest.raises(BackendError, match="(?i)tensorrt"):
        Engine.load(d, backend="tensorrt")
    with pytest.raises(BackendError, match="unknown retriever"):
        Engine.load(d, retriever="annoy")
    arr = d / "item_embeddings.npy"
    raw = bytearray(arr.read_bytes())
    raw[-1] ^= 0x01
    arr.write_bytes(bytes(raw))
    with pytest.raises(ExportFolderError, match="item_embeddings.npy.*(modified|sha256)"):
        Engine.load(d)
    shutil.copyfile(Path(export_dir) / "item_embeddings.npy", arr)
    ok = Engine.load(d, backend="onnxruntime")                     # restored file: loads and serves
    assert ok.recommend([[ok.item_ids[0]]], k=2).item_ids[0]
    user = "user_encoder.onnx" if (d / "user_encoder.onnx").is_file() else "user_encoder_portable.onnx"
    (d / user).unlink()                                            # the export's only user graph
    with pytest.raises(ExportFolderError, match=f"missing.*{user}"):
        Engine.load(d)
    m = json.loads((Path(export_dir) / "manifest.json").read_text())
    m["format_version"] = 99
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ExportFolderError, match="version 99"):
        Engine.load(d)


def _copy_without_torch_weights(export_dir, dst):
    """The export as written with --no-torch-weights, moved away from its checkpoint."""
    shutil.copytree(export_dir, dst)
    (dst / "model_state.safetensors").unlink()
    shutil.rmtree(dst / "text_encoder")
    m = json.loads((dst / "manifest.json").read_text())
    m["files"] = {k: v for k, v in m["files"].items()
                  if k != "model_state.safetensors" and not k.startswith("text_encoder/")}
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_torch_backend_needs_weights(export_dir, tmp_path):
    from dpr.engine import BackendError, Engine

    d = _copy_without_torch_weights(export_dir, tmp_path / "onnx-only")
    with pytest.raises(BackendError, match="checkpoint"):
        Engine.load(d, backend="torch")


def test_torch_backend_from_export_alone(export_dir, tiny_checkpoint, tmp_path):
    """The export carries the torch weights and the text encoder: a copy far from the checkpoint (and
    from the encoder folder the checkpoint names) rebuilds the same model as the checkpoint does."""
    from dpr.engine import Engine

    m = json.loads((export_dir / "manifest.json").read_text())
    assert "model_state.safetensors" in m["files"]
    assert any(k.startswith("text_encoder/") for k in m["files"])
    d = tmp_path / "moved"
    shutil.copytree(export_dir, d)
    alone = Engine.load(d, backend="torch", retriever="torch")
    assert alone.backend.weights_source.endswith("model_state.safetensors")
    assert Path(alone.backend.text_encoder_source) == d / "text_encoder"
    from_ckpt = Engine.load(export_dir, backend="torch", retriever="torch",
                            backend_options={"checkpoint": str(tiny_checkpoint)})
    assert from_ckpt.backend.weights_source == str(tiny_checkpoint)
    hist, p, n = _requests(alone, 9, seed=3)
    a = alone.recommend(hist, p, n, k=10)
    b = from_ckpt.recommend(hist, p, n, k=10)
    assert a.item_ids == b.item_ids
    np.testing.assert_allclose(np.array(a.scores), np.array(b.scores), rtol=0, atol=1e-5)
    # the copied encoder is verified against the manifest like every other file
    cfg = d / "text_encoder" / "config.json"
    cfg.write_text(cfg.read_text() + " ")
    from dpr.engine import ExportFolderError
    with pytest.raises(ExportFolderError, match="text_encoder/config.json"):
        Engine.load(d, backend="torch")


def test_prompt_cache_hits_and_never_stale_after_reload(export_dir, other_checkpoint, tmp_path):
    from dpr.engine import Engine, PromptCache
    from dpr.export import ExportConfig, export

    d = tmp_path / "live"
    shutil.copytree(export_dir, d)
    shared = PromptCache(16)
    e1 = Engine.load(d, backend="onnxruntime", prompt_cache=shared)
    texts = ["more comedy", "no horror", "more comedy"]
    v1 = e1.encode_prompts(texts)
    assert shared.stats()["misses"] == 2 and shared.stats()["hits"] == 0
    assert np.array_equal(v1[0], v1[2])
    v1b = e1.encode_prompts(texts)
    assert shared.stats()["hits"] == 2 and np.array_equal(v1, v1b)
    e1.recommend([[e1.item_ids[0]]] * 2, prompts=["more comedy", "brand new"], k=3)
    s = shared.stats()
    assert s["hits"] == 3 and s["misses"] == 3
    # a different model exported into the same directory, same process, same (shared) cache
    export(other_checkpoint, ExportConfig(out=str(d), force=True, fused=False))
    e2 = Engine.load(d, backend="onnxruntime", prompt_cache=shared)
    assert e2.model_hash != e1.model_hash
    v2 = e2.encode_prompts(texts)
    fresh = Engine.load(d, backend="onnxruntime", prompt_cache_size=0).encode_prompts(texts)
    assert not np.allclose(v1, v2, atol=1e-3)
    assert np.allclose(v2, fresh, atol=1e-6)
    # default: one cache per engine instance
    e3 = Engine.load(d, backend="onnxruntime")
    assert e3.prompt_cache is not e2.prompt_cache and e3.prompt_cache.stats()["size"] == 0


# ---- length-bucketed prompt encoding ------------------------------------------------------------------

_BUCKET_PROMPTS = ["x", "comedy", "no horror please", "show me more comedy films", "comedy",
                   "I'd love a good sci-fi movie tonight, something with space ships and a clever plot",
                   "a much longer prompt " * 40, "no horror please", "more drama", "western",
                   "something light and funny for a rainy sunday afternoon with the family",
                   " ".join(["drama"] * 300), "thriller or action", "x", "documentary about war please"]


def _recording(eng):
    """Record every (input_ids, attention_mask) the backend's prompt encoder is called with."""
    calls = []
    run = eng.backend.encode_prompts

    def wrapped(ids, mask):
        calls.append((ids.copy(), mask.copy()))
        return run(ids, mask)

    eng.backend.encode_prompts = wrapped
    return calls


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_prompt_bucketing_matches_unbucketed(export_dir, tiny_checkpoint, backend):
    from dpr.engine import Engine

    opts = {"checkpoint": str(tiny_checkpoint)} if backend == "torch" else {}

    def load(tokens, max_batch=None):
        eng = Engine.load(export_dir, backend=backend, retriever="torch", prompt_cache_size=0,
                          prompt_chunk_tokens=tokens, backend_options=opts)
        if max_batch:
            eng.max_batch = max_batch
        return eng

    plain = load(0)
    assert plain.prompt_chunk_tokens == 0 and load(None).prompt_chunk_tokens == 0
    ref = plain.encode_prompts(_BUCKET_PROMPTS)
    assert np.array_equal(ref[0], ref[13]) and np.array_equal(ref[1], ref[4])      # duplicates
    for tokens, max_batch in [(None, None), (1, None), (20, None), (64, None), (1024, None), (10**6, 4),
                              (64, 3), (10**6, None)]:
        eng = load(1024 if tokens is None else tokens, max_batch)
        calls = _recording(eng)
        got = eng.encode_prompts(_BUCKET_PROMPTS)
        assert got.shape == ref.shape and got.dtype == np.float32
        assert np.abs(got - ref).max() < 1e-5, (tokens, max_batch, np.abs(got - ref).max())
        assert np.array_equal(got[0], got[13]) and np.array_equal(got[1], got[4])
        assert sum(len(ids) for ids, _ in calls) == len(set(_BUCKET_PROMPTS))     # each distinct prompt once
        if max_batch:
            assert len(calls) > 1 and all(len(ids) <= max_batch for ids, _ in calls)
    # a single prompt, and more prompts than max_batch through the unbucketed path too
    one = load(1024).encode_prompts(["no horror please"])
    assert np.abs(one - plain.encode_prompts(["no horror please"])).max() < 1e-5
    small = load(0, max_batch=4)
    assert np.abs(small.encode_prompts(_BUCKET_PROMPTS) - ref).max() < 1e-5
    assert load(1024).encode_prompts([]).shape == (0, plain.dim)


@pytest.mark.parametrize("tokens", [1, 16, 40, 100, 1024])
def test_prompt_chunks_respect_token_budget(export_dir, tokens):
    from dpr.engine import Engine

    eng = Engine.load(export_dir, backend="onnxruntime", retriever="torch", prompt_cache_size=0,
                      prompt_chunk_tokens=tokens)
    eng.max_batch = 6
    calls = _recording(eng)
    rng = np.random.default_rng(tokens)
    words = "show me more comedy horror drama films tonight please with a twist".split()
    texts = list(dict.fromkeys(" ".join(rng.choice(words, size=int(rng.integers(1, 30)))) for _ in range(60)))
    timings = {}
    eng.encode_prompts(texts, timings=timings)
    assert timings["tokenize"] > 0 and timings["prompt_encoder"] > 0
    _, full_mask = eng.tokenize(texts)
    widths = []
    for ids, mask in calls:
        rows, width = ids.shape
        assert mask.shape == ids.shape and 1 <= rows <= eng.max_batch
        assert rows == 1 or rows * width <= tokens, (rows, width, tokens)
        assert width == mask.sum(1).max()                 # cut to the chunk's longest prompt
        assert mask[:, 0].all()                           # right padding kept: every prompt starts at column 0
        widths.append(width)
    plan = [hi - lo for _, lo, hi in eng._prompt_chunks(full_mask)]
    assert plan == sorted(plan)                           # shortest first (calls may run concurrently)
    assert sorted(widths) == plan
    assert sorted(m.sum() for _, mask in calls for m in mask) == sorted(full_mask.sum(1))
    if tokens >= 100:                                     # a real budget packs several prompts per call
        assert len(calls) < len(texts)


@pytest.mark.parametrize("bad", [-1, 1.5, "1024", True, [64]])
def test_prompt_chunk_tokens_validation(export_dir, bad):
    from dpr.engine import Engine

    with pytest.raises(InputError, match="prompt_chunk_tokens"):
        Engine.load(export_dir, backend="onnxruntime", prompt_chunk_tokens=bad)


def test_prompt_chunk_tokens_auto_depends_on_the_device():
    from dpr.engine.engine import CPU_PROMPT_CHUNK_TOKENS, Engine

    assert Engine._check_prompt_chunk_tokens("auto", "cpu") == CPU_PROMPT_CHUNK_TOKENS > 0
    assert Engine._check_prompt_chunk_tokens("auto", "cuda:0") == 0      # one padded batch on a GPU
    assert Engine._check_prompt_chunk_tokens(None, "cpu") == 0
    assert Engine._check_prompt_chunk_tokens(64, "cuda") == 64          # an explicit budget is kept


def test_auto_retriever_on_cpu_is_the_fused_kernel_and_agrees(export_dir, engine):
    """retriever="auto" on the CPU picks the fused C++ kernel when it is built; with history exclusion and
    shared / per-row hard filters it returns what the onnxruntime retriever returns."""
    from dpr.engine import Engine
    from dpr.kernels import score_topk

    if not score_topk.library_available():
        pytest.skip("libdpr_score_topk.so is not built")
    auto = Engine.load(export_dir, backend="onnxruntime")
    assert auto.retriever_name == "fused" and "retriever 'fused'" in auto.choice_reason
    h, p, n = _requests(engine, 37, seed=5)
    flt = {"include_tags": [engine.tag_names[0]], "exclude_tags": [engine.tag_names[1]]}
    for kw in ({}, {"hard_filter": flt}, {"hard_filter": [flt if i % 3 else None for i in range(37)]},
               {"exclude_history": False}):
        got, ref = auto.recommend(h, p, n, k=10, **kw), engine.recommend(h, p, n, k=10, **kw)
        for gi, gs, ri, rs in zip(got.item_ids, got.scores, ref.item_ids, ref.scores):
            assert len(gi) == len(ri)
            assert len(set(gi) & set(ri)) >= len(ri) - 1                 # at most one near-tie swap
            np.testing.assert_allclose(gs, rs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,opts", BACKENDS)
def test_history_trimming_matches_full_length(export_dir, backend, opts):
    """Short histories run in length-ordered chunks cut to their longest history give the user vectors of
    the full max_len pass; the backend sees narrower item_seq arrays, never a cut history."""
    from dpr.engine import Engine

    if opts.get("fused") and not _fused_ok(export_dir):
        pytest.skip("fused graph or custom-op library unavailable")
    eng = Engine.load(export_dir, backend=backend, backend_options=opts, history_chunk_rows=4)
    plain = Engine.load(export_dir, backend=backend, backend_options=opts, history_chunk_rows=0)
    assert eng.backend.trims_history, "the test export is SASRec: its user graph takes cut histories"
    L = eng.max_len
    rng = np.random.default_rng(3)
    lens = [1, L, 2, 3, L // 2, 1, 4, 2, 3, L - 1, 1]
    seq = np.zeros((len(lens), L), np.int64)
    for i, ln in enumerate(lens):
        seq[i, L - ln:] = rng.integers(1, eng.num_items + 1, ln)
    seq[9, L - 5] = 0                               # a 0 inside a history: its width still counts from the first item
    p = rng.standard_normal((len(lens), eng.dim)).astype(np.float32)
    pres = np.array([[1, 0], [0, 1], [1, 1], [0, 0]] * 3, np.int64)[:len(lens)]
    widths = []
    real = eng.backend.encode_users

    def spy(item_seq, *a):
        widths.append((item_seq.shape[0], item_seq.shape[1]))
        return real(item_seq, *a)

    eng.backend.encode_users = spy
    got = eng.encode_users(seq, p, -p, pres)
    ref = plain.encode_users(seq, p, -p, pres)
    assert np.abs(got - ref).max() <= 1e-5
    assert all(r <= 4 for r, _ in widths) and sum(r for r, _ in widths) == len(lens)
    srt = sorted(lens)
    # e.g. 2, 4, max_len (sorted: with concurrent chunk workers the calls may come in any order)
    assert sorted(w for _, w in widths) == [max(srt[i:i + 4]) for i in range(0, len(srt), 4)]
    assert eng.describe()["history_chunk_rows"] == 4 and plain.describe()["history_chunk_rows"] == 0
    with pytest.raises(InputError, match="history_chunk_rows"):
        Engine.load(export_dir, backend=backend, history_chunk_rows=-1)
    assert Engine._check_history_chunk_rows("auto", "cuda") == 0 < Engine._check_history_chunk_rows("auto", "cpu")


def test_ort_session_settings(export_dir):
    """CPU sessions skip ORT's SkipLayerNormalization fusion (slow CPU kernel) and do not spin; the vectors
    equal those of ORT's defaults; malformed settings are clear errors."""
    from dpr.engine import Engine
    from dpr.engine.errors import BackendError

    eng = Engine.load(export_dir, backend="onnxruntime")
    stock = Engine.load(export_dir, backend="onnxruntime", backend_options={"disabled_optimizers": [], "spin": True})
    d = eng.backend.describe()
    assert d["disabled_optimizers"] == ["SkipLayerNormFusion"] and d["spin"] is False
    assert stock.backend.describe()["disabled_optimizers"] == [] and stock.backend.describe()["spin"] is True
    texts = ["something funny", "no horror tonight please", "x", "a long prompt " * 20]
    assert np.abs(eng.encode_prompts(texts) - stock.encode_prompts(texts)).max() <= 1e-5
    h, p, n = _requests(eng, 9, seed=2)
    a, b = eng.recommend(h, p, n, k=5), stock.recommend(h, p, n, k=5)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5)
    with pytest.raises(BackendError, match="disabled_optimizers"):
        Engine.load(export_dir, backend="onnxruntime", backend_options={"disabled_optimizers": "SkipLayerNormFusion"})


def test_torch_backend_compiled_user_encoder_agrees(export_dir):
    """backend_options={"compile": True}: the torch.compile'd user encoder equals the eager one, at the
    batch shapes the engine sends (cut histories of several widths, batch 1 included)."""
    from dpr.engine import Engine

    eng = Engine.load(export_dir, backend="torch", backend_options={"compile": True}, history_chunk_rows=3)
    plain = Engine.load(export_dir, backend="torch", history_chunk_rows=0)
    assert eng.backend.describe()["compiled"] is True and plain.backend.describe()["compiled"] is False
    h, p, n = _requests(eng, 10, seed=4)
    for batch in ((h, p, n), ([h[0]], [p[0]], [n[0]])):
        a, b = eng.recommend(*batch, k=5), plain.recommend(*batch, k=5)
        assert a.item_ids == b.item_ids
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5)


def test_batch_lookup_of_results_matches_the_per_row_path(engine):
    """Full rows of one k take the vectorised lookup; a batch with another k takes the per-row loop: same
    results, and the tags handed out are copies (mutating them leaves the engine's catalogue alone)."""
    from dpr.engine import Request

    hist = [engine.item_ids[i] for i in (0, 3, 5)]
    reqs = [Request(hist, "funny", None, 5), Request(hist[:1], None, "no horror", 5)]
    fast = engine._run_rows([engine.validate_request(r) for r in reqs])
    slow = engine._run_rows([engine.validate_request(r) for r in reqs + [Request(hist, None, None, 3)]])
    assert len(fast) == 2 and len(slow) == 3 and len(slow.item_ids[2]) == 3
    for field in ("item_ids", "titles", "tags"):
        assert getattr(fast, field) == getattr(slow, field)[:2], field
    # float rounding only: the two batches are split into different chunks for the user encoder
    np.testing.assert_allclose(fast.scores, slow.scores[:2], rtol=1e-6, atol=1e-6)
    assert all(type(s) is float for row in fast.scores for s in row)
    assert all(type(t) is list for row in fast.tags for t in row)
    j = engine.item_ids.index(fast.item_ids[0][0])
    before = list(engine.item_tags[j])
    fast.tags[0][0].append("mutated")
    assert list(engine.item_tags[j]) == before


def test_catalogue_adds_little_to_garbage_collection(export_dir):
    """The engine keeps its catalogue out of the garbage collector's books (tags as tuples of strings, the
    parsed items.json not kept), so a serving process's full collections do not walk every item."""
    import gc

    from dpr.engine import Engine

    Engine.load(export_dir, backend="onnxruntime").close()     # the lazy imports of a first load happen here
    gc.collect()
    before = len(gc.get_objects())
    eng = Engine.load(export_dir, backend="onnxruntime")
    gc.collect()
    added = len(gc.get_objects()) - before
    assert not gc.is_tracked(eng.item_tags[0]) and not gc.is_tracked(eng._tags_obj[0])
    assert added < eng.num_items, (added, eng.num_items)      # lists of tags would add 2 per item
    assert not hasattr(eng.export, "_items")


def test_batcher_threads_each_future_gets_its_own_result(engine):
    from dpr.engine import DynamicBatcher

    rng = np.random.default_rng(0)
    h, p, n = _requests(engine, 60, seed=21)
    pool = [dict(history=h[i], prompt=p[i], negative_prompt=n[i], k=int(rng.integers(1, 20)),
                 hard_filter=({"exclude_tags": [engine.tag_names[i % len(engine.tag_names)]]} if i % 5 == 0 else None))
            for i in range(60)]
    direct = [engine.recommend([r["history"]], [r["prompt"]], [r["negative_prompt"]], k=r["k"],
                               hard_filter=[r["hard_filter"]])[0] for r in pool]
    results: dict = {}
    errors = []
    with DynamicBatcher(engine, max_batch_size=128, max_delay_ms=2) as batcher:
        def worker(t):
            r = np.random.default_rng(t)
            futs = []
            for j in range(500):
                i = int(r.integers(len(pool)))
                futs.append(((t, j), i, batcher.submit(pool[i])))
            for key, i, f in futs:
                try:
                    results[key] = (i, f.result(timeout=60))
                except Exception as exc:  # noqa: BLE001
                    errors.append(exc)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        stats = batcher.stats()
    assert not errors
    assert len(results) == 8 * 500
    for i, rec in results.values():
        ref = direct[i]
        assert rec.item_ids == ref.item_ids or len(set(rec.item_ids) & set(ref.item_ids)) >= len(ref) - 1
        assert len(rec) == pool[i]["k"]
        assert np.allclose(rec.scores[-1], ref.scores[-1], atol=1e-4)
    assert stats["completed"] == 8 * 500 and stats["queued"] == 0
    assert stats["max_batch_seen"] > 1 and stats["batches"] < 8 * 500


def test_batcher_bad_request_fails_alone_overload_and_close(engine):
    from dpr.engine import ClosedError, DynamicBatcher, OverloadedError

    good = {"history": [engine.item_ids[1]], "prompt": "more comedy", "k": 3}
    with DynamicBatcher(engine, max_batch_size=8, max_delay_ms=20) as b:
        f1 = b.submit(good)
        bad = b.submit({"history": ["nope"], "k": 3})
        f2 = b.submit(dict(good, k=4))
        bad2 = b.submit(dict(good, prompt=""))
        with pytest.raises(InputError, match="nope"):
            bad.result(timeout=10)
        with pytest.raises(InputError, match="empty"):
            bad2.result(timeout=10)
        assert len(f1.result(timeout=10)) == 3 and len(f2.result(timeout=10)) == 4
        assert asyncio.run(b.submit_async(good)).item_ids == f1.result().item_ids

    # a batch that fails at run time: only the culprit fails
    # (pipelined: the batch fails in its device half; not pipelined: in the whole core)
    orig = engine._execute

    def flaky(prep, timings=None):
        if (prep.cols.ks == 7).any():
            raise RuntimeError("boom")
        return orig(prep, timings)
    for pipeline in (True, False):
        b = DynamicBatcher(engine, max_batch_size=8, max_delay_ms=50, pipeline=pipeline)
        engine._execute = flaky
        try:
            fs = [b.submit(dict(good, k=k)) for k in (3, 7, 5)]
            assert len(fs[0].result(timeout=10)) == 3 and len(fs[2].result(timeout=10)) == 5
            with pytest.raises(RuntimeError, match="boom"):
                fs[1].result(timeout=10)
            assert b.stats()["failed"] == 1
        finally:
            del engine._execute
            b.close()

    # overload: a long delay keeps requests queued
    b = DynamicBatcher(engine, max_batch_size=1000, max_delay_ms=10_000, max_queue=5)
    futs = [b.submit(good) for _ in range(5)]
    with pytest.raises(OverloadedError, match="full"):
        b.submit(good)
    b.close(timeout=30)                                         # drains: everything queued completes
    assert all(len(f.result(timeout=0)) == 3 for f in futs)
    with pytest.raises(ClosedError):
        b.submit(good)


def test_cli(export_dir, capsys):
    from dpr.engine.cli import main
    from dpr.engine import Engine

    ids = Engine.load(export_dir).item_ids
    assert main([str(export_dir), "--history", ",".join(ids[:3]), "--prompt", "more comedy", "-k", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("score=") == 4
    assert main([str(export_dir), "--history", ids[0], "--negative", "no horror", "-k", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["items"]) == 2 and {"id", "title", "tags", "score"} <= set(data["items"][0])
    assert main([str(export_dir), "--history", "nope", "-k", "2"]) == 2
    assert "dpr-recommend: error:" in capsys.readouterr().err
    assert main([str(export_dir), "--history", ids[0], "--backend", "tensorrt"]) == 2
    assert "dpr-recommend: error:" in capsys.readouterr().err


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_backend_agrees(export_dir, reference):
    from dpr.engine import Engine

    eng = Engine.load(export_dir, backend="tensorrt", device="cuda")
    if eng.export.graph_file("user_encoder") is not None:
        # the real fused graph, with the plugin in the built network, is what answered
        assert eng.backend.fused, eng.choice_reason
        assert "fused dpr::FusedMoEGate plugin" in eng.choice_reason
    for b in (1, 7, 512):
        (h, p, n), ref = _ref(reference, b)
        overlap, err = _agree(eng.recommend(h, p, n, k=10), ref)
        assert overlap >= 0.99 and err <= 1e-4


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_backend_fp16_agrees(export_dir, reference):
    from dpr.engine import Engine

    eng = Engine.load(export_dir, backend="tensorrt", device="cuda", backend_options={"fp16": True})
    if eng.export.graph_file("user_encoder") is not None:
        assert eng.backend.fused, eng.choice_reason
    for b in (1, 7, 512):
        (h, p, n), ref = _ref(reference, b)
        overlap, err = _agree(eng.recommend(h, p, n, k=10), ref)
        assert overlap >= 0.9 and err <= 5e-2          # fp16 engine: recorded tolerance, not fp32's


@pytest.mark.gpu
def test_onnxruntime_cuda_agrees(export_dir, reference):
    from dpr.engine import Engine
    from dpr.engine.backends.onnxruntime_backend import OnnxRuntimeBackend

    ok, why = OnnxRuntimeBackend.availability("cuda")
    if not ok:
        pytest.skip(why)
    eng = Engine.load(export_dir, backend="onnxruntime", device="cuda")
    (h, p, n), ref = _ref(reference, 7)
    overlap, err = _agree(eng.recommend(h, p, n, k=10), ref)
    assert overlap >= 0.99 and err <= 1e-4


@pytest.mark.gpu
def test_torch_backend_cuda_agrees(export_dir, reference):
    """The reference backend itself on CUDA (weights from the export alone) with the CUDA torch
    retriever (fp32 table), against the CPU reference, odd batch sizes included."""
    import torch

    from dpr.engine import Engine

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    eng = Engine.load(export_dir, backend="torch", device="cuda", retriever="torch")
    assert eng.backend.model.item_emb.weight.is_cuda
    for b in (1, 7, 300):
        (h, p, n), ref = _ref(reference, b)
        overlap, err = _agree(eng.recommend(h, p, n, k=10), ref)
        assert overlap >= 0.99 and err <= 1e-4, (b, overlap, err)


def test_concurrent_chunks_agree_with_serial_runs(export_dir):
    """ONNX Runtime on the CPU with parallel_chunks: single-threaded sessions and the engine's workers run
    several chunks of a batch at once. Prompt and user vectors, and the recommendations, equal the serial
    (intra-op threaded) engine's; the calls really come from several threads; a small batch is split so every
    worker gets rows; a non-trimming run (history_chunk_rows=0) is split too."""
    import threading
    import time as _time

    from dpr.engine import Engine

    par = Engine.load(export_dir, backend="onnxruntime", prompt_cache_size=0,
                      backend_options={"parallel_chunks": True, "intra_op_threads": 3}, history_chunk_rows=4)
    ser = Engine.load(export_dir, backend="onnxruntime", prompt_cache_size=0,
                      backend_options={"parallel_chunks": False}, history_chunk_rows=0)
    d = par.backend.describe()
    assert d["parallel_chunks"] is True and d["intra_op_threads"] == 1 and d["concurrent_runs"] == 3
    assert par.chunk_workers == 3 and par.describe()["chunk_workers"] == 3
    assert ser.chunk_workers == 1 and ser.backend.describe()["concurrent_runs"] == 1
    seen: dict[str, list] = {"users": [], "prompts": []}
    for name, attr in (("users", "encode_users"), ("prompts", "encode_prompts")):
        real = getattr(par.backend, attr)

        def spy(*a, _real=real, _name=name):
            seen[_name].append((threading.get_ident(), a[0].shape[0]))
            _time.sleep(0.01)                     # long enough that the other workers take the next chunks
            return _real(*a)

        setattr(par.backend, attr, spy)
    h, p, n = _requests(par, 23, seed=6)
    a, b = par.recommend(h, p, n, k=7), ser.recommend(h, p, n, k=7)
    assert a.item_ids == b.item_ids
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5)
    assert sum(r for _, r in seen["users"]) == 23 and max(r for _, r in seen["users"]) <= 4
    assert len({t for t, _ in seen["users"]}) >= 2 and len({t for t, _ in seen["prompts"]}) >= 2
    assert threading.get_ident() in {t for t, _ in seen["users"]}   # the caller takes chunks too (ChunkRunner)
    seen["users"].clear()
    one = par.recommend(h[:2], p[:2], n[:2], k=7)                # two rows, three workers: one row each
    assert sorted(r for _, r in seen["users"]) == [1, 1] and one.item_ids == b.item_ids[:2]
    texts = [f"show me something like number {i} " * (1 + i % 5) for i in range(19)]
    np.testing.assert_allclose(par.encode_prompts(texts), ser.encode_prompts(texts), rtol=1e-5, atol=1e-5)
    flat = Engine.load(export_dir, backend="onnxruntime", backend_options={"parallel_chunks": True,
                                                                          "intra_op_threads": 2},
                       history_chunk_rows=0)
    calls = []
    real = flat.backend.encode_users
    flat.backend.encode_users = lambda s, *a: calls.append(s.shape) or real(s, *a)
    u = flat.encode_users(h, None, None, None)
    assert sorted(calls) == [(11, flat.max_len), (12, flat.max_len)]
    np.testing.assert_allclose(u, ser.encode_users(h, None, None, None), rtol=1e-5, atol=1e-5)
    for e in (par, ser, flat):
        e.close()


def test_concurrent_chunk_errors_and_closed_engine(export_dir):
    """An error in one chunk reaches the caller once no chunk runs, and no chunk starts after it (the one in
    flight on the other worker finishes); a closed engine refuses work; parallel_chunks takes only True, False or
    None."""
    from dpr.engine import Engine
    from dpr.engine.errors import BackendError

    eng = Engine.load(export_dir, backend="onnxruntime",
                      backend_options={"parallel_chunks": True, "intra_op_threads": 2}, history_chunk_rows=2)
    done, running = [], [0]
    real = eng.backend.encode_users

    def flaky(s, *a):
        if len(done) == 1:
            done.append("boom")
            raise RuntimeError("chunk failed")
        done.append(s.shape[0])
        running[0] += 1
        try:
            return real(s, *a)
        finally:
            running[0] -= 1

    eng.backend.encode_users = flaky
    h, _, _ = _requests(eng, 9, seed=1)
    with pytest.raises(RuntimeError, match="chunk failed"):
        eng.encode_users(h)
    assert running[0] == 0 and done.count("boom") == 1
    assert 2 <= len(done) <= 3          # 5 chunks of 2 rows: the failed one, the other worker's, at most one more
    eng.close()
    with pytest.raises(DPRError, match="closed"):
        eng._run_chunks(lambda c: None, [1, 2])
    for bad in ("yes", 1):
        with pytest.raises(BackendError, match="parallel_chunks"):
            Engine.load(export_dir, backend="onnxruntime", backend_options={"parallel_chunks": bad})


def test_history_ids_through_the_id_index_and_the_dict_agree(export_dir):
    """Histories mapped by the C++ id index give what the dict gives; an unknown id and an id with a NUL
    inside still take the checked per-row path, which names them."""
    from dpr.engine import Engine
    from dpr.kernels import id_index

    if not id_index.library_available():
        pytest.skip("libdpr_id_index.so is not built")
    eng = Engine.load(export_dir, backend="onnxruntime")
    plain = Engine.load(export_dir, backend="onnxruntime")
    plain._id_index = None
    assert eng._id_index is not None
    calls = []
    real = eng._id_index.lookup
    eng._id_index.lookup = lambda ids, n: calls.append(n) or real(ids, n)
    h, p, n = _requests(eng, 17, seed=8)
    a, b = eng.recommend(h, p, n, k=6), plain.recommend(h, p, n, k=6)
    assert calls == [sum(map(len, h))] and a.item_ids == b.item_ids
    for bad in ([h[0] + ["no-such-item"]], [h[0][:1] + [h[0][1] + "\0"]]):
        with pytest.raises(InputError, match="request 0: history holds unknown item id"):
            eng.recommend(bad, k=3)
    calls.clear()
    as_numpy = [np.array(h[1]), np.array(h[2], dtype=object)]        # numpy str_ ids are str: the index takes them
    assert eng.recommend(as_numpy, k=4).item_ids == plain.recommend([h[1], h[2]], k=4).item_ids
    assert calls == [len(h[1]) + len(h[2])]


def test_user_encoder_inputs_are_what_recommend_feeds(engine):
    """``user_encoder_inputs``: histories padded as pad_histories pads them (long ones cut to the newest
    max_len), each prompt's cached vector in its row, presence flags; bad input is refused as recommend refuses
    it; the user vectors it leads to rank what recommend returns."""
    h, p, n = _requests(engine, 13, seed=12)
    h[3] = (h[3] * (engine.max_len // max(1, len(h[3])) + 2))[: engine.max_len + 5]    # over max_len
    h[3] = list(dict.fromkeys(h[3])) or h[3]
    seq, p_pos, p_neg, presence = engine.user_encoder_inputs(h, p, n)
    ref_seq = engine.pad_histories([engine.validate_request({"history": x}).seq for x in h])
    np.testing.assert_array_equal(seq, ref_seq)
    for i in range(13):
        assert presence[i].tolist() == [int(p[i] is not None), int(n[i] is not None)]
        if p[i] is not None:
            np.testing.assert_array_equal(p_pos[i], engine.encode_prompts([p[i]])[0])
        else:
            assert not p_pos[i].any()
        if n[i] is not None:
            np.testing.assert_array_equal(p_neg[i], engine.encode_prompts([n[i]])[0])
        else:
            assert not p_neg[i].any()
    assert presence.dtype == np.int64 and p_pos.dtype == p_neg.dtype == np.float32
    assert p_pos.shape == p_neg.shape == (13, engine.dim) and p_pos.flags.c_contiguous
    _, q_pos, q_neg, none = engine.user_encoder_inputs(h[:3])          # no prompt at all: zeros, no flags
    assert not q_pos.any() and not q_neg.any() and not none.any() and none.shape == (3, 2)
    users = engine.encode_users(seq, p_pos, p_neg, presence)
    idx, _ = engine.retrieve(users, 5, exclude=[engine.validate_request({"history": x}).seq for x in h])
    assert [[engine.item_ids[j - 1] for j in row] for row in idx] == engine.recommend(h, p, n, k=5).item_ids
    with pytest.raises(InputError, match="prompts has 1 entries"):
        engine.user_encoder_inputs(h, ["x"])
    with pytest.raises(InputError, match="unknown item id"):
        engine.user_encoder_inputs([["nope"]])


def test_vectorised_padding_matches_pad_histories(engine):
    """The batch path's one-pass padding equals ``pad_histories`` (the row-by-row specification) on rows of
    every length: one item, exactly max_len, longer (cut to the newest), and a mix."""
    from dpr.engine.engine import _flatten

    rng = np.random.default_rng(4)
    L = engine.max_len
    for lens in ([1], [L], [L + 9], [3, L, 1, 2 * L + 1, L - 1, 7]):
        seqs = [rng.integers(1, engine.num_items + 1, n) for n in lens]
        np.testing.assert_array_equal(engine._pad_flat(*_flatten(seqs)), engine.pad_histories(seqs))


# ---- clear errors and explicit short results (non-string ids, short rows, damaged files) ---------------

NON_STRING_IDS = [(12, r"int 12"), (None, r"None"), (b"i12", r"bytes b'i12'"), (1.5, r"float 1\.5"),
                  (np.int64(7), r"int64 7"), (True, r"bool True")]


@pytest.mark.parametrize("bad,got", NON_STRING_IDS, ids=["int", "None", "bytes", "float", "np.int64", "bool"])
def test_non_string_history_ids_say_ids_are_strings(engine, monkeypatch, bad, got):
    """A history entry that is not a string is reported as such, not as an unknown id: the request and the
    position, the type received and what this export's ids look like; on the batch path (with the C++ id
    index when built, and with the dict), on the per-request path (validate_request, the dynamic batcher)
    and in encode_users."""
    from dpr.engine import DynamicBatcher

    ids = engine.item_ids
    example = re.escape(f"ids in this export look like {ids[0]!r}")
    rows = [[ids[0]], [ids[1], ids[2]], [ids[3]], [ids[4], bad, ids[5]]]
    for index in (engine._id_index, None):                            # the C++ index, then the dict fallback
        monkeypatch.setattr(engine, "_id_index", index)
        with pytest.raises(InputError, match=rf"request 3: history: item ids are strings \(got {got} at position 1\)"
                                             rf".*{example}") as info:
            engine.recommend(rows, k=3)
        assert "unknown item id" not in str(info.value)
    monkeypatch.undo()
    with pytest.raises(InputError, match=rf"request 5: history: item ids are strings \(got {got} at position 0\).*"
                                         rf"{example}"):
        engine.validate_request({"history": [bad, ids[1]], "k": 3}, "request 5")
    with pytest.raises(InputError, match=rf"history 1: item ids are strings \(got {got} at position 2\)"):
        engine.encode_users([[ids[0]], [ids[1], ids[2], bad]])
    with DynamicBatcher(engine, max_batch_size=4, max_delay_ms=1) as b:
        with pytest.raises(InputError, match=rf"item ids are strings \(got {got} at position 0\).*{example}"):
            b.submit({"history": [bad], "k": 3}).result(timeout=10)
    # in a hard filter's exclude_items: an integer is read as its decimal string (here unknown), the rest refused
    integer = isinstance(bad, (int, np.integer)) and not isinstance(bad, bool)
    with pytest.raises(InputError, match=(r"unknown item id" if integer else r"exclude_items: item ids are strings")
                       + rf".*{example}"):
        engine.recommend([[ids[0]]], k=3, hard_filter={"exclude_items": [bad]})
    assert engine.recommend([[ids[4], ids[5]]], k=3).item_ids                  # still serving


def test_non_string_id_hints_and_unknown_string_ids_show_an_example(engine, export_dir):
    from dpr.engine import Engine

    ids = engine.item_ids
    with pytest.raises(InputError, match=re.escape(f"decode bytes ids to str ({ids[11]!r} is an id of this export)")):
        engine.recommend([[ids[11].encode()]], k=2)
    with pytest.raises(InputError, match=r"request 1: history holds unknown item id 'nope' at position 2 \(not in "
                                         rf"the export's catalogue; ids in this export look like {ids[0]!r}"):
        engine.recommend([[ids[0]], [ids[0], ids[1], "nope"]], k=2)
    # an integer whose decimal form is an id is taken as that id (catalogues of numeric ids, e.g. ML-1M)
    eng = Engine.load(export_dir, backend="onnxruntime")
    eng._id_to_index["12"] = eng._id_to_index[ids[11]]
    want = engine.recommend([[ids[11]]], k=4).item_ids[0]
    assert eng.recommend([[12], [np.int64(12)]], k=4).item_ids == [want, want]
    # unknown_items="ignore" skips entries that are not ids, as it skips unknown ids
    ign = Engine.load(export_dir, backend="onnxruntime", unknown_items="ignore")
    assert ign.recommend([[ids[3], None, 12, b"x", ids[4]]], k=5).item_ids == \
        ign.recommend([[ids[3], ids[4]]], k=5).item_ids


def test_short_results_carry_counts_and_reasons(engine):
    """Rows with fewer eligible items than k: each result says how many came back and why; full rows have
    no reason; counts agree with the items on the batch path, the per-row path (several k) and to_dict."""
    ids = engine.item_ids
    n = engine.num_items
    flt = {"exclude_items": ids[8:]}                                   # 8 items allowed: ids[0..7]
    recs = engine.recommend([ids[:5], ids[20:23], ids[:2]], k=10, hard_filter=[flt, None, flt])
    assert recs.ks == [10, 10, 10]
    assert recs.counts == [3, 10, 6] == [len(r) for r in recs.item_ids]
    assert recs.short_rows == [0, 2] and recs.short_reasons[1] is None
    assert recs.short_reasons[0] == (f"only 3 items remain after excluding the 5 history items and applying the "
                                     f"hard filter, which allows 8 of the {n} items (k=10)")
    assert recs.short_reasons[2].startswith("only 6 items remain after excluding the 2 history items")
    r0, r1 = recs[0], recs[1]
    assert (r0.k, r0.count, r0.short) == (10, 3, True)
    assert (r1.k, r1.count, r1.short, r1.short_reason) == (10, 10, False, None)
    d = r0.to_dict()
    assert (d["k"], d["count"], d["short_reason"]) == (10, 3, recs.short_reasons[0]) and len(d["items"]) == 3
    assert [x["count"] for x in recs.to_list()] == [3, 10, 6]
    # the history alone, then the filter alone (history kept)
    recs = engine.recommend([ids[:n - 3]], k=10)
    assert recs.counts == [3] and recs.short_reasons == [
        f"only 3 items remain after excluding the {n - 3} history items from the {n} in the catalogue (k=10)"]
    recs = engine.recommend([ids[:5]], k=10, exclude_history=False, hard_filter={"exclude_items": ids[1:]})
    assert recs.counts == [1] and recs.short_reasons == [
        f"only 1 item remains after applying the hard filter, which allows 1 of the {n} items (k=10)"]
    recs = engine.recommend([ids[:1]], k=10, hard_filter={"exclude_items": ids[1:]})
    assert recs.counts == [0] and recs.item_ids == [[]] and recs.short_reasons[0].startswith("no items remain")
    # full rows (the vectorised lookup): counts, no reasons
    recs = engine.recommend([ids[:3], ids[5:9]], k=7)
    assert recs.counts == [7, 7] and recs.short_reasons == [None, None] and recs.short_rows == []
    assert recs[1].to_dict()["count"] == 7 and recs[1].to_dict()["short_reason"] is None
    # the per-row path (requests of different k, as the dynamic batcher runs them)
    rows = [engine.validate_request({"history": ids[:5], "k": 10, "hard_filter": flt}),
            engine.validate_request({"history": ids[:5], "k": 3, "hard_filter": flt}),
            engine.validate_request({"history": ids[30:32], "k": 4})]
    recs = engine._run_rows(rows)
    assert recs.ks == [10, 3, 4] and recs.counts == [3, 3, 4] and recs.short_rows == [0]
    assert "only 3 items remain" in recs.short_reasons[0] and recs[0].short and not recs[1].short


def test_short_result_the_retriever_cut_is_not_blamed_on_the_filters(engine, monkeypatch):
    """Counts come from the retriever's output (-1 padding); a row it returns short although enough items are
    eligible is reported as such, not explained by the history or the filter."""
    real = engine.retrieve

    def drop_last(*a, **kw):
        idx, sc = real(*a, **kw)
        idx, sc = idx.copy(), sc.copy()
        idx[1, -2:], sc[1, -2:] = -1, -np.inf
        return idx, sc

    monkeypatch.setattr(engine, "retrieve", drop_last)
    ids = engine.item_ids
    recs = engine.recommend([ids[:2], ids[2:4]], k=5)
    assert recs.counts == [5, 3] and recs.short_rows == [1] and len(recs.item_ids[1]) == 3
    assert recs.short_reasons[1] == (f"only 3 of the {engine.num_items - 2} eligible items came back "
                                     f"(k=5; retriever {engine.retriever_name!r})")


def test_short_result_from_the_batcher(engine):
    from dpr.engine import DynamicBatcher

    ids = engine.item_ids
    with DynamicBatcher(engine, max_batch_size=8, max_delay_ms=20) as b:
        short = b.submit({"history": ids[:5], "k": 10, "hard_filter": {"exclude_items": ids[8:]}})
        full = b.submit({"history": ids[:5], "k": 4})
        rs, rf = short.result(timeout=10), full.result(timeout=10)
    assert (rs.count, rs.k, rs.short) == (3, 10, True) and "only 3 items remain" in rs.short_reason
    assert (rf.count, rf.k, rf.short, rf.short_reason) == (4, 4, False, None)


def test_cli_says_when_a_result_is_short(export_dir, capsys):
    from dpr.engine import Engine
    from dpr.engine.cli import main

    ids = Engine.load(export_dir).item_ids
    n = len(ids)
    hist = ",".join(ids[:n - 3])
    assert main([str(export_dir), "--history", hist, "-k", "10"]) == 0
    out = capsys.readouterr().out
    assert out.count("score=") == 3
    assert (f"note: 3 of the 10 items asked for: only 3 items remain after excluding the {n - 3} history items "
            f"from the {n} in the catalogue (k=10)") in out
    assert main([str(export_dir), "--history", hist, "-k", "10", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["k"], data["count"], len(data["items"])) == (10, 3, 3)
    assert data["short_reason"].startswith("only 3 items remain after excluding")
    assert main([str(export_dir), "--history", ids[0], "-k", "4"]) == 0
    assert "note:" not in capsys.readouterr().out
    assert main([str(export_dir), "--history", ids[0], "-k", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["k"], data["count"], data["short_reason"]) == (4, 4, None)


def _truncate(path: Path, keep: float) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


@pytest.mark.parametrize("name,keep,match", [
    ("item_embeddings.npy", 0.5, r"item_embeddings\.npy is damaged: .*\(truncated\?\); re-export or restore it"),
    ("item_embeddings.npy", 0.003, r"item_embeddings\.npy is damaged: .*header.*\(truncated\?\)"),
    ("item_embeddings.npy", 0.0, r"item_embeddings\.npy is damaged: .*\(truncated\?\)"),
    ("items.json", 0.5, r"items\.json is damaged: JSONDecodeError.*\(truncated\?\); re-export or restore it"),
    ("items.json", 0.0, r"items\.json is damaged: JSONDecodeError"),
    ("tokenizer.json", 0.5, r"tokenizer\.json is damaged: .*\(truncated\?\); re-export or restore it"),
    ("manifest.json", 0.5, r"manifest\.json is damaged: not readable JSON .*\(truncated\?\); re-export or restore it"),
    ("manifest.json", 0.0, r"manifest\.json is damaged"),
], ids=["npy-half", "npy-header", "npy-empty", "items-half", "items-empty", "tokenizer-half", "manifest-half",
        "manifest-empty"])
def test_damaged_files_without_hash_checks_are_named(export_dir, tmp_path, name, keep, match):
    """With verify_hashes=False nothing compares sha256s: a truncated file must still be a clear
    ExportFolderError naming it, not a bare ValueError / JSONDecodeError / tokenizers Exception."""
    from dpr.engine import Engine, ExportFolderError

    d = tmp_path / "exp"
    shutil.copytree(export_dir, d)
    _truncate(d / name, keep)
    with pytest.raises(ExportFolderError, match=match) as info:
        Engine.load(d, backend="onnxruntime", verify_hashes=False)
    assert str(d / name) in str(info.value)
    if name != "manifest.json":
        assert "verify_hashes=True" in str(info.value)               # the way to find every damaged file
    with pytest.raises(ExportFolderError, match="sha256" if name != "manifest.json" else "manifest.json"):
        Engine.load(d, backend="onnxruntime")                          # hashes on: caught before reading it


def test_damaged_export_contents_are_named(export_dir, tmp_path):
    """Files that parse but do not hold what the manifest records: a wrong-shape item table, items.json with
    lists of different lengths or a different item count, a manifest without model_config.max_len."""
    from dpr.engine import ExportFolderError, load_export

    d = tmp_path / "exp"
    shutil.copytree(export_dir, d)
    ex = load_export(d, verify_hashes=False)
    table = np.load(d / "item_embeddings.npy")
    np.save(d / "item_embeddings.npy", table[:-5])
    with pytest.raises(ExportFolderError, match=rf"item_embeddings\.npy is damaged: .*shape \({len(table) - 5}, "
                                                rf"{table.shape[1]}\).*\[{len(table)}, {table.shape[1]}\]"):
        ex.item_embeddings()
    np.save(d / "item_embeddings.npy", table.astype(np.int64))
    with pytest.raises(ExportFolderError, match=r"item_embeddings\.npy is damaged: holds an array of dtype int64"):
        ex.item_embeddings()
    items = json.loads((d / "items.json").read_text())
    (d / "items.json").write_text(json.dumps(dict(items, titles=items["titles"][:-1])))
    with pytest.raises(ExportFolderError, match=r"items\.json is damaged: \d+ ids but \d+ titles"):
        ex.items()
    (d / "items.json").write_text(json.dumps({k: v[:-1] if isinstance(v, list) and k != "tag_names" else v
                                              for k, v in items.items()}))
    with pytest.raises(ExportFolderError, match=rf"items\.json is damaged: {len(items['ids']) - 1} items, the "
                                                rf"manifest records {len(items['ids'])}"):
        ex.items()
    (d / "items.json").write_text(json.dumps(items["ids"]))
    with pytest.raises(ExportFolderError, match=r"items\.json is damaged: it lacks"):
        ex.items()
    m = json.loads((d / "manifest.json").read_text())
    del m["model_config"]["max_len"]
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ExportFolderError, match=r"manifest\.json is damaged: model_config\.max_len is None"):
        load_export(d, verify_hashes=False)
