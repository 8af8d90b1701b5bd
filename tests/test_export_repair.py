"""The exporter's post-export check: a graph whose recorded intermediate shapes (value_info) contradict ONNX
shape inference is repaired by dropping them (what torch 2.11's dynamo exporter produced on a GPU machine);
a graph broken in its nodes still fails, so the caller falls back to the legacy exporter."""

from __future__ import annotations

import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from dpr.export import ExportError  # noqa: E402
from dpr.export.exporter import _check_graph, _check_or_repair  # noqa: E402


def _model(value_info_dim: int, node_ok: bool = True):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 384])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 64])
    w = helper.make_tensor("w", TensorProto.FLOAT, [384, 64], [0.0] * (384 * 64))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Relu" if node_ok else "NoSuchOp", ["h"], ["y"])]
    vi = [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["b", value_info_dim])]
    g = helper.make_graph(nodes, "g", [x], [y], initializer=[w], value_info=vi)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_contradicting_value_info_is_dropped(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_model(384), str(path))                       # records (b, 384) where MatMul gives (b, 64)
    with pytest.raises(ExportError, match="shape inference"):
        _check_graph(path)
    _check_or_repair(path)
    assert not onnx.load(str(path)).graph.value_info         # repaired in place
    _check_graph(path)


def test_consistent_graph_is_left_alone(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_model(64), str(path))
    _check_or_repair(path)
    assert len(onnx.load(str(path)).graph.value_info) == 1


def test_broken_nodes_still_fail(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_model(384, node_ok=False), str(path))
    with pytest.raises(ExportError):
        _check_or_repair(path)
