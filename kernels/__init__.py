"""Native kernels: the fused MoE gate (dpr::FusedMoEGate) for every runtime.

* ``fused_moe_gate.h`` per-row math (g++ and nvcc), ``fused_moe_gate_cpu.cc`` CPU twin (C ABI),
  ``fused_moe_gate.cu`` CUDA kernel + launchers, ``ort_custom_op.cc`` ONNX Runtime custom op;
* ``build`` compiles them (``python -m dpr.kernels.build``), ``build.ort_library_path()`` finds the ORT lib;
* ``moe_gate_op`` (``torch.ops.dpr.moe_gate``: the torch backend's gate; ``moe_gate_torch.cc`` /
  ``moe_gate_torch_cuda.cc`` register the CPU twin and the CUDA kernel with torch's dispatcher, no ctypes; a
  fake implementation for tracing; the reference when the library is missing);
* ``torch_op`` (torch.ops.dpr.fused_moe_gate: the op the ONNX exporter traces), ``onnx_translation``
  (torch.onnx), ``trt_plugin`` (TensorRT AOT plugin), ``capi`` (ctypes, for callers without torch),
  ``bench_op`` (CPU timings).

Importing this package is cheap (no torch, no compilation).
"""

if __name__ != "dpr.kernels":  # imported as the bare name 'kernels': never this folder (dpr/_bare_name.py)
    from dpr._bare_name import defer_to_installed

    defer_to_installed(__name__, __file__)
else:
    from dpr.kernels.op_spec import ATTRS, INPUTS, OP_DOMAIN, OP_DOMAIN_VERSION, OP_NAME, TORCH_OP, TRT_PLUGIN_ID

    __all__ = ["ATTRS", "INPUTS", "OP_DOMAIN", "OP_DOMAIN_VERSION", "OP_NAME", "TORCH_OP", "TRT_PLUGIN_ID"]
