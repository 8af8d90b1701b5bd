"""Native kernels, each with its C ABI, its Python binding and its pure reference.

Three kernels:

* the fused MoE gate ``dpr::FusedMoEGate`` (the user encoder's gating step), for every runtime:
  ``fused_moe_gate.h`` per-row math (g++ and nvcc), ``fused_moe_gate_cpu.cc`` CPU twin (C ABI,
  ``fused_moe_gate_api.h``), ``fused_moe_gate.cu`` CUDA kernel + launchers, ``ort_custom_op.cc`` ONNX Runtime
  custom op; ``op_spec`` (its name, domain, inputs, attributes, the TensorRT node attributes: one place),
  ``torch_op`` (``torch.ops.dpr.fused_moe_gate``, the op the ONNX exporter traces), ``onnx_translation``
  (torch.onnx), ``onnx_function`` (the op as an ONNX model-local function whose body is the portable gating,
  so one exported graph serves runtimes with and without the kernel), ``moe_gate_op``
  (``torch.ops.dpr.moe_gate``, the torch backend's gate; ``moe_gate_torch.cc`` / ``moe_gate_torch_cuda.cc``),
  ``trt_plugin`` (TensorRT ahead-of-time plugin) and ``trt_version`` (the oldest TensorRT it works with),
  ``capi`` (ctypes, for callers without torch);
* the fused score + top-k retrieval kernel (the ``fused`` retriever; CPU, AVX-512 / AVX2+FMA / portable tiles
  chosen at run time, ``cpu_isa.h``): ``score_topk.h``, ``score_topk_cpu.cc`` (``score_topk_api.h``),
  binding ``score_topk``;
* the item-id index (the engine's history ids -> indices in one call): ``id_index_cpu.cc``
  (``id_index_api.h``), binding ``id_index``.

``build`` compiles what this machine can build into a hash-keyed cache (``python -m dpr.kernels.build``;
``build.ort_library_path()`` finds the ONNX Runtime custom-op library). The gate's CPU timings are in
``dpr.bench.gate_timing``.

Importing this package is cheap (no torch, no compilation).
"""

if __name__ != "dpr.kernels":  # imported as the bare name 'kernels': never this folder (dpr/_bare_name.py)
    from dpr._bare_name import defer_to_installed

    defer_to_installed(__name__, __file__)
else:
    from dpr.kernels.op_spec import ATTRS, INPUTS, OP_DOMAIN, OP_DOMAIN_VERSION, OP_NAME, TORCH_OP, TRT_PLUGIN_ID

    __all__ = ["ATTRS", "INPUTS", "OP_DOMAIN", "OP_DOMAIN_VERSION", "OP_NAME", "TORCH_OP", "TRT_PLUGIN_ID"]
