"""ctypes binding of the item-id index (``id_index_api.h``): a catalogue's string ids -> indices 1..N.

The engine maps every history id of a batch through it in one call (the ids joined by NUL bytes into one
UTF-8 buffer): the same answers as ``{id: i + 1}.get`` (its reference, see ``tests/test_id_index.py``), with
the cache misses of a batch's lookups overlapped instead of queued. Ids are compared as exact UTF-8 bytes.
"""

from __future__ import annotations

import ctypes
from itertools import chain
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from dpr.kernels import capi

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
KernelError = capi.KernelError
# id_index_api.h's statuses of lookup_wire_rows that describe the input, not a failure
_WIRE_PROBLEMS = {2: "malformed", 6: "unknown", 7: "hole"}


class WireRows(NamedTuple):
    """:meth:`IdIndex.lookup_wire_rows`'s answer: ``flat`` (int64 values 1..N of every row's ids, in order) and
    ``lens`` (int64 ids per row); or ``problem`` ("unknown": element ``element`` is not an id; "hole": element
    ``element`` is padding between two ids of its row; "malformed": the buffer does not hold the rows' elements)
    with ``flat`` and ``lens`` None."""
    flat: np.ndarray | None
    lens: np.ndarray | None
    problem: str | None
    element: int


def _configure(lib: ctypes.CDLL) -> None:
    lib.dpr_id_index_status_string.restype = ctypes.c_char_p
    lib.dpr_id_index_status_string.argtypes = [ctypes.c_int]
    lib.dpr_id_index_build.restype = ctypes.c_int
    lib.dpr_id_index_build.argtypes = [ctypes.c_char_p, _P, _I64, ctypes.POINTER(_P)]
    lib.dpr_id_index_lookup.restype = ctypes.c_int
    lib.dpr_id_index_lookup.argtypes = [_P, ctypes.c_char_p, _I64, _P, _I64, ctypes.POINTER(_I64)]
    if hasattr(lib, "dpr_id_index_lookup_wire_rows"):
        lib.dpr_id_index_lookup_wire_rows.restype = ctypes.c_int
        lib.dpr_id_index_lookup_wire_rows.argtypes = [_P, ctypes.c_char_p, _I64, _P, _I64, _P, _I64, _P,
                                                      ctypes.POINTER(_I64), ctypes.POINTER(_I64)]
    lib.dpr_id_index_free.restype = None
    lib.dpr_id_index_free.argtypes = [_P]
    if hasattr(lib, "dpr_history_pad_left"):             # the same library holds the history padding
        from dpr.kernels import history_pad
        history_pad._configure(lib)
    if hasattr(lib, "dpr_render_recommend_rows"):        # and the /recommend answer renderer
        from dpr.kernels import json_render
        json_render._configure(lib)
    if hasattr(lib, "dpr_recommend_parse"):              # and the /recommend body parser
        from dpr.kernels import recommend_parse
        recommend_parse._configure(lib)
    if hasattr(lib, "dpr_v2_json_parse"):                # and the v2 route's JSON reader
        from dpr.kernels import v2_json_parse
        v2_json_parse._configure(lib)
    if hasattr(lib, "dpr_bytes_tensor_split"):           # and the Triton BYTES tensor splitter
        from dpr.kernels import bytes_tensor
        bytes_tensor._configure(lib)


def library() -> ctypes.CDLL | None:
    """The loaded ``libdpr_id_index.so``, or None when it is not built (``python -m dpr.kernels.build``)."""
    return capi.load("ids_lib", _configure)


def library_available() -> bool:
    return library() is not None


def library_with(symbol: str) -> ctypes.CDLL | None:
    """This library when it is built and exports ``symbol`` (the other host-side helpers it holds: the history
    padding, the answer renderer, the BYTES splitter), else None."""
    lib = library()
    return lib if lib is not None and hasattr(lib, symbol) else None


def require(symbol: str) -> ctypes.CDLL:
    """:func:`library_with`, or ``KernelError`` saying how to build it."""
    lib = library_with(symbol)
    if lib is None:
        raise KernelError("libdpr_id_index.so is not built: run python -m dpr.kernels.build")
    return lib


