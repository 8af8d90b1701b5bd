"""ctypes binding of the fused score + top-k CPU kernel (``score_topk_api.h``); numpy in, numpy out.

The reference it is tested against is plain ``torch.topk(queries @ table[1:].T)`` with the filters
applied to the score matrix (see ``tests/test_score_topk.py``).
"""

from __future__ import annotations

import ctypes

import numpy as np

from dpr.kernels import capi

PANEL = 32
_P = ctypes.c_void_p
_I64 = ctypes.c_int64
KernelError = capi.KernelError      # a native kernel returned an error status (a bug in the caller's arguments)


def _configure(lib: ctypes.CDLL) -> None:
    lib.dpr_score_topk_status_string.restype = ctypes.c_char_p
    lib.dpr_score_topk_status_string.argtypes = [ctypes.c_int]
    lib.dpr_score_topk_isa.restype = ctypes.c_char_p
    lib.dpr_score_topk_isa.argtypes = []
    lib.dpr_score_topk_pack_f32.restype = ctypes.c_int
    lib.dpr_score_topk_pack_f32.argtypes = [_P, _I64, _I64, _P]
    lib.dpr_score_topk_f32.restype = ctypes.c_int
    lib.dpr_score_topk_f32.argtypes = [_P, _I64, _I64, _P, _I64, _I64, _P, _P, _P, _I64, _P, _P, ctypes.c_int]
    lib.dpr_score_topk_f32_any_order.restype = ctypes.c_int
    lib.dpr_score_topk_f32_any_order.argtypes = lib.dpr_score_topk_f32.argtypes


def library() -> ctypes.CDLL | None:
    """The loaded ``libdpr_score_topk.so``, or None when it is not built (``python -m dpr.kernels.build``)."""
    return capi.load("topk_lib", _configure)


def library_available() -> bool:
    return library() is not None


def _require() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise KernelError("libdpr_score_topk.so is not built: run python -m dpr.kernels.build")
    return lib


def _check(lib: ctypes.CDLL, status: int) -> None:
    if status != 0:
        raise KernelError(f"dpr score_topk kernel failed (status {status}): "
                          f"{lib.dpr_score_topk_status_string(status).decode()}")


def isa() -> str:
    """The instruction set the kernel dispatches to on this CPU: ``avx512f``, ``avx2`` (AVX2 + FMA) or
    ``generic``; ``DPR_TOPK_ISA=generic`` / ``avx2`` caps it (read once per process)."""
    return _require().dpr_score_topk_isa().decode()


def pack(table: np.ndarray) -> np.ndarray:
    """The kernel's panel layout of a float32 ``(N + 1, d)`` table (row 0 = padding, dropped)."""
    lib = _require()
    table = np.ascontiguousarray(table, dtype=np.float32)
    n, d = table.shape[0] - 1, table.shape[1]
    panels = -(-n // PANEL)
    out = np.empty((panels, d, PANEL), dtype=np.float32)
    _check(lib, lib.dpr_score_topk_pack_f32(table.ctypes.data, n, d, out.ctypes.data))
    return out


def score_topk(queries: np.ndarray, packed: np.ndarray, num_items: int, k: int,
               excl_offsets: np.ndarray | None = None, excl_items: np.ndarray | None = None,
               allowed: np.ndarray | None = None, threads: int = 0,
               rows_sorted: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of ``queries (B, d) @ items 1..num_items``: ``(indices int64 (B, k), scores float32)``.

    ``excl_offsets (B + 1)`` / ``excl_items``: row ``b`` excludes ``excl_items[excl_offsets[b]:excl_offsets[b+1]]``
    (sorted within the row; ``rows_sorted=False``: in any order, sorted inside the kernel's threads). ``allowed``: None, bool/uint8 ``(N + 1,)`` shared or ``(B, N + 1)`` per row.
    Rows with fewer than ``k`` eligible items are padded with -1 / -inf. The GIL is released meanwhile.
    """
    lib = _require()
    q = np.ascontiguousarray(queries, dtype=np.float32)
    b, d = q.shape
    if packed.ndim != 3 or packed.shape[1] != d or packed.shape[2] != PANEL or packed.dtype != np.float32 \
            or packed.shape[0] != -(-num_items // PANEL) or not packed.flags.c_contiguous:
        raise ValueError(f"packed table of shape {packed.shape} does not match d={d}, num_items={num_items}")
    out_i = np.empty((b, k), dtype=np.int64)
    out_s = np.empty((b, k), dtype=np.float32)
    off_p = items_p = allowed_p = None
    stride = 0
    if excl_offsets is not None:
        excl_offsets = np.ascontiguousarray(excl_offsets, dtype=np.int64)
        excl_items = np.ascontiguousarray(excl_items, dtype=np.int64)
        if excl_offsets.shape != (b + 1,) or excl_offsets[-1] != excl_items.size:
            raise ValueError("excl_offsets must have B + 1 entries ending at len(excl_items)")
        off_p, items_p = excl_offsets.ctypes.data, excl_items.ctypes.data
    if allowed is not None:
        allowed = np.ascontiguousarray(allowed)
        if allowed.dtype not in (np.bool_, np.uint8):
            raise ValueError(f"allowed must be bool or uint8, got {allowed.dtype}")
        allowed = allowed.view(np.uint8)
        if allowed.shape == (num_items + 1,):
            stride = 0
        elif allowed.shape == (b, num_items + 1):
            stride = num_items + 1
        else:
            raise ValueError(f"allowed must have shape ({num_items + 1},) or ({b}, {num_items + 1}), got {allowed.shape}")
        allowed_p = allowed.ctypes.data
    fn = lib.dpr_score_topk_f32 if rows_sorted else lib.dpr_score_topk_f32_any_order
    _check(lib, fn(q.ctypes.data, b, d, packed.ctypes.data, num_items, k, off_p, items_p,
                                        allowed_p, stride, out_i.ctypes.data, out_s.ctypes.data, int(threads)))
    return out_i, out_s
