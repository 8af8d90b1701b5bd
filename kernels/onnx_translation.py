"""ONNX translation of ``torch.ops.dpr.fused_moe_gate`` for the torch.onnx dynamo exporter.

    torch.onnx.export(model, args, dynamo=True, custom_translation_table=custom_translation_table())

emits ONE node ``dpr::FusedMoEGate(z, w_router, b_router, expert_out, polarity, residual)`` with the int
attributes ``experts_per_polarity`` and ``top_k`` (custom opset ``dpr`` version 1) and the string attributes
``plugin_namespace="dpr"``, ``plugin_version="1"`` and the int ``aot=1`` that TensorRT's ONNX parser
reads to find the plugin and pick its ahead-of-time implementation (``op_spec.TRT_NODE_ATTRS``). The
exporter then adds the op's portable body as a model-local function (``dpr.kernels.onnx_function``):
ONNX Runtime runs the kernel when ``SessionOptions.register_custom_ops_library(
dpr.kernels.build.ort_library_path())`` registered it, and inlines the body otherwise.
"""

from __future__ import annotations

import onnx
import onnxscript

from dpr.kernels.op_spec import OP_DOMAIN, OP_DOMAIN_VERSION, OP_NAME, TRT_NODE_ATTRS

dpr_opset = onnxscript.values.Opset(domain=OP_DOMAIN, version=OP_DOMAIN_VERSION)


def _schema() -> onnx.defs.OpSchema:
    """An ONNX schema for dpr::FusedMoEGate, so onnxscript knows its inputs, output and attributes."""
    S = onnx.defs.OpSchema
    P = S.FormalParameter
    return S(
        OP_NAME, OP_DOMAIN, OP_DOMAIN_VERSION,
        doc="Fused MoE gate (dpr.model.moe.moe_gate_reference): residual + top-k softmax-gated expert outputs.",
        inputs=[P("z", "T"), P("w_router", "T"), P("b_router", "T"), P("expert_out", "T"),
                P("polarity", "tensor(int64)"), P("residual", "T")],
        outputs=[P("out", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float32 or float16")],
        attributes=[S.Attribute("experts_per_polarity", S.AttrType.INT, "experts per polarity group (n)"),
                    S.Attribute("top_k", S.AttrType.INT, "experts mixed per row (1..n)")]
                   + [S.Attribute(name, S.AttrType.INT if isinstance(v, int) else S.AttrType.STRING,
                                  "read by TensorRT's ONNX parser (plugin lookup, AOT)", required=False)
                      for name, v in TRT_NODE_ATTRS.items()],
    )


OP_SCHEMA = _schema()
_fused_moe_gate_op = onnxscript.values.Op(dpr_opset, OP_NAME, OP_SCHEMA)


def fused_moe_gate_onnx(z, w_router, b_router, expert_out, polarity, residual, experts_per_polarity: int,
                        top_k: int):
    """Traced by the exporter: emits one dpr::FusedMoEGate node."""
    return _fused_moe_gate_op(z, w_router, b_router, expert_out, polarity, residual,
                              experts_per_polarity=experts_per_polarity, top_k=top_k, **TRT_NODE_ATTRS)


def custom_translation_table() -> dict:
    """``{torch.ops.dpr.fused_moe_gate.default: fused_moe_gate_onnx}`` (registers the torch op)."""
    import torch

    import dpr.kernels.torch_op  # noqa: F401  (defines torch.ops.dpr.fused_moe_gate)

    return {torch.ops.dpr.fused_moe_gate.default: fused_moe_gate_onnx}


def _sort_stable(self, stable=None, dim: int = -1, descending: bool = False):
    """aten.sort.stable as ONNX TopK over the whole axis (TopK keeps lower indices first on ties)."""
    from onnxscript import opset20 as op

    if dim < 0 and dim + 1 == 0:
        k = op.Shape(self, start=dim)
    else:
        k = op.Shape(self, start=dim, end=dim + 1)
    values, indices = op.TopK(self, k, axis=dim, largest=1 if descending else 0, sorted=1)
    return values, indices


def portable_translation_table() -> dict:
    """Translations the *portable* (standard ONNX ops) export of ``moe_gate_reference`` needs.

    torch 2.13's dynamo exporter has no translation for ``aten.sort.stable`` (used by the reference for
    its tie rule); ONNX ``TopK`` with k = the axis length is a stable sort by specification.
    """
    import torch

    return {torch.ops.aten.sort.stable: _sort_stable}
