"""TensorRT plugin ``dpr::FusedMoEGate`` (TensorRT >= 10.9 Python plugins, ahead-of-time implementation).

``tensorrt.plugin``'s ``@trtp.aot_impl`` first shipped in TensorRT 10.9 (``op_spec.MIN_TENSORRT``);
``register()`` refuses an older TensorRT with an error naming the version. It defines, with
``tensorrt.plugin`` (imported lazily):

* ``@trtp.register``: the shape/type descriptor (output like ``residual``: (B, d), same dtype);
* ``@trtp.autotune``: the two supported type combinations (all FP32 or all FP16; polarity INT64);
* ``@trtp.aot_impl``: the kernel name, the PTX compiled by nvcc from ``fused_moe_gate.cu``, launch
  parameters (one warp per row, 4 rows per 128-thread block) and the int32 scalars
  (B, d, E, experts_per_polarity, top_k) that TensorRT passes between the input and output pointers:
  ``kernel(z, w_router, b_router, expert_out, polarity, residual, B, d, E, n, k, out)``.

TensorRT's ONNX parser maps an exported ``dpr::FusedMoEGate`` node onto it through the node's attributes
``plugin_namespace="dpr"``, ``plugin_version="1"`` and ``aot=1`` (``op_spec.TRT_NODE_ATTRS``; the exporter
writes them, and :func:`make_trt_onnx` writes the same node).
"""

from __future__ import annotations

from pathlib import Path

from dpr.kernels.op_spec import ATTRS, INPUTS, OP_DOMAIN, OP_DOMAIN_VERSION, OP_NAME, TRT_NODE_ATTRS, TRT_PLUGIN_ID

ROWS_PER_BLOCK = 4             # fused_moe_gate.cu DPR_WARPS_PER_BLOCK
THREADS_PER_BLOCK = 32 * ROWS_PER_BLOCK
KERNEL_NAMES = {"float32": "dpr_fused_moe_gate_f32", "float16": "dpr_fused_moe_gate_f16"}

_registered = False


def ptx_bytes(arch: int = 80) -> bytes:
    """PTX of fused_moe_gate.cu for compute_<arch> (from the build cache, built on demand)."""
    from dpr.kernels import build

    name = f"ptx_sm{arch}"
    path = build.artifact_path(name)
    if path is None:
        res = build.build(verbose=False, only=[name])
        path = res.path(name)
        if path is None:
            why = res.failed.get(name) or res.skipped.get(name) or "unknown"
            raise RuntimeError(f"cannot produce PTX for the TensorRT plugin: {why}")
    return Path(path).read_bytes()


def ptx_sha256(arch: int = 80) -> str:
    """sha256 of the PTX the plugin embeds: part of the engine cache key, so a kernel change rebuilds."""
    import hashlib

    return hashlib.sha256(ptx_bytes(arch)).hexdigest()


def register() -> None:
    """Register ``dpr::FusedMoEGate`` with TensorRT's plugin registry (idempotent)."""
    global _registered
    if _registered:
        return
    from dpr.errors import require

    trt = require("tensorrt", "the TensorRT plugin dpr::FusedMoEGate")
    from dpr.kernels.trt_version import MIN_TENSORRT_STR, tensorrt_too_old

    too_old = tensorrt_too_old(trt.__version__)      # aot_impl: TensorRT >= 10.9
    if too_old:
        raise RuntimeError(too_old)
    trtp = require("tensorrt.plugin", f"the TensorRT plugin dpr::FusedMoEGate (TensorRT >= {MIN_TENSORRT_STR})")
    from typing import List, Tuple, Union

    @trtp.register(TRT_PLUGIN_ID)
    def fused_moe_gate_desc(z: trtp.TensorDesc, w_router: trtp.TensorDesc, b_router: trtp.TensorDesc,
                            expert_out: trtp.TensorDesc, polarity: trtp.TensorDesc, residual: trtp.TensorDesc,
                            experts_per_polarity: int, top_k: int) -> trtp.TensorDesc:
        return residual.like()

    @trtp.autotune(TRT_PLUGIN_ID)
    def fused_moe_gate_autotune(z: trtp.TensorDesc, w_router: trtp.TensorDesc, b_router: trtp.TensorDesc,
                                expert_out: trtp.TensorDesc, polarity: trtp.TensorDesc, residual: trtp.TensorDesc,
                                outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        # positions: 6 inputs then the output
        return [trtp.AutoTuneCombination("FP32, FP32, FP32, FP32, INT64, FP32, FP32", "LINEAR"),
                trtp.AutoTuneCombination("FP16, FP16, FP16, FP16, INT64, FP16, FP16", "LINEAR")]

    @trtp.aot_impl(TRT_PLUGIN_ID)
    def fused_moe_gate_aot_impl(
        z: trtp.TensorDesc, w_router: trtp.TensorDesc, b_router: trtp.TensorDesc, expert_out: trtp.TensorDesc,
        polarity: trtp.TensorDesc, residual: trtp.TensorDesc, experts_per_polarity: int, top_k: int,
        outputs: Tuple[trtp.TensorDesc],
    ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        n, k = int(experts_per_polarity), int(top_k)
        if not 1 <= k <= n <= 32:
            raise ValueError(f"dpr::FusedMoEGate: need 1 <= top_k <= experts_per_polarity <= 32, got {k}, {n}")
        dtype = "float16" if z.dtype == trt.float16 else "float32"
        rows = z.shape_expr[0]          # may be dynamic: resolved by TensorRT at enqueue time
        d = z.shape_expr[1]
        num_experts = expert_out.shape_expr[1]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(rows, ROWS_PER_BLOCK)
        launch.block_x = THREADS_PER_BLOCK
        launch.shared_mem = 0           # the kernel's shared memory is static
        # int32 scalars after the input pointers, before the output pointer (the kernel's signature)
        extra_args = trtp.SymIntExprs.from_tuple(
            [trtp.SymInt32(e) for e in (rows, d, num_experts, n, k)])
        return KERNEL_NAMES[dtype].encode(), ptx_bytes(80), launch, extra_args

    _registered = True


def make_trt_onnx(path: str | Path, dtype: str = "float32", experts_per_polarity: int = 4, top_k: int = 2,
                  d: int = 64, batch: int | str = "B") -> Path:
    """Write a one-node ONNX model with the node the exporter writes (domain ``dpr``, the plugin attributes
    ``op_spec.TRT_NODE_ATTRS`` and the portable body as a model-local function), which TensorRT's ONNX
    parser maps onto the AOT plugin when it is registered."""
    import onnx
    from onnx import TensorProto, helper

    elem = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.FLOAT
    E = 2 * experts_per_polarity
    shapes = {"z": [batch, d], "w_router": [d, E], "b_router": [E], "expert_out": [batch, E, d],
              "polarity": [batch], "residual": [batch, d]}
    ins = [helper.make_tensor_value_info(nm, TensorProto.INT64 if nm == "polarity" else elem, shapes[nm])
           for nm in INPUTS]
    out = helper.make_tensor_value_info("out", elem, [batch, d])
    node = helper.make_node(OP_NAME, list(INPUTS), ["out"], name="fused_moe_gate", domain=OP_DOMAIN,
                            **TRT_NODE_ATTRS, **dict(zip(ATTRS, (experts_per_polarity, top_k))))
    graph = helper.make_graph([node], "dpr_fused_moe_gate", ins, [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid(OP_DOMAIN, OP_DOMAIN_VERSION)])
    from dpr.kernels.onnx_function import attach_function

    attach_function(model)
    path = Path(path)
    onnx.save(model, str(path))
    return path
