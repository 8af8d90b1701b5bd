"""ctypes bindings of the native libraries (C ABI in fused_moe_gate_api.h); no torch needed here."""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import numpy as np

from dpr.kernels import build as _build

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_ARGS = [_P] * 7 + [_I64] * 5

_lock = threading.Lock()
_libs: dict[str, ctypes.CDLL | None] = {}


class KernelError(RuntimeError):
    """A native kernel returned an error status."""


def _configure_gate(name: str, lib: ctypes.CDLL) -> None:
    lib.dpr_status_string.restype = ctypes.c_char_p
    lib.dpr_status_string.argtypes = [ctypes.c_int]
    if name == "cpu_lib":
        lib.dpr_fused_moe_gate_cpu_isa.restype = ctypes.c_char_p
        lib.dpr_fused_moe_gate_cpu_isa.argtypes = []
        for fn in (lib.dpr_fused_moe_gate_cpu_f32, lib.dpr_fused_moe_gate_cpu_f16):
            fn.restype = ctypes.c_int
            fn.argtypes = _ARGS + [ctypes.c_int]
    else:
        for fn in (lib.dpr_fused_moe_gate_cuda_f32, lib.dpr_fused_moe_gate_cuda_f16):
            fn.restype = ctypes.c_int
            fn.argtypes = _ARGS + [_P]
        lib.dpr_cuda_last_error.restype = ctypes.c_char_p


def load(name: str, configure=None) -> ctypes.CDLL | None:
    """The loaded library of build target ``name``, or None when not built; loaded once per process (until
    :func:`reset`). ``configure(lib)`` declares its signatures (default: the fused gate's, for "cpu_lib" and
    "cuda_lib")."""
    with _lock:
        if name in _libs:
            return _libs[name]
        path = _build.artifact_path(name)
        lib = None
        if path is not None:
            lib = ctypes.CDLL(str(path))
            if configure is not None:
                configure(lib)
            else:
                _configure_gate(name, lib)
        _libs[name] = lib
        return lib


def reset() -> None:
    """Forget loaded libraries (after a rebuild into another cache)."""
    with _lock:
        _libs.clear()


def check_status(lib: ctypes.CDLL, code: int) -> None:
    if code != 0:
        msg = lib.dpr_status_string(code).decode()
        if code == 7 and hasattr(lib, "dpr_cuda_last_error"):
            msg += ": " + lib.dpr_cuda_last_error().decode()
        raise KernelError(f"dpr::FusedMoEGate kernel failed (status {code}): {msg}")


def isa() -> str:
    """The vector path the CPU twin takes for float32 on this CPU: ``avx512f`` (d a multiple of 16; other
    multiples of 8 take ``avx2``), ``avx2`` (d a multiple of 8), or ``generic`` (the header's loop).
    ``DPR_GATE_ISA=generic`` / ``avx2`` caps it (read once per process)."""
    lib = load("cpu_lib")
    if lib is None:
        raise KernelError("libdpr_kernels.so is not built: run python -m dpr.kernels.build")
    return lib.dpr_fused_moe_gate_cpu_isa().decode()


def call_cpu(ptrs: list[int], dtype: str, B: int, d: int, E: int, n: int, k: int, num_threads: int = 0) -> None:
    """Raw call of the CPU twin on data pointers (z, w, b, y, polarity, residual, out)."""
    lib = load("cpu_lib")
    if lib is None:
        raise KernelError("libdpr_kernels.so is not built: run python -m dpr.kernels.build")
    fn = lib.dpr_fused_moe_gate_cpu_f32 if dtype == "float32" else lib.dpr_fused_moe_gate_cpu_f16
    check_status(lib, fn(*ptrs, B, d, E, n, k, num_threads))


def call_cuda(ptrs: list[int], dtype: str, B: int, d: int, E: int, n: int, k: int, stream: int) -> None:
    """Raw launch of the CUDA kernel on device pointers, on ``stream`` (a cudaStream_t as int)."""
    lib = load("cuda_lib")
    if lib is None:
        raise KernelError("libdpr_kernels_cuda.so is not built: run python -m dpr.kernels.build on a machine with nvcc")
    fn = lib.dpr_fused_moe_gate_cuda_f32 if dtype == "float32" else lib.dpr_fused_moe_gate_cuda_f16
    check_status(lib, fn(*ptrs, B, d, E, n, k, stream))


def fused_moe_gate_numpy(z, w_router, b_router, expert_out, polarity, residual, experts_per_polarity: int,
                         top_k: int, num_threads: int = 0) -> np.ndarray:
    """The CPU twin on numpy arrays (float32 or float16; polarity int64)."""
    dt = np.dtype(z.dtype)
    if dt not in (np.float32, np.float16):
        raise TypeError(f"z must be float32 or float16, got {dt}")
    arrs = [np.ascontiguousarray(a, dtype=dt) for a in (z, w_router, b_router, expert_out)]
    pol = np.ascontiguousarray(polarity, dtype=np.int64)
    res = np.ascontiguousarray(residual, dtype=dt)
    B, d = arrs[0].shape
    E = arrs[3].shape[1]
    if arrs[3].shape != (B, E, d) or arrs[1].shape != (d, E) or arrs[2].shape != (E,) or pol.shape != (B,) \
            or res.shape != (B, d):
        raise ValueError("shapes must be z (B,d), w_router (d,E), b_router (E,), expert_out (B,E,d), "
                         "polarity (B,), residual (B,d)")
    out = np.empty((B, d), dtype=dt)
    ptrs = [a.ctypes.data for a in (*arrs, pol, res, out)]
    call_cpu(ptrs, "float32" if dt == np.float32 else "float16", B, d, E, experts_per_polarity, top_k, num_threads)
    return out


def library_path(name: str) -> Path | None:
    return _build.artifact_path(name)
