"""``torch.ops.dpr.moe_gate``: the fused MoE gate as a torch operator, for the torch backend's hot path.

    from dpr.kernels import moe_gate_op
    moe_gate_op.load()                       # builds (cached) and loads the operator libraries once
    out = torch.ops.dpr.moe_gate(z, w_router, b_router, expert_out, polarity, residual, n, k)
    moe_gate_op.implementation("cpu")        # "cpp" or "reference", and moe_gate_op.status() says why

Implementations, all registered with torch's dispatcher (``torch.library``):

* **CPU**: the C++ CPU twin (``fused_moe_gate_cpu.cc``) compiled with ``moe_gate_torch.cc`` against torch's
  headers into ``libdpr_torch_ops.so`` (``python -m dpr.kernels.build``, cached by source, compiler and torch
  version) and loaded with ``torch.ops.load_library``. No Python and no ctypes between the caller and the
  kernel: a call costs what an aten op costs.
* **CUDA**: ``fused_moe_gate.cu`` with ``moe_gate_torch_cuda.cc`` in ``libdpr_torch_ops_cuda.so`` (nvcc and a
  CUDA build of torch), launched on torch's current stream, so it can be captured in CUDA graphs.
* **Fake (meta)**: :func:`_fake`, registered with ``torch.library.register_fake``: shapes and dtypes only,
  for FakeTensorMode, torch.compile (``fullgraph=True``) and torch.export.

When the CPU library cannot be built or loaded (no compiler, a torch without headers), :func:`load` defines
the same operator with ``dpr.model.moe.moe_gate_reference`` as its implementation (every device) and records
why in :func:`status`: slower, never wrong. ``dpr::fused_moe_gate`` (:mod:`dpr.kernels.torch_op`) stays the
op the ONNX exporter traces into one ``dpr::FusedMoEGate`` node.
"""

from __future__ import annotations

import logging
import threading

import torch

from dpr.model.moe import moe_gate_reference

log = logging.getLogger("dpr.kernels")

OP = "dpr::moe_gate"
SCHEMA = ("moe_gate(Tensor z, Tensor w_router, Tensor b_router, Tensor expert_out, Tensor polarity, "
          "Tensor residual, int experts_per_polarity, int top_k) -> Tensor")

_lock = threading.Lock()
_state: dict = {"loaded": False, "cpu": None, "cuda": None, "why": {}}
_keep: list = []            # the fallback's torch.library.Library objects must outlive the registration


def _fake(z, w_router, b_router, expert_out, polarity, residual, experts_per_polarity, top_k):
    """Shapes and dtypes of the output (what tracing needs), with the checks that do not need values."""
    torch._check(z.dim() == 2, lambda: f"dpr::moe_gate: z must be 2-D (B, d), got {z.dim()}-D")
    torch._check(residual.shape == z.shape, lambda: "dpr::moe_gate: residual must have z's shape (B, d)")
    torch._check(expert_out.dim() == 3, lambda: "dpr::moe_gate: expert_out must be (B, E, d)")
    torch._check(polarity.dtype == torch.int64, lambda: "dpr::moe_gate: polarity must be int64")
    torch._check(expert_out.shape[1] == 2 * experts_per_polarity,
                 lambda: "dpr::moe_gate: expert_out must have 2 * experts_per_polarity experts")
    return torch.empty_like(residual, memory_format=torch.contiguous_format)


def _reference(z, w_router, b_router, expert_out, polarity, residual, experts_per_polarity, top_k):
    return moe_gate_reference(z, w_router, b_router, expert_out, polarity, residual, experts_per_polarity,
                              top_k).clone()


def _library_path(name: str, build: bool):
    from dpr.kernels import build as kbuild

    path = kbuild.artifact_path(name)
    if path is None and build:
        res = kbuild.build(only=[name], verbose=False)
        if name in res.failed:
            raise RuntimeError(f"{name} failed to build: {res.failed[name].strip().splitlines()[-1:]}")
        if name in res.skipped:
            raise RuntimeError(f"{name} not built here: {res.skipped[name]}")
        path = res.path(name)
    if path is None:
        raise RuntimeError(f"{name} is not built (python -m dpr.kernels.build)")
    return path


def _define_reference(why: str) -> None:
    """The operator with the reference as its implementation on every device (the library is missing)."""
    lib = torch.library.Library("dpr", "FRAGMENT")
    lib.define(SCHEMA)
    lib.impl("moe_gate", _reference, "CompositeExplicitAutograd")
    _keep.append(lib)
    log.warning("dpr.kernels: dpr::moe_gate runs the plain-PyTorch reference: %s", why)


def load(build: bool = True) -> dict:
    """Register ``dpr::moe_gate`` once per process (thread-safe): the C++ libraries when they build and load,
    else the reference. ``build``: build a missing library now (about 20 s, cached). Returns :func:`status`."""
    with _lock:
        if _state["loaded"]:
            return status()
        try:
            torch.ops.load_library(str(_library_path("torch_ops", build)))
            _state["cpu"] = "cpp"
        except Exception as exc:  # noqa: BLE001 - any failure (compiler, ABI, loader) means the fallback
            _state["why"]["cpu"] = f"{type(exc).__name__}: {exc}"
            _define_reference(_state["why"]["cpu"])
            _state["cpu"] = "reference"
        if _state["cpu"] == "cpp":
            if torch.cuda.is_available():
                try:
                    torch.ops.load_library(str(_library_path("torch_ops_cuda", build)))
                    _state["cuda"] = "cpp"
                except Exception as exc:  # noqa: BLE001
                    # no CUDA kernel registered: CUDA tensors would find no implementation, so the reference
                    # serves them (registered for the CUDA key only; the CPU key keeps the twin)
                    _state["why"]["cuda"] = f"{type(exc).__name__}: {exc}"
                    lib = torch.library.Library("dpr", "IMPL")
                    lib.impl("moe_gate", _reference, "CUDA")
                    _keep.append(lib)
                    _state["cuda"] = "reference"
            else:
                _state["why"]["cuda"] = "no CUDA device visible"
        else:
            _state["cuda"] = "reference"
        torch.library.register_fake(OP)(_fake)
        _state["loaded"] = True
        return status()


def implementation(device: str = "cpu") -> str:
    """``"cpp"`` (the C++ twin on the CPU / the CUDA kernel) or ``"reference"``; loads the op first."""
    load()
    return _state["cuda" if torch.device(device).type == "cuda" else "cpu"] or "reference"


def status() -> dict:
    """What serves each device and, where it is not the C++ library, why."""
    return {"op": OP, "cpu": _state["cpu"], "cuda": _state["cuda"], "why": dict(_state["why"])}


def moe_gate(z, w_router, b_router, expert_out, polarity, residual, experts_per_polarity: int,
             top_k: int) -> torch.Tensor:
    """``torch.ops.dpr.moe_gate`` with the arguments checked in Python first (an InputError naming the
    problem): the signature of ``MoE.gate``. The hot path calls the op itself (its C++ checks run there)."""
    from dpr.kernels.torch_op import check_inputs

    load()
    check_inputs(z, w_router, b_router, expert_out, polarity, residual, experts_per_polarity, top_k)
    return torch.ops.dpr.moe_gate(z, w_router, b_router, expert_out, polarity, residual, experts_per_polarity, top_k)
