"""``dpr::FusedMoEGate`` as an ONNX model-local function whose body is the portable gating in standard ops.

One exported graph then serves every runtime: a runtime with the fused kernel registered (ONNX Runtime with
``libdpr_ort_ops.so``, TensorRT with the ``dpr::FusedMoEGate`` plugin) runs the kernel; one without it
expands the call into this body (ONNX Runtime inlines model-local functions; TensorRT's ONNX parser imports
them, and imports the node as the plugin instead when the node carries ``plugin_namespace`` and the plugin
is registered).

The body is ``dpr.model.moe.moe_gate_reference`` step for step: logits, the polarity-group mask, a stable
TopK (ties -> lower index, as ONNX TopK specifies), softmax over the k logits, the k expert rows gathered and
mixed, and rows with polarity not 1 or 2 returned as ``residual``. ``experts_per_polarity`` and ``top_k``
are the call's attributes (attribute references), so one function serves any gate configuration; TopK's k
is a Constant made from ``top_k``, which TensorRT's parser needs as a constant.
"""

from __future__ import annotations

from dpr.kernels.op_spec import ATTRS, INPUTS, OP_DOMAIN, OP_NAME, OUTPUTS, TRT_NODE_ATTRS


def _const_from_attr(out: str, attr: str):
    """``Constant(value_int=@attr)``: a scalar int64 tensor holding the call's attribute."""
    from onnx import AttributeProto, helper

    node = helper.make_node("Constant", [], [out])
    node.attribute.append(helper.make_attribute_ref("value_int", AttributeProto.INT))
    node.attribute[-1].ref_attr_name = attr
    return node


def _const(out: str, value, dtype: str = "int64"):
    import numpy as np
    from onnx import helper, numpy_helper

    return helper.make_node("Constant", [], [out], value=numpy_helper.from_array(np.array(value, dtype=dtype), out))


def fused_moe_gate_function(opset: int):
    """The ``FunctionProto`` (domain ``dpr``, name ``FusedMoEGate``) for a model of default-domain ``opset``."""
    from onnx import helper

    z, w, b, y, pol, res = INPUTS
    n_attr, k_attr = ATTRS
    mk = helper.make_node
    nodes = [
        # logits = z @ w_router + b_router                                   (B, E)
        mk("MatMul", [z, w], ["zw"]), mk("Add", ["zw", b], ["logits"]),
        # active rows: polarity 1 or 2; group 1 for negative rows, else 0    (B,)
        _const("one", 1), _const("two", 2),
        mk("Equal", [pol, "one"], ["is_pos"]), mk("Equal", [pol, "two"], ["is_neg"]),
        mk("Or", ["is_pos", "is_neg"], ["active"]),
        mk("Cast", ["is_neg"], ["group"], to=7),
        # expert e belongs to group e // n; a row may use its group's experts only   (B, E)
        _const_from_attr("n", n_attr),
        mk("Shape", [y], ["num_experts"], start=1, end=2),
        _const("zero", 0), _const("step", 1),
        mk("Squeeze", ["num_experts"], ["num_experts_s"]),
        mk("Range", ["zero", "num_experts_s", "step"], ["expert_ids"]),
        mk("Div", ["expert_ids", "n"], ["expert_group"]),
        _const("axis0", [0]), _const("axis1", [1]), _const("axis_last", [-1]),
        mk("Unsqueeze", ["expert_group", "axis0"], ["expert_group_row"]),
        mk("Unsqueeze", ["group", "axis1"], ["group_col"]),
        mk("Equal", ["expert_group_row", "group_col"], ["allowed"]),
        _const("neg_inf", float("-inf"), "float32"),
        mk("CastLike", ["neg_inf", "logits"], ["neg_inf_t"]),
        mk("Where", ["allowed", "logits", "neg_inf_t"], ["masked"]),
        # stable top-k of the allowed logits (ONNX TopK keeps the lower index first on ties)
        _const_from_attr("k", k_attr),
        mk("Reshape", ["k", "axis1"], ["k_1d"]),          # "axis1" is the constant [1]: the shape (1,)
        mk("TopK", ["masked", "k_1d"], ["top_vals", "top_idx"], axis=1, largest=1, sorted=1),
        mk("Softmax", ["top_vals"], ["weights"], axis=1),                           # (B, k)
        # selected[b, j, :] = expert_out[b, top_idx[b, j], :]                         (B, k, d)
        mk("Unsqueeze", ["top_idx", "axis_last"], ["idx3"]),
        mk("Shape", ["top_idx"], ["bk"]), mk("Shape", [y], ["d_dim"], start=2, end=3),
        mk("Concat", ["bk", "d_dim"], ["bkd"], axis=0),
        mk("Expand", ["idx3", "bkd"], ["idx_bkd"]),
        mk("GatherElements", [y, "idx_bkd"], ["selected"], axis=1),
        mk("Unsqueeze", ["weights", "axis_last"], ["weights3"]),
        mk("Mul", ["weights3", "selected"], ["weighted"]),
        mk("ReduceSum", ["weighted", "axis1"], ["delta"], keepdims=0),             # (B, d)
        # inactive rows: residual unchanged, bit for bit
        mk("Unsqueeze", ["active", "axis1"], ["active_col"]),
        mk("Add", [res, "delta"], ["moved"]),
        mk("Where", ["active_col", "moved", res], [OUTPUTS[0]]),
    ]
    return helper.make_function(
        OP_DOMAIN, OP_NAME, list(INPUTS), list(OUTPUTS), nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        # the plugin's attributes are declared too: the call node carries them (TensorRT reads them)
        attributes=list(ATTRS) + list(TRT_NODE_ATTRS))


def attach_function(model) -> bool:
    """Add the ``dpr::FusedMoEGate`` function to ``model`` (a ModelProto using the op) unless present.
    Returns True when the model calls the op. The model's ``dpr`` opset import is kept: a call to a
    model-local function resolves through (domain, name)."""
    uses = any(n.domain == OP_DOMAIN and n.op_type == OP_NAME for n in model.graph.node)
    if not uses:
        return False
    if not any(f.domain == OP_DOMAIN and f.name == OP_NAME for f in model.functions):
        opset = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
        model.functions.append(fused_moe_gate_function(opset))
    return True
