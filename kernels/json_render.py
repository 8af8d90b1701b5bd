"""ctypes binding of the /recommend answer renderer (``json_render_api.h``): a batch's ranked items (indices,
float32 scores, counts) and per-item JSON fragments -> the answer's JSON text in one pass. Its specification
and fallback is ``dpr.serve.render.recommend_json`` (Python); tests/test_json_render.py holds them byte for
byte equal, and :func:`double_repr` equal to Python's ``repr``."""

from __future__ import annotations

import ctypes

import numpy as np

from dpr.kernels import capi, id_index

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
KernelError = capi.KernelError


def _configure(lib: ctypes.CDLL) -> None:
    global _render_keep_gil, _float_list_keep_gil, _fragment_list_keep_gil
    lib.dpr_render_status_string.restype = ctypes.c_char_p
    lib.dpr_render_status_string.argtypes = [ctypes.c_int]
    lib.dpr_render_double_repr.restype = ctypes.c_int
    lib.dpr_render_double_repr.argtypes = [ctypes.c_double, ctypes.c_char_p]
    # the renderer through a ctypes.PyDLL handle on the same library: called without releasing the GIL. It runs on
    # the HTTP service's event-loop thread for tens of microseconds; a CDLL call drops the GIL and then queues for
    # it behind the engine's threads: under load with 64 single-request clients that wait made the call cost 170 us
    # for ~9 rows where it takes 25 us alone (docs/LOAD_TEST.md)
    _render_keep_gil = ctypes.PyDLL(lib._name).dpr_render_recommend_rows
    _render_keep_gil.restype = ctypes.c_int
    _render_keep_gil.argtypes = [_P, _P, _I64, _I64, _P, _I64, ctypes.c_char_p, _P, _I64, _I64, ctypes.c_char_p,
                                 _P, _P, _I64, ctypes.POINTER(_I64), _P]
    if hasattr(lib, "dpr_render_float_list"):        # the v2 answer's FP32 lists: the event loop's too, as above
        _float_list_keep_gil = ctypes.PyDLL(lib._name).dpr_render_float_list
        _float_list_keep_gil.restype = ctypes.c_int
        _float_list_keep_gil.argtypes = [_P, _I64, ctypes.c_char_p, _I64, ctypes.POINTER(_I64)]
    if hasattr(lib, "dpr_render_fragment_list"):     # the v2 answer's JSON item_ids: the event loop's too
        _fragment_list_keep_gil = ctypes.PyDLL(lib._name).dpr_render_fragment_list
        _fragment_list_keep_gil.restype = ctypes.c_int
        _fragment_list_keep_gil.argtypes = [_P, _I64, ctypes.c_char_p, _P, _I64, _I64, ctypes.c_char_p, _I64,
                                            ctypes.POINTER(_I64)]


_render_keep_gil = None      # set by _configure when the library is loaded
_float_list_keep_gil = None  # set by _configure when the library has it
_fragment_list_keep_gil = None  # set by _configure when the library has it


def float_list_json(values: np.ndarray) -> bytes | None:
    """``json.dumps(values.reshape(-1).tolist()).encode()`` of a float32 array, the same bytes (see
    json_render_api.h), or None when the library is not built or predates it."""
    if library() is None or _float_list_keep_gil is None:
        return None
    v = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    cap = 26 * len(v) + 2
    out = ctypes.create_string_buffer(cap)
    written = _I64(0)
    status = _float_list_keep_gil(v.ctypes.data, len(v), out, cap, ctypes.byref(written))
    if status != 0:
        raise KernelError(f"cannot render these floats: {id_index.library().dpr_render_status_string(status).decode()}")
    return ctypes.string_at(out, written.value)