class IdIndex:
    """Exact ``str -> 1..N`` map of ``ids`` (position + 1; 0 = unknown). Raises ``ValueError`` for ids the
    index cannot hold (a NUL character, duplicates, not strings): use a dict then. Thread-safe lookups."""

    def __init__(self, ids: Sequence[str]):
        lib = library()
        if lib is None:
            raise KernelError("libdpr_id_index.so is not built: run python -m dpr.kernels.build")
        if not all(isinstance(x, str) for x in ids):
            raise ValueError("every id must be a string")
        encoded = [x.encode("utf-8") for x in ids]          # UnicodeEncodeError is a ValueError
        blob = b"".join(encoded)
        offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        handle = _P()
        status = lib.dpr_id_index_build(blob, offsets.ctypes.data, len(encoded), ctypes.byref(handle))
        if status != 0:
            raise ValueError(f"cannot index these ids: {lib.dpr_id_index_status_string(status).decode()}")
        self._lib, self._handle, self.size = lib, handle, len(encoded)

    def lookup(self, ids: Iterable[str], count: int) -> np.ndarray | None:
        """int64 ``(count,)`` indices of the ``count`` ids (0 where unknown), or None when the ids cannot go
        through the index (not all strings, a NUL inside one, not UTF-8 encodable, not ``count`` of them):
        the caller's checked path then names the problem."""
        if self._handle is None:
            raise KernelError("this IdIndex is closed")
        try:
            buf = "\0".join(ids).encode("utf-8")
        except (TypeError, UnicodeEncodeError):
            return None
        out = np.empty(count, np.int64)
        n = _I64(0)
        status = self._lib.dpr_id_index_lookup(self._handle, buf, len(buf), out.ctypes.data, count, ctypes.byref(n))
        if n.value != count:
            return None                                   # a NUL inside an id split it, or a miscount
        if status != 0:
            raise KernelError(f"id index lookup failed: {self._lib.dpr_id_index_status_string(status).decode()}")
        return out

    def lookup_wire_rows(self, buf: bytes, widths: np.ndarray) -> WireRows | None:
        """A padded history tensor in Triton's BYTES wire form (each element's length as 4 little-endian bytes,
        then its bytes), row r holding ``widths[r]`` elements, mapped and compacted (:class:`WireRows`): its ids'
        values 1..N in order and each row's count, or the first problem (an unknown id, padding between two ids of
        a row, or a buffer the widths do not describe). None when the library predates it."""
        if self._handle is None:
            raise KernelError("this IdIndex is closed")
        if not hasattr(self._lib, "dpr_id_index_lookup_wire_rows"):
            return None
        widths = np.ascontiguousarray(widths, np.int64)
        cap = len(buf) // 5                          # a non-empty element takes 5 bytes or more
        out = np.empty(cap, np.int64)
        lens = np.empty(len(widths), np.int64)
        n, bad = _I64(0), _I64(-1)
        status = self._lib.dpr_id_index_lookup_wire_rows(self._handle, buf, len(buf), widths.ctypes.data, len(widths),
                                                         out.ctypes.data, cap, lens.ctypes.data, ctypes.byref(n),
                                                         ctypes.byref(bad))
        if status == 0:
            return WireRows(out[:n.value], lens, None, -1)
        problem = _WIRE_PROBLEMS.get(status)
        if problem is None:
            raise KernelError(f"id index lookup failed: {self._lib.dpr_id_index_status_string(status).decode()}")
        return WireRows(None, None, problem, bad.value)

    def lookup_many(self, rows: Sequence[Sequence[str]]) -> np.ndarray | None:
        """The ids of several rows, concatenated (see :meth:`lookup`)."""
        return self.lookup(chain.from_iterable(rows), sum(len(r) for r in rows))

    def close(self) -> None:
        if self._handle is not None:
            self._lib.dpr_id_index_free(self._handle)
            self._handle = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
