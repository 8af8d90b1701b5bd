"""dpr-export's int8 prompt encoder: saturation-free settings (no u8 x s8 pair can clip VPMADDUBSW's int16), the
0.98 gate, and the most sensitive MatMuls left in fp32 when a first attempt misses it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from dpr.export import ExportConfig, ExportError  # noqa: E402


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


def test_int8_leaves_the_most_sensitive_matmuls_in_fp32(export_dir, tmp_path, tiny_encoder_dir):
    """A first attempt under the gate measures every MatMul's sensitivity and leaves the most sensitive
    ones in fp32, one more per attempt, up to a quarter of them; the entry records which."""
    import math

    from transformers import AutoTokenizer

    from dpr.data.dataset import Catalogue
    from dpr.export.quantize import INT8_FILE, build_int8_prompt_encoder, quantizable_matmuls

    folder = tmp_path / "exp"
    folder.mkdir()
    for name in ("prompt_encoder.onnx", "items.json", "item_embeddings.npy"):
        shutil.copy(export_dir / name, folder / name)
    man = json.loads((export_dir / "manifest.json").read_text())
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
