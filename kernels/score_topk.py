"""ctypes binding of the fused score + top-k CPU kernel (``score_topk_api.h``); numpy in, numpy out.

The reference it is tested against is plain ``torch.topk(queries @ table[1:].T)`` with the filters
applied to the score matrix (see ``tests/test_score_topk.py``).

:func:`score_topk_int8` is the same exact top-k through the int8 screen (:func:`pack_int8` tables, built once):
an int8 dot product (AVX-512 VNNI) plus a rigorous bound on its error rules most items out, the rest get
their exact fp32 score; same indices and score bits as :func:`score_topk` (``tests/test_score_topk_int8.py``).
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple

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
    lib.dpr_score_topk_int8_isa.restype = ctypes.c_char_p
    lib.dpr_score_topk_int8_isa.argtypes = []
    lib.dpr_score_topk_cpu_has_vnni.restype = ctypes.c_int
    lib.dpr_score_topk_cpu_has_vnni.argtypes = []
    lib.dpr_score_topk_pack_int8.restype = ctypes.c_int
    lib.dpr_score_topk_pack_int8.argtypes = [_P, _I64, _I64, _P, _P]
    lib.dpr_score_topk_int8.restype = ctypes.c_int
    lib.dpr_score_topk_int8.argtypes = [_P, _I64, _I64, _P, _P, _P, _I64, _I64, _P, _P, ctypes.c_int, _P, _I64,
                                        _P, _P, ctypes.c_int, ctypes.c_int, _P]


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


#: the int8 screen's largest dimension (its int32 accumulators cannot overflow up to here)
INT8_MAX_DIM = 16384
_SCREEN_ISAS = {"auto": 0, "generic": 1, "avx512vnni": 2}


class Int8Table(NamedTuple):
    """The int8 screen's tables of an item table (:func:`pack_int8`): ``packed8`` uint8 ``(panels, G, 32, 4)``
    (G = ceil(d / 4); each item's dims ``4g .. 4g+3`` in one 32-bit lane, as ``x8 + 128``) and ``stats`` float32
    ``(panels, 4, 32)`` (per item: scale, quantization error norm, norm; row 3: the panel's max error and norm).
    Memory: about N x d bytes + 4 floats per item."""
    packed8: np.ndarray
    stats: np.ndarray
    num_items: int
    d: int


def screen_isa() -> str:
    """What the int8 screen runs with ``isa="auto"``: ``avx512vnni`` (vpdpbusd) on a CPU with AVX-512 VNNI
    unless ``DPR_TOPK_ISA`` caps the kernel below AVX-512; else ``generic`` (the portable screen: exact, but
    slower than the fp32 tiles, so callers keep fp32 there)."""
    return _require().dpr_score_topk_int8_isa().decode()


def cpu_has_vnni() -> bool:
    """Whether this CPU has AVX-512 F + BW + VNNI (whatever ``DPR_TOPK_ISA`` says)."""
    return bool(_require().dpr_score_topk_cpu_has_vnni())


def pack_int8(table: np.ndarray) -> Int8Table:
    """The int8 screen's tables of a float32 ``(N + 1, d)`` table (row 0 = padding, dropped); ``d <= 16384``."""
    lib = _require()
    table = np.ascontiguousarray(table, dtype=np.float32)
    n, d = table.shape[0] - 1, table.shape[1]
    if d > INT8_MAX_DIM:
        raise ValueError(f"the int8 screen takes d <= {INT8_MAX_DIM}, got {d}")
    panels, groups = -(-n // PANEL), -(-d // 4)
    packed8 = np.empty((panels, groups, PANEL, 4), dtype=np.uint8)
    stats = np.empty((panels, 4, PANEL), dtype=np.float32)
    _check(lib, lib.dpr_score_topk_pack_int8(table.ctypes.data, n, d, packed8.ctypes.data, stats.ctypes.data))
    return Int8Table(packed8, stats, n, d)


def _filters(b: int, num_items: int, excl_offsets, excl_items, allowed):
    """Checked filter arguments as the kernels take them: (offsets, items, allowed pointers, allowed row stride,
    the arrays behind the pointers, to keep alive until the call returns)."""
    off_p = items_p = allowed_p = None
    stride = 0
    keep = []
    if excl_offsets is not None:
        excl_offsets = np.ascontiguousarray(excl_offsets, dtype=np.int64)
        excl_items = np.ascontiguousarray(excl_items, dtype=np.int64)
        if excl_offsets.shape != (b + 1,) or excl_offsets[-1] != excl_items.size:
            raise ValueError("excl_offsets must have B + 1 entries ending at len(excl_items)")
        off_p, items_p = excl_offsets.ctypes.data, excl_items.ctypes.data
        keep += [excl_offsets, excl_items]
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
        keep.append(allowed)
    return off_p, items_p, allowed_p, stride, keep


def score_topk_int8(queries: np.ndarray, table: np.ndarray, int8: Int8Table, k: int,
                    excl_offsets: np.ndarray | None = None, excl_items: np.ndarray | None = None,
                    allowed: np.ndarray | None = None, threads: int = 0, rows_sorted: bool = True,
                    isa: str = "auto", return_rescored: bool = False):
    """:func:`score_topk`'s exact top-``k`` through the int8 screen: the same indices and the same float32
    scores (bit for bit, as the AVX-512 / AVX2 tiles compute them). ``table`` is the float32 ``(N + 1, d)`` table
    ``int8`` was packed from (the survivors' exact scores are computed from it). ``isa``: ``"auto"``
    (:func:`screen_isa`), ``"generic"`` (the portable screen) or ``"avx512vnni"`` (KernelError without it).
    ``return_rescored``: also return the int64 ``(B,)`` count of exact re-scores per row."""
    lib = _require()
    q = np.ascontiguousarray(queries, dtype=np.float32)
    b, d = q.shape
    table = np.ascontiguousarray(table, dtype=np.float32)
    num_items = int8.num_items
    if table.shape != (num_items + 1, d) or int8.d != d:
        raise ValueError(f"table {table.shape} / int8 tables (N={num_items}, d={int8.d}) do not match d={d}")
    panels, groups = -(-num_items // PANEL), -(-d // 4)
    if int8.packed8.shape != (panels, groups, PANEL, 4) or int8.packed8.dtype != np.uint8 \
            or int8.stats.shape != (panels, 4, PANEL) or int8.stats.dtype != np.float32 \
            or not (int8.packed8.flags.c_contiguous and int8.stats.flags.c_contiguous):
        raise ValueError("int8 tables do not match the item table (use pack_int8)")
    if isa not in _SCREEN_ISAS:
        raise ValueError(f"isa must be one of {', '.join(_SCREEN_ISAS)}, got {isa!r}")
    out_i = np.empty((b, k), dtype=np.int64)
    out_s = np.empty((b, k), dtype=np.float32)
    rescored = np.zeros(b, dtype=np.int64) if return_rescored else None
    off_p, items_p, allowed_p, stride, keep = _filters(b, num_items, excl_offsets, excl_items, allowed)
    _check(lib, lib.dpr_score_topk_int8(q.ctypes.data, b, d, table.ctypes.data, int8.packed8.ctypes.data,
                                        int8.stats.ctypes.data, num_items, k, off_p, items_p, int(bool(rows_sorted)),
                                        allowed_p, stride, out_i.ctypes.data, out_s.ctypes.data, int(threads),
                                        _SCREEN_ISAS[isa], None if rescored is None else rescored.ctypes.data))
    del keep
    if return_rescored:
        return out_i, out_s, rescored
    return out_i, out_s


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
    off_p, items_p, allowed_p, stride, keep = _filters(b, num_items, excl_offsets, excl_items, allowed)
    fn = lib.dpr_score_topk_f32 if rows_sorted else lib.dpr_score_topk_f32_any_order
    _check(lib, fn(q.ctypes.data, b, d, packed.ctypes.data, num_items, k, off_p, items_p,
                   allowed_p, stride, out_i.ctypes.data, out_s.ctypes.data, int(threads)))
    del keep
    return out_i, out_s
