"""dpr.export.trt_constraints: TensorRT ONNX-parser restrictions beyond operator names, on hand-built graphs
that break exactly one rule each (the real exports are checked to pass in test_export)."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from dpr.export.trt_constraints import TOPK_MAX_K, check_profile, check_tensorrt_constraints  # noqa: E402


def _model(nodes, inputs, outputs, inits=(), opset=20, functions=(), extra_opsets=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    m.functions.extend(functions)
    return m


X = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 8])
V = helper.make_tensor_value_info("v", TensorProto.FLOAT, None)
I = helper.make_tensor_value_info("i", TensorProto.INT64, None)


def _topk(k_nodes, k_name, inits=()):
    return _model(k_nodes + [helper.make_node("TopK", ["x", k_name], ["v", "i"], axis=1)], [X], [V, I], inits)


def test_topk_k_constant_initializer_or_shape_passes():
    k = numpy_helper.from_array(np.array([3], dtype=np.int64), "k")
    assert check_tensorrt_constraints(_topk([], "k", [k])) == []
    const = helper.make_node("Constant", [], ["kc"], value=numpy_helper.from_array(np.array([2], np.int64)))
    assert check_tensorrt_constraints(_topk([const], "kc")) == []
    shape = helper.make_node("Shape", ["x"], ["ks"], start=1)          # whole-axis sort: K from Shape
    assert check_tensorrt_constraints(_topk([shape], "ks")) == []


def test_topk_k_from_data_is_flagged():
    nodes = [helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
             helper.make_node("Cast", ["m"], ["k"], to=TensorProto.INT64)]
    found = check_tensorrt_constraints(_topk(nodes, "k"))
    assert len(found) == 1 and "TopK" in found[0] and "computed from data" in found[0]


def test_topk_k_too_large_is_flagged():
    k = numpy_helper.from_array(np.array([TOPK_MAX_K + 1], dtype=np.int64), "k")
    found = check_tensorrt_constraints(_topk([], "k", [k]))
    assert len(found) == 1 and str(TOPK_MAX_K) in found[0]


def test_unsqueeze_axes_must_be_constant():
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    ok = _model([helper.make_node("Constant", [], ["ax"], value=numpy_helper.from_array(np.array([0], np.int64))),
                 helper.make_node("Unsqueeze", ["x", "ax"], ["y"])], [X], [y])
    assert check_tensorrt_constraints(ok) == []
    axes_in = helper.make_tensor_value_info("ax", TensorProto.INT64, [1])
    bad = _model([helper.make_node("Unsqueeze", ["x", "ax"], ["y"])], [X, axes_in], [y])
    found = check_tensorrt_constraints(bad)
    assert len(found) == 1 and "axes" in found[0]


def test_opset_outside_the_parser_range_is_flagged():
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [X], [y], opset=7)
    assert any("opset 7" in f for f in check_tensorrt_constraints(m))


def test_plugin_node_needs_plugin_namespace_and_custom_ops_need_a_function():
    from dpr.kernels.onnx_function import fused_moe_gate_function
    from dpr.kernels.trt_plugin import make_trt_onnx
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as td:
        m = onnx.load(str(make_trt_onnx(Path(td) / "g.onnx")))
    assert check_tensorrt_constraints(m) == []               # the exporter's node and function pass
    node = m.graph.node[0]
    keep = [a for a in node.attribute if a.name != "plugin_namespace"]
    del node.attribute[:]
    node.attribute.extend(keep)
    found = check_tensorrt_constraints(m)
    assert len(found) == 1 and "plugin_namespace" in found[0]
    # a custom op with neither a plugin nor a local function
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    other = _model([helper.make_node("Weird", ["x"], ["y"], domain="foo")], [X], [y],
                   extra_opsets=[helper.make_opsetid("foo", 1)])
    assert any("foo::Weird" in f for f in check_tensorrt_constraints(other))
    assert fused_moe_gate_function(20).name == "FusedMoEGate"


def test_function_bodies_are_checked():
    # a local function whose TopK takes K from data: flagged inside the function
    body = [helper.make_node("ReduceMax", ["a"], ["m"], keepdims=0),
            helper.make_node("Cast", ["m"], ["k"], to=TensorProto.INT64),
            helper.make_node("TopK", ["a", "k"], ["v", "i"], axis=1)]
    fn = helper.make_function("foo", "Bad", ["a"], ["v"], body, opset_imports=[helper.make_opsetid("", 20)])
    m = _model([helper.make_node("Bad", ["x"], ["v"], domain="foo")], [X], [V], functions=[fn],
               extra_opsets=[helper.make_opsetid("foo", 1)])
    found = check_tensorrt_constraints(m)
    assert len(found) == 1 and "function foo::Bad" in found[0] and "TopK" in found[0]


def test_profile_covers_dynamic_axes_and_matches_static_ones():
    inputs = [{"name": "item_seq", "shape": ["batch", "history"]}, {"name": "presence", "shape": ["batch", 2]}]
    good = {"item_seq": {"min": [1, 1], "opt": [64, 50], "max": [512, 50]},
            "presence": {"min": [1, 2], "opt": [64, 2], "max": [512, 2]}}
    assert check_profile(inputs, good) == []
    assert any("no optimisation profile" in f for f in check_profile(inputs, {"presence": good["presence"]}))
    bad_static = dict(good, presence={"min": [1, 1], "opt": [64, 2], "max": [512, 3]})
    assert any("static (2)" in f for f in check_profile(inputs, bad_static))
    bad_order = dict(good, item_seq={"min": [1, 1], "opt": [600, 50], "max": [512, 50]})
    assert any("min <= opt <= max" in f for f in check_profile(inputs, bad_order))
    assert any("not a graph input" in f for f in check_profile(inputs, dict(good, extra=good["presence"])))
