"""The fused MoE gate's name, domain, inputs and attributes: one place every binding reads them from."""

from __future__ import annotations

OP_DOMAIN = "dpr"                      # ONNX custom domain (opset version OP_DOMAIN_VERSION)
OP_DOMAIN_VERSION = 1
OP_NAME = "FusedMoEGate"               # ONNX op type, ORT custom op, TensorRT plugin "dpr::FusedMoEGate"
TRT_PLUGIN_ID = f"{OP_DOMAIN}::{OP_NAME}"
TORCH_OP = "dpr::fused_moe_gate"       # torch.library custom op (torch.ops.dpr.fused_moe_gate)
INPUTS = ("z", "w_router", "b_router", "expert_out", "polarity", "residual")   # in this order
OUTPUTS = ("out",)
ATTRS = ("experts_per_polarity", "top_k")                                      # both int
MAX_EXPERTS_PER_POLARITY = 32          # fused_moe_gate.h DPR_MAX_EXPERTS_PER_POLARITY
