"""ctypes binding of the history padding (``history_pad_api.h``): a batch's flat histories + offsets -> the user
encoder's (B, L) left-padded int64 input in one pass. Its specification and fallback is the engine's numpy
form (``pad_flat_reference``, what ``StagePipeline._pad_flat`` runs when the library is not built); the two are
held equal in tests/test_history_pad.py."""

from __future__ import annotations

import ctypes

import numpy as np

from dpr.kernels import capi, id_index

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
KernelError = capi.KernelError


def _configure(lib: ctypes.CDLL) -> None:
    lib.dpr_history_pad_status_string.restype = ctypes.c_char_p
    lib.dpr_history_pad_status_string.argtypes = [ctypes.c_int]
    lib.dpr_history_pad_left.restype = ctypes.c_int
    lib.dpr_history_pad_left.argtypes = [_P, _I64, _P, _I64, _I64, _P]


def library() -> ctypes.CDLL | None:
    """The library holding the padding (the ``ids_lib`` build target, loaded and configured by
    :mod:`dpr.kernels.id_index`), or None when it is not built."""
    return id_index.library_with("dpr_history_pad_left")


def pad_flat_reference(flat: np.ndarray, offsets: np.ndarray, width: int) -> np.ndarray:
    """Left-pad (0) the rows ``flat[offsets[i]:offsets[i + 1]]`` to ``width``, keeping the most recent items:
    whole-array numpy, no per-row work."""
    b, L = len(offsets) - 1, int(width)
    out = np.zeros((b, L), dtype=np.int64)
    take = np.minimum(np.diff(offsets), L)
    total = int(take.sum())
    if total:
        # flat position of each kept item, and its padded column: one repeat per array
        ends = offsets[1:]
        start_in_out = np.repeat(np.arange(b) * L + (L - take), take)
        step = np.arange(total) - np.repeat(np.cumsum(take) - take, take)     # 0..take-1 per row
        src = np.repeat(ends - take, take) + step
        out.reshape(-1)[start_in_out + step] = flat[src]
    return out


def pad_flat(flat: np.ndarray, offsets: np.ndarray, width: int) -> np.ndarray:
    """``pad_flat_reference`` through the native kernel when it is built. ``flat`` / ``offsets``: int64 1-D
    (other integer arrays are converted); bad offsets raise ``ValueError`` naming the rule."""
    lib = library()
    if lib is None:
        return pad_flat_reference(np.asarray(flat, np.int64), np.asarray(offsets, np.int64), width)
    flat = np.ascontiguousarray(flat, dtype=np.int64)
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    if offsets.ndim != 1 or len(offsets) < 1 or flat.ndim != 1:
        raise ValueError("pad_flat takes a 1-D flat array and 1-D offsets with at least one entry")
    rows = len(offsets) - 1
    out = np.empty((rows, int(width)), np.int64)
    status = lib.dpr_history_pad_left(flat.ctypes.data, len(flat), offsets.ctypes.data, rows, int(width),
                                      out.ctypes.data)
    if status != 0:
        raise ValueError(f"cannot pad these histories: {lib.dpr_history_pad_status_string(status).decode()}")
    return out
