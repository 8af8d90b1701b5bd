"""torch binding of the fused MoE gate: ``torch.ops.dpr.fused_moe_gate``.

CUDA tensors run the CUDA kernel (ctypes on libdpr_kernels_cuda.so, on torch's current stream); CPU
tensors run the C++ CPU twin (libdpr_kernels.so); when the library is not built the op falls back to
``dpr.model.moe.moe_gate_reference``. ``register_fake`` lets torch.export / torch.onnx (dynamo) trace it;
``dpr.kernels.onnx_translation`` maps it to one ``dpr::FusedMoEGate`` ONNX node.

Usage: ``fused_moe_gate(z, w_router, b_router, expert_out, polarity, residual, n, k)`` or, as the MoE
module's gate, ``moe.gate = fused_moe_gate``.
"""

from __future__ import annotations

import torch

from dpr.errors import InputError
from dpr.kernels import capi
from dpr.kernels.op_spec import MAX_EXPERTS_PER_POLARITY
from dpr.model.moe import moe_gate_reference

_FLOATS = (torch.float32, torch.float16)


def check_inputs(z, w_router, b_router, expert_out, polarity, residual, experts_per_polarity: int,
                 top_k: int) -> tuple[int, int, int]:
    """Raise InputError (a ValueError) naming the problem; return (B, d, E)."""
    names = ("z", "w_router", "b_router", "expert_out", "polarity", "residual")
    tensors = (z, w_router, b_router, expert_out, polarity, residual)
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"fused_moe_gate: {name} must be a tensor, got {type(t).__name__}")
    if z.dtype not in _FLOATS:
        raise InputError(f"fused_moe_gate: z must be float32 or float16, got {z.dtype}")
    for name, t in zip(names, tensors):
        if name != "polarity" and t.dtype != z.dtype:
            raise InputError(f"fused_moe_gate: {name} has dtype {t.dtype}, expected {z.dtype} like z")
    if polarity.dtype != torch.int64:
        raise InputError(f"fused_moe_gate: polarity must be int64, got {polarity.dtype}")
    devs = {t.device for t in tensors}
    if len(devs) != 1:
        raise InputError(f"fused_moe_gate: all inputs must be on one device, got {sorted(map(str, devs))}")
    if z.dim() != 2:
        raise InputError(f"fused_moe_gate: z must be 2-D (B, d), got shape {tuple(z.shape)}")
    B, d = z.shape
    if expert_out.dim() != 3 or expert_out.shape[0] != B or expert_out.shape[2] != d:
        raise InputError(f"fused_moe_gate: expert_out must be (B, E, d) = ({B}, E, {d}), got {tuple(expert_out.shape)}")
    E = expert_out.shape[1]
    if tuple(w_router.shape) != (d, E):
        raise InputError(f"fused_moe_gate: w_router must be (d, E) = ({d}, {E}), got {tuple(w_router.shape)}")
    if tuple(b_router.shape) != (E,):
        raise InputError(f"fused_moe_gate: b_router must be (E,) = ({E},), got {tuple(b_router.shape)}")
    if tuple(polarity.shape) != (B,):
        raise InputError(f"fused_moe_gate: polarity must be (B,) = ({B},), got {tuple(polarity.shape)}")
    if tuple(residual.shape) != (B, d):
        raise InputError(f"fused_moe_gate: residual must be (B, d) = ({B}, {d}), got {tuple(residual.shape)}")
    n = experts_per_polarity
    if not 1 <= n <= MAX_EXPERTS_PER_POLARITY:
        raise InputError(f"fused_moe_gate: experts_per_polarity must be in 1..{MAX_EXPERTS_PER_POLARITY}, got {n}")
    if E != 2 * n:
        raise InputError(f"fused_moe_gate: expert_out has {E} experts, expected 2 * experts_per_polarity = {2 * n}")
    if not 1 <= top_k <= n:
        raise InputError(f"fused_moe_gate: top_k must be in 1..{n}, got {top_k}")
    if d < 1:
        raise InputError("fused_moe_gate: d must be >= 1")
    return B, d, E


def backend_for(device: torch.device | str) -> str:
    """Which implementation the op uses on ``device``: "cuda_kernel", "cpu_kernel" or "reference"."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return "cuda_kernel" if capi.load("cuda_lib") is not None else "reference"
    if dev.type == "cpu":
        return "cpu_kernel" if capi.load("cpu_lib") is not None else "reference"
    return "reference"


@torch.library.custom_op("dpr::fused_moe_gate", mutates_args=())
def fused_moe_gate(z: torch.Tensor, w_router: torch.Tensor, b_router: torch.Tensor, expert_out: torch.Tensor,
                   polarity: torch.Tensor, residual: torch.Tensor, experts_per_polarity: int,
                   top_k: int) -> torch.Tensor:
    B, d, E = check_inputs(z, w_router, b_router, expert_out, polarity, residual, experts_per_polarity, top_k)
    backend = backend_for(z.device)
    if backend == "reference":
        return moe_gate_reference(z, w_router, b_router, expert_out, polarity, residual, experts_per_polarity,
                                  top_k).clone()
    ins = [t.contiguous() for t in (z, w_router, b_router, expert_out, polarity, residual)]
    out = torch.empty((B, d), dtype=z.dtype, device=z.device)
    if B == 0:
        return out
    ptrs = [t.data_ptr() for t in ins] + [out.data_ptr()]
    dtype = "float32" if z.dtype == torch.float32 else "float16"
    if backend == "cuda_kernel":
        with torch.cuda.device(z.device):
            stream = torch.cuda.current_stream(z.device).cuda_stream
            capi.call_cuda(ptrs, dtype, B, d, E, experts_per_polarity, top_k, stream)
    else:
        capi.call_cpu(ptrs, dtype, B, d, E, experts_per_polarity, top_k, torch.get_num_threads())
    return out


@fused_moe_gate.register_fake
def _fused_moe_gate_fake(z, w_router, b_router, expert_out, polarity, residual, experts_per_polarity, top_k):
    torch._check(z.dim() == 2, lambda: f"fused_moe_gate: z must be 2-D (B, d), got {z.dim()}-D")
    torch._check(residual.shape == z.shape, lambda: "fused_moe_gate: residual must have z's shape (B, d)")
    torch._check(expert_out.dim() == 3, lambda: "fused_moe_gate: expert_out must be (B, E, d)")
    torch._check(polarity.dtype == torch.int64, lambda: "fused_moe_gate: polarity must be int64")
    return torch.empty_like(residual, memory_format=torch.contiguous_format)
