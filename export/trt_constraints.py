"""Static check of an ONNX graph against TensorRT's ONNX parser constraints beyond operator names.

``trt_ops.check_tensorrt_ops`` checks that every operator is one the parser knows. A graph can pass that
and still fail to parse; this module checks, without TensorRT, the restrictions onnx-tensorrt's
``docs/operators.md`` states for the operators dpr's graphs use, plus the graph-level ones:

* opset: the default-domain opset is one the TensorRT 10 parser imports (9..24, the range of
  ``tensorrt_supported_ops.txt``'s source);
* TopK: ``K`` is a constant (initializer / Constant, possibly reshaped or cast) or is computed from a
  ``Shape`` (a shape tensor), never from data; a constant K is at most 3840 (ITopKLayer's limit);
* Slice / Squeeze / Unsqueeze: ``axes`` is a constant (the parser needs it at import time);
* Range: float ``start``/``limit``/``delta`` only as constants;
* custom-domain nodes: the ``dpr::FusedMoEGate`` plugin node carries ``plugin_namespace`` (the attribute
  TensorRT 10.9's parser reads; the node's domain is read as the namespace only from 10.10 on) and has a
  model-local function to fall back to; any other custom node needs a model-local function;
* dynamic shapes: every dynamic input axis has a min/opt/max range in the optimisation profile, and every
  static axis equals the profile's value (``check_profile``).

Model-local function bodies are checked like the main graph (a parser that imports the function runs the
body). Each finding is a string naming the node and the rule; ``[]`` means the graph passes.
"""

from __future__ import annotations

import os

TRT_OPSETS = (9, 24)                      # default-domain opsets the TensorRT 10 ONNX parser imports
TOPK_MAX_K = 3840                         # ITopKLayer: K <= 3840
PLUGIN_OPS = frozenset({("dpr", "FusedMoEGate")})
_DEFAULT = ("", "ai.onnx")

# ops through which a constant stays a constant and a shape tensor stays a shape tensor
_SHAPE_OPS = frozenset({"Reshape", "Cast", "CastLike", "Squeeze", "Unsqueeze", "Concat", "Gather", "Slice",
                        "Identity", "Add", "Sub", "Mul", "Div", "Min", "Max", "Neg", "Abs", "Range", "Expand",
                        "ConstantOfShape", "Equal", "Where", "ReduceProd", "ReduceSum", "ReduceMin", "ReduceMax"})
_CONST, _SHAPE, _DATA = 0, 1, 2           # how a tensor's value is known at parse time (worst wins)


def _origins(nodes, initializers, constants: dict) -> dict[str, int]:
    """Tensor name -> _CONST / _SHAPE / _DATA for every node output (nodes in topological order)."""
    origin = {name: _CONST for name in initializers}
    for n in nodes:
        if n.op_type == "Constant":
            kind = _CONST
        elif n.op_type in ("Shape", "Size"):
            kind = _SHAPE
        elif n.op_type in _SHAPE_OPS:
            kind = max((origin.get(i, _DATA) for i in n.input if i), default=_CONST)
        else:
            kind = _DATA
        for o in n.output:
            origin[o] = kind
    return origin


def _constant_values(nodes, initializers) -> dict:
    """Values of constants (initializers and Constant nodes with a literal value) by tensor name."""
    from onnx import numpy_helper

    values = {name: numpy_helper.to_array(t) for name, t in initializers.items()}
    for n in nodes:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.ref_attr_name:
                    continue                      # a function attribute: known only at the call
                if a.name == "value":
                    values[n.output[0]] = numpy_helper.to_array(a.t)
                elif a.name == "value_int":
                    values[n.output[0]] = a.i
                elif a.name == "value_ints":
                    values[n.output[0]] = list(a.ints)
    return values


