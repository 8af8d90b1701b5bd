"""ctypes binding of the v2 route's JSON reader (``v2_json_parse_api.h``): a KServe v2 infer request in JSON
tensors, its plain case read in one call that drops the GIL, the history's ids mapped to catalogue indices.

Its specification is the Python reader it stands in for (``dpr.serve.v2_columns.read_json_python``: json.loads,
then the plain case's checks): ``dpr.serve.v2_columns.read_json`` builds the same Part from what :func:`parse`
returns, or declines where that reader declines. tests/test_v2_json_parse.py holds the two equal on fuzzed
bodies."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from dpr.kernels import capi, id_index

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
KernelError = capi.KernelError

OK, NULL_POINTER, DECLINED, UNKNOWN_ID, SHORT_BUFFER, OUT_OF_MEMORY = range(6)
SLOTS = ("history", "prompt", "negative_prompt", "k", "exclude_history")
DATATYPES = ("BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "FP16", "FP32", "FP64",
             "BYTES")
_FIELDS = 7
_INFO = len(SLOTS) * _FIELDS + 6


# Bodies below this many bytes are read through a PyDLL handle, keeping the GIL: a one-request call is read in about
# a microsecond, and a call that drops the GIL then queues behind the engine's threads to get it back (as the
# renderer, json_render.py); larger bodies drop it so the engine's threads run while they are read.
KEEP_GIL_BELOW = 16384


def _configure(lib: ctypes.CDLL) -> None:
    global _parse_keep_gil
    lib.dpr_v2_json_parse_status_string.restype = ctypes.c_char_p
    lib.dpr_v2_json_parse_status_string.argtypes = [ctypes.c_int]
    lib.dpr_v2_json_parse.restype = ctypes.c_int
    lib.dpr_v2_json_parse.argtypes = [_P, ctypes.c_char_p, _I64, _I64] + [_P] * 7
    _parse_keep_gil = ctypes.PyDLL(lib._name).dpr_v2_json_parse
    _parse_keep_gil.restype = ctypes.c_int
    _parse_keep_gil.argtypes = lib.dpr_v2_json_parse.argtypes


_parse_keep_gil = None       # set by _configure when the library is loaded


def library() -> ctypes.CDLL | None:
    """The library holding the reader (the ``ids_lib`` build target), or None when it is not built (or predates it)."""
    return id_index.library_with("dpr_v2_json_parse")


@dataclass
class Input:
    """One input as read: its datatype, shape (one or two dims) and elements: int64 catalogue indices (history; 0 for
    an empty string), UTF-8 bytes per element (prompts), int64 (k) or bool (exclude_history)."""
    datatype: str
    shape: list
    values: object


@dataclass
class Parsed:
    inputs: dict                 # name -> Input
    spans: dict                  # "id" / "outputs" / "parameters" -> the value's JSON text (bytes), when present


def parse_status(index: "id_index.IdIndex", body: bytes) -> tuple[int, Parsed | None, int]:
    """``(status, Parsed or None, where)``: see ``v2_json_parse_api.h``."""
    lib = id_index.require("dpr_v2_json_parse")
    handle = index._handle                                  # noqa: SLF001 - the index this library built
    if handle is None:
        raise KernelError("this IdIndex is closed")
    n = len(body)
    cap = n // 2 + 1
    # one int64 scratch for every int64 column (history, ints, str_offsets, info, where) and one byte scratch (bools,
    # str_bytes): a one-request call spent more in allocating seven arrays and their ctypes views than in the parse
    words = np.empty(3 * cap + 1 + _INFO + 1, np.int64)
    raw_bytes = np.empty(cap + max(n, 1), np.uint8)
    w0, b0 = words.ctypes.data, raw_bytes.ctypes.data
    o_ints, o_offs, o_info = cap, 2 * cap, 3 * cap + 1
    o_where = o_info + _INFO
    call = _parse_keep_gil if n < KEEP_GIL_BELOW and _parse_keep_gil is not None else lib.dpr_v2_json_parse
    status = call(handle, body, n, cap, w0, w0 + 8 * o_ints, b0, w0 + 8 * o_offs, b0 + cap, w0 + 8 * o_info,
                  w0 + 8 * o_where)
    where = int(words[o_where])
    if status in (NULL_POINTER, SHORT_BUFFER, OUT_OF_MEMORY):
        raise KernelError(f"v2 JSON reader failed: {lib.dpr_v2_json_parse_status_string(status).decode()}")
    if status != OK:
        return status, None, where
    info = words[o_info:o_info + _INFO].tolist()
    history, ints, str_offsets = words[:cap], words[o_ints:o_offs], words[o_offs:o_info]
    bools, str_bytes = raw_bytes[:cap], raw_bytes[cap:]
    inputs = {}
    used = max([int(str_offsets[info[s * _FIELDS + 6] + info[s * _FIELDS + 5]]) for s in (1, 2) if info[s * _FIELDS]],
               default=0)
    raw = str_bytes[:used].tobytes()                          # the prompts' bytes only, not the whole buffer
    for s, name in enumerate(SLOTS):
        present, dt, ndim, d0, d1, count, first = info[s * _FIELDS:(s + 1) * _FIELDS]
        if not present:
            continue
        if name == "history":
            values = history[first:first + count]
        elif name == "k":
            values = ints[first:first + count]
        elif name == "exclude_history":
            values = bools[first:first + count].astype(bool)
        else:
            offs = str_offsets[first:first + count + 1].tolist()
            values = [raw[a:b] for a, b in zip(offs, offs[1:])]
        inputs[name] = Input(DATATYPES[dt], [d0] if ndim == 1 else [d0, d1], values)
    spans = {}
    base = len(SLOTS) * _FIELDS
    for i, key in enumerate(("id", "outputs", "parameters")):
        a, b = info[base + 2 * i], info[base + 2 * i + 1]
        if a >= 0:
            spans[key] = body[a:b]
    return OK, Parsed(inputs, spans), where


def parse(index: "id_index.IdIndex", body: bytes) -> Parsed | None:
    """The body's plain case as read (:class:`Parsed`), or None: declined, or an unknown history id (the Python
    path names it)."""
    status, parsed, _ = parse_status(index, body)
    return parsed if status == OK else None
