"""ctypes bindings of the Triton BYTES tensor kernels (``bytes_tensor_api.h``).

* :func:`split`: the wire form of a BYTES tensor -> its elements as bytes objects, Python doing one slice per
  element. ``serve/triton_python.py`` uses it in the backend stub; tests/test_serve_triton_bytes.py holds it equal
  to Triton's own ``deserialize_bytes_tensor``.
* :class:`WireTable`: a fixed list of elements (the catalogue's item ids) kept in wire form, and the wire form of
  any tensor of them gathered by index in one call (the native Triton backend's ``item_ids`` output); its numpy
  twin :meth:`WireTable.gather_reference` is the specification and the fallback.
"""

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
    if hasattr(lib, "dpr_bytes_tensor_gather"):
        lib.dpr_bytes_tensor_gather.restype = ctypes.c_int
        lib.dpr_bytes_tensor_gather.argtypes = [_P, _P, _I64, _P, _I64, _P, _I64, _P, ctypes.POINTER(_I64)]


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


class WireTable:
    """``elements`` (bytes) kept in Triton's BYTES wire form, one after the other, so that the wire form of a tensor
    of them is a gather by index (:meth:`gather`) instead of a bytes object per element and a join."""

    def __init__(self, elements):
        frags = [len(e).to_bytes(4, "little") + e for e in elements]
        self.offsets = np.zeros(len(frags) + 1, np.int64)
        np.cumsum(np.fromiter(map(len, frags), np.int64, len(frags)), out=self.offsets[1:])
        self.blob = np.frombuffer(b"".join(frags), np.uint8) if frags else np.zeros(0, np.uint8)
        self.max_len = int(np.diff(self.offsets).max()) if frags else 0
        self._lib = id_index.library_with("dpr_bytes_tensor_gather")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def gather(self, index: np.ndarray) -> tuple[bytes, np.ndarray]:
        """(the wire form of the tensor whose elements are ``elements[index]``, in C order; int64 start of each
        of its elements, plus the end). Raises ``IndexError`` for an index outside the table."""
        if self._lib is None:
            return self.gather_reference(index)
        index = np.ascontiguousarray(index, np.int64).reshape(-1)
        n = len(index)
        out = np.empty(n * self.max_len, np.uint8)
        offsets = np.empty(n + 1, np.int64)
        got = _I64(0)
        status = self._lib.dpr_bytes_tensor_gather(self.blob.ctypes.data, self.offsets.ctypes.data, len(self),
                                                   index.ctypes.data, n, out.ctypes.data, len(out),
                                                   offsets.ctypes.data, ctypes.byref(got))
        if status == 4:                                # DPR_BYTES_BAD_ARGUMENT: *out_len is the element
            raise IndexError(f"element {got.value}: index {int(index[got.value])} is outside the table of {len(self)}")
        if status != 0:
            raise KernelError(f"BYTES gather failed: {self._lib.dpr_bytes_tensor_status_string(status).decode()}")
        return out[:got.value].tobytes(), offsets

    def gather_reference(self, index: np.ndarray) -> tuple[bytes, np.ndarray]:
        """:meth:`gather` in numpy (its specification and fallback)."""
        index = np.asarray(index, np.int64).reshape(-1)
        bad = np.flatnonzero((index < 0) | (index >= len(self)))
        if bad.size:
            e = int(bad[0])
            raise IndexError(f"element {e}: index {int(index[e])} is outside the table of {len(self)}")
        lens = self.offsets[index + 1] - self.offsets[index]
        offsets = np.zeros(len(index) + 1, np.int64)
        np.cumsum(lens, out=offsets[1:])
        src = np.repeat(self.offsets[index] - offsets[:-1], lens) + np.arange(offsets[-1])
        return self.blob[src].tobytes(), offsets
