"""dpr-bench end to end with tiny sizes, its JSON summary, the --model path, bad options, and the int8
prompt encoder (export gate, manifest record, ONNX Runtime backend option). Nothing here asserts a speed:
the machine is shared and timings are noise at these sizes."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest


FAST = ["--iters", "2", "--warmup", "1", "--gate-min-time", "0.02", "--ceiling-size", "256", "--no-progress",
        "--batcher-rate", "400", "--batcher-seconds", "0.25"]


@pytest.fixture(scope="session")
def export_without_int8(bench_export, tmp_path_factory) -> Path:
    """A copy of bench_export whose manifest no longer lists the int8 graph (as dpr-export without --int8)."""
    dst = tmp_path_factory.mktemp("bench-noint8") / "exp"
    shutil.copytree(bench_export, dst)
    man = json.loads((dst / "manifest.json").read_text())
    del man["graphs"]["prompt_encoder_int8"]
    del man["files"]["prompt_encoder_int8.onnx"]
    (dst / "prompt_encoder_int8.onnx").unlink()
    (dst / "manifest.json").write_text(json.dumps(man))
    return dst


@pytest.fixture(scope="session")
def default_run(tiny_encoder_dir, tmp_path_factory):
    """dpr-bench on the default (untrained, built on the fly) model: tiny sizes, the tiny encoder. Its
    cached export (int8 prompt encoder included) serves the --model and int8 tests, so the suite exports
    one model, not two."""
    from dpr.bench.cli import main

    tmp = tmp_path_factory.mktemp("bench-default")
    out = tmp / "bench.json"
    rc = main(["--items", "1000", "--batch", "16", "--text-encoder", str(tiny_encoder_dir), "--cache-dir",
               str(tmp / "cache"), "--retrieval-items", "1e3,5000", "--json", str(out), *FAST])
    assert rc == 0
    return json.loads(out.read_text()), tmp


@pytest.fixture(scope="session")
def bench_export(default_run) -> Path:
    """The default model's export (written by dpr-export's export() with int8=True)."""
    return Path(default_run[0]["model"]["path"])


def _has_fused_lib() -> bool:
    from dpr.kernels import build

    return build.ort_library_path(cuda=False) is not None


# ---- the default model, end to end -------------------------------------------------------------

def test_default_run_json_has_every_field(default_run):
    res, _ = default_run
    for key in ("machine", "versions", "config", "model", "runs", "speedup_vs_torch", "fused_vs_portable",
                "retrieval", "retrieval_section", "gating", "baseline", "user_encoder_gating"):
        assert key in res, key
    m = res["machine"]
    assert isinstance(m["cpu"], str) and m["cpu"] and m["logical_cores"] >= 1 and "gpu" in m
    assert res["versions"]["torch"] and res["versions"]["onnxruntime"]
    assert res["config"]["batch"] == 16 and res["config"]["iters"] == 2
    # the model is labelled untrained everywhere
    assert res["model"]["untrained"] is True and "UNTRAINED" in res["model"]["label"]
    assert res["model"]["num_items"] == 1000
    # every backend x prompt mode run, and the plain PyTorch pipeline on the same batches
    modes = ["unique", "templates", "none"]
    backends = {"torch", "onnxruntime", "onnxruntime-int8"}
    runs = {(r["backend"], r["prompts"]): r for r in res["runs"]}
    for mode in modes:
        assert ("pytorch-pipeline", mode) in runs
        for be in backends:
            assert (be, mode) in runs
            ratio = res["speedup_vs_torch"][f"{be}/{mode}"]
            assert isinstance(ratio, float) and ratio > 0
    assert set(res["speedup_vs_torch"]) == {f"{b}/{m}" for b in backends for m in modes}
    for r in res["runs"]:
        t = r["total"]
        assert t["samples"] == 2 and 0 < t["median_ms"] <= t["p90_ms"] <= t["p99_ms"] and t["throughput_rps"] > 0
        assert set(r["stages"]) == {"tokenize", "prompt_encoder", "user_encoder", "retrieval", "other"}
        assert r["stages"]["user_encoder"]["median_ms"] > 0 and r["stages"]["retrieval"]["median_ms"] > 0
        if r["prompts"] != "none":
            assert r["stages"]["prompt_encoder"]["median_ms"] > 0
        assert 0.0 <= r["top10_agreement"] <= 1.0
    # fp32 backends rank like the pipeline (same model, same inputs)
    for be in ("torch", "onnxruntime"):
        for mode in modes:
            assert runs[(be, mode)]["top10_agreement"] >= 0.9, (be, mode)
    # prompt cache: repeated template prompts hit, unique prompts never do
    for be in backends:
        uniq, tmpl = runs[(be, "unique")]["prompt_cache"], runs[(be, "templates")]["prompt_cache"]
        assert uniq["hits"] == 0 and uniq["hit_rate"] == 0.0
        assert tmpl["hit_rate"] > uniq["hit_rate"]


def test_default_run_batcher_section(default_run):
    """Single requests at a fixed rate through the DynamicBatcher, pipelined, serial, pipelined: every one
    answered (none lost or failed), latencies ordered, the batcher formed batches."""
    bl = default_run[0]["batcher"]
    assert bl["rate_rps"] == 400 and [r["pipeline"] for r in bl["runs"]] == [True, False, True]
    for r in bl["runs"]:
        assert r["requests"] == 100 and r["lost"] == 0 and r["failed"] == 0, r
        assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert r["batches"] >= 1 and 1 <= r["max_batch_seen"] <= 16


def test_default_run_retrieval_gating_and_int8(default_run):
    from dpr.engine.retrieval import available_retrievers

    res, _ = default_run
    rows = res["retrieval"]
    names = set(available_retrievers()) | ({"fused-fp32"} if "fused" in available_retrievers() else set())
    assert {(r["items"], r["retriever"]) for r in rows} == {(n, name) for n in (1000, 5000) for name in names}
    for r in rows:
        assert r["ms"] > 0 and r["gflops"] > 0 and r["ceiling_gflops"] > 0 and r["gbps"] > 0
    if _has_fused_lib():
        assert isinstance(res["fused_vs_portable"], float) and res["fused_vs_portable"] > 0
        assert {int(b) for b in res["gating"]["batches"]} == {1, 16, 64, 4096}
        ug = res["user_encoder_gating"]["onnxruntime"]
        assert ug["fused"]["median_ms"] > 0 and ug["portable"]["median_ms"] > 0 and ug["ratio"] > 0
    int8 = res["model"]["int8_prompt_encoder"]
    assert int8["file"] == "prompt_encoder_int8.onnx" and int8["worst_row_cosine"] >= 0.98
    assert int8["quantization"]["per_channel"] is True


def test_default_model_export_is_cached(default_run, tiny_encoder_dir, capsys):
    """A second run reuses the cached export and still prints one table ending the report."""
    from dpr.bench.cli import main

    _, tmp = default_run
    before = sorted(p.name for p in (tmp / "cache").iterdir())
    rc = main(["--items", "1000", "--batch", "8", "--text-encoder", str(tiny_encoder_dir), "--cache-dir",
               str(tmp / "cache"), "--backends", "onnxruntime", "--prompts", "templates", "--no-retrieval",
               "--no-gate", *FAST])
    assert rc == 0
    assert sorted(p.name for p in (tmp / "cache").iterdir()) == before
    cap = capsys.readouterr()
    assert "reusing the cached export" in cap.err
    out = cap.out
    assert "UNTRAINED" in out and "pytorch-pipeline" in out and "onnxruntime" in out
    assert out.strip().splitlines()[-1].startswith("NOTE: the model is UNTRAINED")


# ---- --model -------------------------------------------------------------------------------------

def test_model_export_run_with_plot(bench_export, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from dpr.bench.cli import main

    out, png = tmp_path / "b.json", tmp_path / "b.png"
    rc = main(["--model", str(bench_export), "--batch", "16", "--prompts", "unique,templates", "--backends",
               "onnxruntime,onnxruntime-int8,torch", "--no-retrieval", "--no-gate", "--json", str(out), "--plot",
               str(png), *FAST])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["model"]["kind"] == "export" and res["model"]["path"] == str(bench_export)
    assert res["model"]["untrained"] is True                         # from the checkpoint meta in the manifest
    assert set(res["speedup_vs_torch"]) == {f"{b}/{m}" for b in ("onnxruntime", "onnxruntime-int8", "torch")
                                            for m in ("unique", "templates")}
    assert res["retrieval"] == [] and res["fused_vs_portable"] is None
    assert res["backends"]["onnxruntime-int8"]["backend"]["prompt_graph"] == "prompt_encoder_int8.onnx"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert "x torch" in capsys.readouterr().out


# ---- bad input: one line, non-zero exit ------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--backends", "torch,nope"], "unknown backend(s) ['nope']"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--items", "0"], "--items must be >= 1"),
    (["--iters", "0"], "--iters must be >= 1"),
    (["--prompts", "sometimes"], "unknown mode(s) ['sometimes']"),
    (["--retrieval-items", "1e4,lots"], "'lots' is not a number"),
    (["--device", "tpu"], "--device must be cpu, cuda or auto"),
    (["--model", "/nonexistent/export-dir"], "export folder not found"),
])
def test_bad_options(argv, message, capsys):
    from dpr.bench.cli import main

    rc = main(argv + ["--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert err.startswith("dpr-bench: error:") and message in err and len(err.splitlines()) == 1, err


def test_not_an_export_folder(tmp_path, capsys):
    from dpr.bench.cli import main

    assert main(["--model", str(tmp_path)]) != 0
    assert "manifest.json" in capsys.readouterr().err


def test_int8_backend_missing_from_export(export_without_int8, capsys):
    from dpr.bench.cli import main

    rc = main(["--model", str(export_without_int8), "--backends", "onnxruntime-int8", "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0 and "no int8 prompt encoder" in err and "--int8" in err


def test_cuda_without_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here")
    from dpr.bench.cli import main

    assert main(["--device", "cuda", "--no-progress"]) != 0
    assert "no CUDA device" in capsys.readouterr().err


def test_plot_without_matplotlib(monkeypatch, capsys):
    from dpr.bench.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)           # import matplotlib -> ImportError
    assert main(["--plot", "/tmp/never.png", "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert "matplotlib" in err and 'pip install "dpr[plot]"' in err


def test_bad_argument_type_exits_2():
    from dpr.bench.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--batch", "many"])
    assert exc.value.code == 2


# ---- the int8 prompt encoder ------------------------------------------------------------------------

def test_int8_recorded_in_manifest(bench_export):
    man = json.loads((bench_export / "manifest.json").read_text())
    g = man["graphs"]["prompt_encoder_int8"]
    assert g["file"] == "prompt_encoder_int8.onnx" and "prompt_encoder_int8.onnx" in man["files"]
    par = g["parity"]
    assert par["worst_row_cosine"] >= par["min_cosine"] == 0.98
    assert par["prompts"] >= 100 and par["mean_row_cosine"] >= par["worst_row_cosine"]
    q = g["quantization"]
    assert q["per_channel"] is True and q["weight_type"] == "QInt8"
    # saturation-free on x86 without VNNI (7-bit weights: 2 * 255 * 64 < 32767), and what was left in fp32
    assert q["reduce_range"] is True and q["saturation_free"] is True and q["weight_range"] == [-64, 64]
    assert q["max_u8s8_pair_sum"] == 2 * 255 * q["max_abs_int8_weight"] <= 32767
    assert isinstance(q["excluded_nodes"], list) and q["excluded_nodes"] == par["attempts"][-1]["excluded"]
    assert man["export_config"]["int8"] is True
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(bench_export / g["file"]))
    ops = {n.op_type for n in model.graph.node}
    assert "DynamicQuantizeLinear" in ops and ("MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops)
    init = {i.name: i for i in model.graph.initializer}
    weights = [numpy_helper.to_array(init[n.input[1]]) for n in model.graph.node
               if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") and n.input[1] in init]
    assert weights and all(w.dtype == np.int8 and np.abs(w.astype(np.int32)).max() <= 64 for w in weights)


def test_int8_backend_close_to_fp32(bench_export):
    from dpr.engine import Engine
    from dpr.export.quantize import row_cosines

    fp32 = Engine.load(bench_export, backend="onnxruntime")
    int8 = Engine.load(bench_export, backend="onnxruntime", backend_options={"prompt_encoder": "int8"})
    assert int8.backend.describe()["prompt_graph"] == "prompt_encoder_int8.onnx"
    tags = fp32.tag_names
    texts = [f"show me more {t} films" for t in tags] + [f"no {t} please" for t in tags] + ["something light"]
    a, b = fp32.encode_prompts(texts), int8.encode_prompts(texts)
    # the tiny random encoder quantises almost losslessly (its int8 cosine is ~0.9999); 0.98 is the gate
    assert row_cosines(a, b).min() > 0.98
    assert not np.array_equal(a, b)                                   # it really is another graph
    hist = [[fp32.item_ids[i] for i in range(5)]]
    ra = fp32.recommend(hist, prompts=[texts[0]], k=10)
    rb = int8.recommend(hist, prompts=[texts[0]], k=10)
    assert len(set(ra.item_ids[0]) & set(rb.item_ids[0])) >= 8


def test_int8_option_errors(export_without_int8):
    from dpr.engine import Engine
    from dpr.engine.errors import BackendError
    from dpr.engine.manifest import load_export
    from dpr.engine.backends.onnxruntime_backend import OnnxRuntimeBackend

    with pytest.raises(BackendError, match="no prompt_encoder_int8 graph.*--int8"):
        Engine.load(export_without_int8, backend="onnxruntime", backend_options={"prompt_encoder": "int8"})
    with pytest.raises(BackendError, match="'fp32' or 'int8'"):
        OnnxRuntimeBackend(load_export(export_without_int8), prompt_encoder="int4")


def test_int8_gate_fails_below_threshold(bench_export, tmp_path, tiny_encoder_dir):
    """An int8 graph under the cosine gate fails the export and leaves no int8 file behind."""
    from transformers import AutoTokenizer

    from dpr.data.dataset import Catalogue
    from dpr.export.exporter import ExportError
    from dpr.export.quantize import INT8_FILE, build_int8_prompt_encoder

    folder = tmp_path / "exp"
    shutil.copytree(bench_export, folder)
    (folder / INT8_FILE).unlink()
    man = json.loads((folder / "manifest.json").read_text())
    cat = Catalogue.from_dict(json.loads((folder / "items.json").read_text()))
    table = np.load(folder / "item_embeddings.npy")
    tok = AutoTokenizer.from_pretrained(str(tiny_encoder_dir))
    with pytest.raises(ExportError, match="worst-row cosine"):
        build_int8_prompt_encoder(folder, man["graphs"]["prompt_encoder"], tok, 64, cat, table, min_cosine=1.01)
    assert not (folder / INT8_FILE).exists()
    entry = build_int8_prompt_encoder(folder, man["graphs"]["prompt_encoder"], tok, 64, cat, table, min_cosine=0.5)
    assert entry["parity"]["worst_row_cosine"] >= 0.5 and (folder / INT8_FILE).is_file()


def test_export_cli_int8_flag():
    from dpr.export.cli import build_parser

    args = build_parser().parse_args(["ckpt.pt", "--int8", "--int8-min-cosine", "0.97"])
    assert args.int8 is True and args.int8_min_cosine == 0.97


def test_workload_shapes():
    """Histories are real catalogue ids without repeats; unique prompts never repeat across batches."""
    from dpr.bench.workload import Workload

    items = {"ids": [f"i{i}" for i in range(1, 301)], "titles": [f"Title {i}" for i in range(300)],
             "tags": [["comedy"] if i % 2 else ["drama", "horror"] for i in range(300)],
             "tag_names": ["comedy", "drama", "horror"]}
    w = Workload(items, max_len=20, seed=1)
    seen = set()
    for it in range(3):
        b = w.batch(40, "unique", it)
        assert len(b.histories) == 40 and all(len(h) == len(set(h)) >= 1 for h in b.histories)
        texts = [p for p in b.prompts + b.negative_prompts if p]
        assert len(texts) == 50 and not seen & set(texts)
        seen |= set(texts)
    none = w.batch(8, "none", 0)
    assert none.num_prompts == 0
    tmpl = [p for i in range(3) for p in w.batch(40, "templates", i).prompts if p]
    assert len(set(tmpl)) < len(tmpl)                                 # the bank repeats
    assert w.batch(40, "templates", 1).histories == Workload(items, 20, seed=1).batch(40, "templates", 1).histories


def test_encoder_falls_back_to_labelled_standin(monkeypatch, tmp_path, tiny_encoder_dir):
    """Without the [encoder] extra the default model uses a random-weight MiniLM-shaped stand-in and says so
    (the stand-in builder itself is replaced by the tiny encoder here: the real one writes 90 MB)."""
    import dpr.model.text_encoder as te_mod
    from dpr.bench import default_model
    from dpr.errors import DPRError

    def missing(explicit=None):
        raise DPRError("not installed")

    monkeypatch.setattr(te_mod, "resolve_text_encoder", missing)
    monkeypatch.setattr(default_model, "make_minilm_shaped_standin", lambda path: tiny_encoder_dir)
    path, info = default_model.resolve_encoder("", tmp_path)
    assert path == str(tiny_encoder_dir)
    assert info["pretrained"] is False and "random-weight stand-in" in info["note"]


def test_shared_prompt_cache_keeps_int8_and_fp32_apart(bench_export):
    """One PromptCache shared by an fp32 and an int8 engine: neither is served the other's vectors."""
    from dpr.engine import Engine, PromptCache

    cache = PromptCache(64)
    fp32 = Engine.load(bench_export, backend="onnxruntime", prompt_cache=cache)
    int8 = Engine.load(bench_export, backend="onnxruntime", prompt_cache=cache,
                       backend_options={"prompt_encoder": "int8"})
    assert fp32.prompt_cache_key != int8.prompt_cache_key
    texts = ["something funny tonight", "no horror please"]
    a = fp32.encode_prompts(texts)
    misses = cache.stats()["misses"]
    b = int8.encode_prompts(texts)
    assert cache.stats()["misses"] == misses + len(texts)          # int8 computed its own
    again = fp32.encode_prompts(texts)
    np.testing.assert_array_equal(again, a)                       # fp32 still gets its own back
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_default_model_int8_fallback_and_gpu(monkeypatch, tmp_path, tiny_encoder_dir, device):
    """A failing int8 export (ONNX Runtime 1.30's quantiser on a GPU machine) is retried without int8 and
    the reason kept; a GPU run never asks for the int8 graph."""
    import dpr.export
    from dpr.bench import default_model
    from dpr.bench.config import BenchConfig
    from dpr.export import ExportError

    calls = []

    def fake_export(ckpt, cfg):
        calls.append(cfg.int8)
        if cfg.int8:
            raise ExportError("quantiser: [ShapeInferenceError] (384) vs (64)")
        return cfg.out

    monkeypatch.setattr(dpr.export, "export", fake_export)
    cfg = BenchConfig(items=50, text_encoder=str(tiny_encoder_dir), cache_dir=str(tmp_path), device=device)
    model = default_model.default_model(cfg)
    if device == "cpu":
        assert calls == [True, False] and "ShapeInferenceError" in model.info["int8_skipped"]
    else:
        assert calls == [False] and "int8_skipped" not in model.info