def fragment_list_json(frags: "Fragments", indices: np.ndarray) -> bytes | None:
    """``"[" + ", ".join(fragment of each index) + "]"`` (see json_render_api.h): with each fragment an element's
    ``json.dumps`` text, the bytes ``json.dumps`` writes for the list. None when the library is not built or
    predates it; an index outside the fragments raises KernelError."""
    if library() is None or _fragment_list_keep_gil is None:
        return None
    ix = np.ascontiguousarray(indices, dtype=np.int64).reshape(-1)
    cap = 2 + len(ix) * (frags.longest + 2)
    out = ctypes.create_string_buffer(cap)
    written = _I64(0)
    status = _fragment_list_keep_gil(ix.ctypes.data, len(ix), frags.blob, frags.offsets.ctypes.data, frags.count,
                                     len(frags.blob), out, cap, ctypes.byref(written))
    if status != 0:
        raise KernelError(f"cannot render this list: {id_index.library().dpr_render_status_string(status).decode()}")
    return ctypes.string_at(out, written.value)


def library() -> ctypes.CDLL | None:
    """The library holding the renderer (the ``ids_lib`` build target, loaded and configured by
    :mod:`dpr.kernels.id_index`), or None when it is not built."""
    return id_index.library_with("dpr_render_recommend_rows")


def double_repr(v: float) -> str:
    """The native renderer's text of a double: Python's ``repr(float(v))``."""
    lib = id_index.require("dpr_render_recommend_rows")
    buf = ctypes.create_string_buffer(32)
    n = lib.dpr_render_double_repr(float(v), buf)
    return buf.raw[:n].decode("ascii")


class Fragments:
    """Per-item JSON fragments packed once per catalogue: one bytes blob and its (n + 1,) offsets."""

    def __init__(self, fragments: list[str]):
        data = [f.encode("utf-8") for f in fragments]
        self.blob = b"".join(data)
        self.offsets = np.zeros(len(data) + 1, np.int64)
        np.cumsum([len(d) for d in data], out=self.offsets[1:])
        self.longest = max((len(d) for d in data), default=0)
        self.count = len(data)


def render_rows(frags: Fragments, indices: np.ndarray, scores: np.ndarray, counts: np.ndarray, k: int,
                reasons: list[bytes], row_ends: np.ndarray | None = None) -> bytes:
    """The rows of an answer joined by ", " (see json_render_api.h): ``indices`` (B, c) int64, ``scores``
    (B, c) float32, ``counts`` (B,) int64, ``reasons`` each row's short reason, already JSON (bytes).
    ``row_ends``: a (B,) int64 array that receives the offset just past each row's text (or None)."""
    lib = id_index.require("dpr_render_recommend_rows")
    indices = np.ascontiguousarray(indices, dtype=np.int64)
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    counts = np.ascontiguousarray(counts, dtype=np.int64)
    rows, cols = indices.shape if indices.ndim == 2 else (len(counts), 0)
    if row_ends is not None and (row_ends.dtype != np.int64 or row_ends.shape != (rows,)
                                 or not row_ends.flags.c_contiguous or not row_ends.flags.writeable):
        raise ValueError(f"render_rows: row_ends must be a writeable contiguous ({rows},) int64 array")
    if scores.shape != indices.shape or counts.shape != (rows,) or len(reasons) != rows:
        raise ValueError(f"render_rows: indices {indices.shape}, scores {scores.shape}, counts {counts.shape} and "
                         f"{len(reasons)} reasons do not describe the same rows")
    blob = b"".join(reasons)
    roff = np.zeros(rows + 1, np.int64)
    np.cumsum([len(r) for r in reasons], out=roff[1:])
    items = int(counts.sum())
    # every piece bounded: a row's fixed text (< 100 bytes with two 20-digit integers) and its reason; an item's
    # fixed text (< 40), rank (<= 20 digits), fragment and score (< 32)
    cap = rows * 100 + len(blob) + items * (frags.longest + 100)
    out = ctypes.create_string_buffer(max(cap, 1))
    written = _I64(0)
    status = _render_keep_gil(indices.ctypes.data, scores.ctypes.data, rows, cols, counts.ctypes.data, int(k),
                              frags.blob, frags.offsets.ctypes.data, frags.count, len(frags.blob), blob,
                              roff.ctypes.data, out, cap, ctypes.byref(written),
                              None if row_ends is None else row_ends.ctypes.data)
    if status != 0:
        raise KernelError(f"cannot render this answer: {lib.dpr_render_status_string(status).decode()}")
    return ctypes.string_at(out, written.value)
