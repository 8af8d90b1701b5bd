"""ctypes binding of the /recommend body parser (``recommend_parse_api.h``): a JSON body of one request or a list,
read into columns with its history ids mapped to catalogue indices, in one call that drops the GIL.

Its specification is the Python path it stands in for (``dpr.serve.lean.parse``, then each history id looked up
in the catalogue): :func:`parse` returns the same values or ``None`` (declined: that path decides).
tests/test_recommend_parse.py holds the two equal, fuzzed bodies included."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from dpr.kernels import capi, id_index

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
KernelError = capi.KernelError

OK, NULL_POINTER, DECLINED, UNKNOWN_ID, SHORT_BUFFER, OUT_OF_MEMORY = range(6)
# The shortest object the parser accepts is {"history":[]} (14 bytes) and the shortest id "" with its comma 3:
# capacities from the body's length always suffice.
_MIN_OBJECT_BYTES = 14
_MIN_ID_BYTES = 3


def _configure(lib: ctypes.CDLL) -> None:
    lib.dpr_recommend_parse_status_string.restype = ctypes.c_char_p
    lib.dpr_recommend_parse_status_string.argtypes = [ctypes.c_int]
    lib.dpr_recommend_parse.restype = ctypes.c_int
    lib.dpr_recommend_parse.argtypes = [_P, ctypes.c_char_p, _I64, _I64, _I64, _I64] + [_P] * 10


def library() -> ctypes.CDLL | None:
    """The library holding the parser (the ``ids_lib`` build target), or None when it is not built."""
    return id_index.library_with("dpr_recommend_parse")


@dataclass
class Parsed:
    """A body's rows as columns: row ``r``'s history is ``items[offsets[r]:offsets[r + 1]]`` (catalogue indices
    1..N), ``ks`` / ``exclude`` per row, ``prompts`` / ``negatives`` a str or None per row (None: no row has
    one), ``single``: the body was one object, not a list."""
    offsets: np.ndarray
    items: np.ndarray
    ks: np.ndarray
    exclude: np.ndarray
    prompts: list | None
    negatives: list | None
    texts: list                    # the body's distinct prompt strings (what ``prompts`` / ``negatives`` hold)
    text_bytes: np.ndarray         # each text's UTF-8 length
    single: bool

    def __len__(self) -> int:
        return len(self.ks)


def parse_status(index: "id_index.IdIndex", body: bytes) -> tuple[int, Parsed | None, int]:
    """``(status, Parsed or None, where)``: see ``recommend_parse_api.h`` (``where``: the byte offset of a decline,
    or the ordinal of the first unknown id)."""
    lib = id_index.require("dpr_recommend_parse")
    handle = index._handle                                  # noqa: SLF001 - the index this library built
    if handle is None:
        raise KernelError("this IdIndex is closed")
    n = len(body)
    max_rows = n // _MIN_OBJECT_BYTES + 1
    max_ids = n // _MIN_ID_BYTES + 1
    max_strings = 2 * max_rows
    offsets = np.empty(max_rows + 1, np.int64)
    items = np.empty(max_ids, np.int64)
    ks = np.empty(max_rows, np.int64)
    exclude = np.empty(max_rows, np.uint8)
    prompt = np.empty(max_rows, np.int32)
    negative = np.empty(max_rows, np.int32)
    str_offsets = np.empty(max_strings + 1, np.int64)
    str_bytes = ctypes.create_string_buffer(max(n, 1))
    counts = np.zeros(4, np.int64)
    where = _I64(0)
    status = lib.dpr_recommend_parse(handle, body, n, max_rows, max_ids, max_strings, offsets.ctypes.data,
                                     items.ctypes.data, ks.ctypes.data, exclude.ctypes.data, prompt.ctypes.data,
                                     negative.ctypes.data, str_offsets.ctypes.data, str_bytes, counts.ctypes.data,
                                     ctypes.byref(where))
    if status != OK:
        if status in (NULL_POINTER, OUT_OF_MEMORY):
            raise KernelError(f"recommend body parser: {lib.dpr_recommend_parse_status_string(status).decode()}")
        return status, None, where.value
    rows, n_ids, n_str, single = (int(c) for c in counts)
    so = str_offsets[:n_str + 1].tolist()
    raw = ctypes.string_at(str_bytes, so[-1])                 # the strings' bytes only, not the whole buffer
    texts = [raw[so[i]:so[i + 1]].decode("utf-8") for i in range(n_str)]
    prompt, negative = prompt[:rows], negative[:rows]
    table = np.array(texts + [None], dtype=object)          # index -1: the last entry, None
    parsed = Parsed(offsets[:rows + 1], items[:n_ids], ks[:rows], exclude[:rows].astype(bool),
                    table[prompt].tolist() if (prompt >= 0).any() else None,
                    table[negative].tolist() if (negative >= 0).any() else None,
                    texts, np.diff(np.asarray(so, np.int64)), bool(single))
    return OK, parsed, where.value


def parse(index: "id_index.IdIndex", body: bytes) -> Parsed | None:
    """The body's columns, or None when the parser declines it or a history id is not in the catalogue (the
    Python path then answers it, refusals worded as ever)."""
    return parse_status(index, body)[1]