def test_targets_table(default_run, capsys, tmp_path):
    """``python -m dpr.bench.targets``: a CPU run's rows come from its own numbers; a GPU run's from the torch
    backend, the batcher's worst pipelined p99 and the retrieval at 10^6 items; a missing number says so."""
    from dpr.bench.targets import main, targets

    res = default_run[0]
    rows = {r[0]: r for r in targets(res)}
    ratio = res["speedup_vs_torch"]["onnxruntime/templates"]
    assert rows["onnxruntime/templates (x pipeline)"][1] == f"{ratio:.2f}x"
    assert rows["onnxruntime/templates (x pipeline)"][3] == ("met" if ratio >= 25 else "MISSED")
    gpu = {"device": "cuda", "speedup_vs_torch": {"torch/templates": 12.0, "torch/none": 3.0},
           "batcher": {"rate_rps": 2000, "runs": [{"pipeline": True, "p99_ms": 4.0}, {"pipeline": False, "p99_ms": 50.0},
                                                  {"pipeline": True, "p99_ms": 12.0}]},
           "retrieval": [{"items": 1_000_000, "retriever": "torch", "pct_of_ceiling": 80.0}]}
    g = {r[0]: r[1:] for r in targets(gpu)}
    assert g["torch/templates (x pipeline)"][2] == "met" and g["torch/none (x pipeline)"][2] == "MISSED"
    assert g["torch/unique (x pipeline)"][0] == "not measured"
    assert g["batcher p99 at 2000/s (pipelined, worst run)"][:3] == ("12.00 ms", "<= 10 ms", "MISSED")
    assert g["torch retrieval at 10^6 items (x bare GEMM)"][0] == "1.25x"
    path = tmp_path / "b.json"
    path.write_text(json.dumps(gpu))
    assert main([str(path)]) == 0 and "MISSED" in capsys.readouterr().out
    assert main([str(tmp_path / "missing.json")]) == 2