def _check_nodes(where: str, nodes, initializers: dict, functions: dict, out: list[str],
                 float_tensors: set[str]) -> None:
    origin = _origins(nodes, initializers, {})
    values = _constant_values(nodes, initializers)
    for n in nodes:
        name = f"{where}: {n.op_type} node {n.name or n.output[0]!r}"
        dom = "" if n.domain in _DEFAULT else n.domain
        if dom:
            if (dom, n.op_type) in PLUGIN_OPS:
                attrs = {a.name for a in n.attribute}
                if "plugin_namespace" not in attrs:
                    out.append(f"{name}: no plugin_namespace attribute (TensorRT 10.9's parser finds the plugin "
                               "only through it)")
            if (dom, n.op_type) not in functions and (dom, n.op_type) not in PLUGIN_OPS:
                out.append(f"{name}: custom op {dom}::{n.op_type} with neither a plugin nor a local function")
            continue
        if n.op_type == "TopK":
            k = n.input[1] if len(n.input) > 1 else ""
            kind = origin.get(k, _DATA)
            if kind == _DATA:
                out.append(f"{name}: K ({k}) is computed from data; TensorRT needs a constant or a shape tensor")
            elif k in values:
                import numpy as np

                kv = int(np.asarray(values[k]).reshape(-1)[0])
                if not 1 <= kv <= TOPK_MAX_K:
                    out.append(f"{name}: K = {kv} is outside 1..{TOPK_MAX_K} (ITopKLayer's limit)")
        elif n.op_type in ("Slice", "Squeeze", "Unsqueeze"):
            axes_at = {"Slice": 3, "Squeeze": 1, "Unsqueeze": 1}[n.op_type]
            if len(n.input) > axes_at and n.input[axes_at] and origin.get(n.input[axes_at], _DATA) != _CONST:
                out.append(f"{name}: axes ({n.input[axes_at]}) is not a constant")
        elif n.op_type == "Range":
            if any(i in float_tensors and origin.get(i, _DATA) != _CONST for i in n.input):
                out.append(f"{name}: float start/limit/delta must be constants")


def _float_tensors(model) -> set[str]:
    """Names of float/double tensors that shape inference typed (for Range's rule)."""
    return {v.name for v in list(model.graph.value_info) + list(model.graph.input)
            if v.type.tensor_type.elem_type in (1, 10, 11, 16)}


def check_tensorrt_constraints(model) -> list[str]:
    """Findings (strings) for ``model`` (ModelProto, shape-inferred if possible, or a path); [] = passes."""
    import onnx

    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(str(model), load_external_data=False)
    out: list[str] = []
    opset = next((int(o.version) for o in model.opset_import if o.domain in _DEFAULT), None)
    if opset is None or not TRT_OPSETS[0] <= opset <= TRT_OPSETS[1]:
        out.append(f"default-domain opset {opset} is outside {TRT_OPSETS[0]}..{TRT_OPSETS[1]}, the TensorRT 10 "
                   "parser's range")
    functions = {(f.domain, f.name): f for f in model.functions}
    floats = _float_tensors(model)
    inits = {t.name: t for t in model.graph.initializer}
    _check_nodes("graph", model.graph.node, inits, functions, out, floats)
    for (dom, name), f in functions.items():
        _check_nodes(f"function {dom}::{name}", f.node, {}, functions, out, set())
    return out


def check_profile(inputs: list[dict], profile: dict) -> list[str]:
    """Findings for an optimisation ``profile`` ({input: {min, opt, max}}) against the graph's ``inputs``
    (the manifest's IO spec: name, shape with ints for static axes and strings/None for dynamic ones)."""
    out = []
    for spec in inputs:
        name, shape = spec["name"], spec["shape"]
        p = profile.get(name)
        if p is None:
            if any(not isinstance(s, int) for s in shape):
                out.append(f"input {name}: dynamic axes but no optimisation profile")
            continue
        lo, opt, hi = p.get("min"), p.get("opt"), p.get("max")
        if not all(isinstance(v, list) and len(v) == len(shape) for v in (lo, opt, hi)):
            out.append(f"input {name}: profile min/opt/max must each have {len(shape)} dims")
            continue
        for ax, s in enumerate(shape):
            if not 1 <= lo[ax] <= opt[ax] <= hi[ax]:
                out.append(f"input {name} axis {ax}: profile needs 1 <= min <= opt <= max, got "
                           f"{lo[ax]}, {opt[ax]}, {hi[ax]}")
            elif isinstance(s, int) and not lo[ax] == opt[ax] == hi[ax] == s:
                out.append(f"input {name} axis {ax} is static ({s}) but the profile gives {lo[ax]}..{hi[ax]}")
    for name in profile:
        if name not in {s["name"] for s in inputs}:
            out.append(f"profile names {name}, which is not a graph input")
    return out
