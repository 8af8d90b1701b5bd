"""ctypes binding of the Triton BYTES tensor splitter (``bytes_tensor_api.h``): the wire form of a BYTES tensor
-> its elements as bytes objects, Python doing one slice per element. ``serve/triton_python.py`` uses it in the
backend stub; tests/test_serve_triton_bytes.py holds it equal to Triton's own ``deserialize_bytes_tensor``."""

from __future__ import annotations

import ctypes

import numpy as np

from dpr.kernels import capi, id_index

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
KernelError = capi.KernelError


def _configure(lib: ctypes.CDLL) -> None:
    lib.dpr_bytes_tensor_status_string.restype = ctypes.c_char_p
    lib.dpr_bytes_tensor_status_string.argtypes = [ctypes.c_int]
    lib.dpr_bytes_tensor_split.restype = ctypes.c_int
    lib.dpr_bytes_tensor_split.argtypes = [ctypes.c_char_p, _I64, _P, _P, _I64, ctypes.POINTER(_I64)]


def library() -> ctypes.CDLL | None:
    """The library holding the splitter (the ``ids_lib`` build target, loaded and configured by
    :mod:`dpr.kernels.id_index`), or None when it is not built."""
    return id_index.library_with("dpr_bytes_tensor_split")


def split(data: bytes) -> np.ndarray:
    """The elements of a serialized BYTES tensor, in order, as a 1-D object array of bytes. Raises
    ``ValueError`` naming the element where the data is truncated (Triton's own loop raises ``struct.error``
    there). Empty elements (a padded history is mostly padding: a 512-row call of the load test holds 102,400
    elements, 21,000 of them ids) share the one empty bytes object, and only the others are sliced."""
    lib = id_index.require("dpr_bytes_tensor_split")
    cap = len(data) // 4
    starts = np.empty(cap, np.int64)
    ends = np.empty(cap, np.int64)
    count = _I64(0)
    status = lib.dpr_bytes_tensor_split(data, len(data), starts.ctypes.data, ends.ctypes.data, cap,
                                        ctypes.byref(count))
    if status != 0:
        raise ValueError(f"BYTES tensor data: {lib.dpr_bytes_tensor_status_string(status).decode()} "
                         f"(after element {count.value})")
    c = count.value
    out = np.full(c, b"", dtype=np.object_)
    nonempty = np.flatnonzero(ends[:c] != starts[:c])
    if nonempty.size:
        sliced = np.empty(nonempty.size, dtype=np.object_)
        sliced[:] = list(map(data.__getitem__, map(slice, starts[nonempty].tolist(), ends[nonempty].tolist())))
        out[nonempty] = sliced
    return out
