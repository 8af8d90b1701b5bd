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

# TensorRT: tensorrt.plugin's ahead-of-time implementation (@trtp.aot_impl) first shipped in TensorRT 10.9
# (release notes 10.9.0, "Ahead-of-Time Compilable Python Plugins"); the plugin needs nothing newer.
MIN_TENSORRT = (10, 9)
# A plugin registered through tensorrt.plugin has version "1". The ONNX parser looks a plugin up by
# (op_type, plugin_version, plugin_namespace) read from the node's attributes; only from 10.10 on does it
# fall back to the node's domain as the namespace, and a node with a model-local function of the same name
# is imported as the plugin only when it carries plugin_namespace. So the exported node carries both, and
# aot=1, which the parser turns into a strict ahead-of-time request (the plugin has no JIT implementation).
TRT_PLUGIN_VERSION = "1"
TRT_NODE_ATTRS = {"plugin_namespace": OP_DOMAIN, "plugin_version": TRT_PLUGIN_VERSION, "aot": 1}
