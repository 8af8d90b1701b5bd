"""The model's KServe v2 tensors (Triton, and the HTTP service's ``/v2/models/dpr/infer``), to and from Parts.

Inputs (the first dimension is the batch: one row per recommendation request):

=================== ======== ========= ===========================================================
name                datatype dims      meaning
=================== ======== ========= ===========================================================
``history``         BYTES    [B, L]    item ids, oldest first; rows padded with empty strings
``prompt``          BYTES    [B, 1]    optional; an empty string is "no prompt"
``negative_prompt`` BYTES    [B, 1]    optional; same
``k``               INT32    [B, 1]    optional (default 10); any integer type is taken
``exclude_history`` BOOL     [B, 1]    optional (default true)
``include_tags``    BYTES    [B, T]    optional hard filter (any of), padded with empty strings
``exclude_tags``    BYTES    [B, T]    optional hard filter (none of)
``exclude_items``   BYTES    [B, T]    optional item ids never returned
=================== ======== ========= ===========================================================

Outputs: ``item_ids`` BYTES [B, k], ``scores`` FP32 [B, k], ``counts`` INT32 [B, 1]. A row with fewer than k
eligible items has ``counts`` < k and is padded with ``""`` ids and the float32 minimum as score (finite, so
the JSON form stays valid JSON).

Variable-length histories: **padding**, not Triton's ragged batching. Each request pads its own rows to its
longest history with empty strings (never an item id); the model strips them and builds the flat id column
plus offsets ``RequestBatch`` takes. Requests of different widths therefore batch together without Triton
concatenating their tensors (the Python backend and PyTriton hand the model a list of requests), the
padding never reaches the engine, and a client needs no ragged-batching configuration.
"""

from __future__ import annotations

import numpy as np

from dpr.errors import InputError

from .columns import IdCheck, LimitError, Part, check_limits, split_rows
from .render import tables

PAD_SCORE = float(np.finfo(np.float32).min)
DEFAULT_K = 10                  # an absent or omitted ``k`` input
INPUTS = {  # name: (datatype, dims without the batch dimension, optional)
    "history": ("BYTES", [-1], False),
    "prompt": ("BYTES", [1], True),
    "negative_prompt": ("BYTES", [1], True),
    "k": ("INT32", [1], True),
    "exclude_history": ("BOOL", [1], True),
    "include_tags": ("BYTES", [-1], True),
    "exclude_tags": ("BYTES", [-1], True),
    "exclude_items": ("BYTES", [-1], True),
}
OUTPUTS = {"item_ids": ("BYTES", [-1]), "scores": ("FP32", [-1]), "counts": ("INT32", [1])}
FILTERS = ("include_tags", "exclude_tags", "exclude_items")


def _text(x, what: str) -> str:
    if isinstance(x, (bytes, bytearray, np.bytes_)):
        try:
            return bytes(x).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{what} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if isinstance(x, str):
        return x
    raise InputError(f"{what} must be BYTES (strings), got {type(x).__name__}")


def padding_hole(keep: np.ndarray) -> tuple[int, int] | None:
    """(row, position) of the first empty string between two ids of a row, or None."""
    width = keep.shape[1]
    if width < 3:                              # a hole needs an id on each side
        return None
    # a row without a hole holds its ids in one run: from its first id to its last, as many as it has (three
    # reductions; the cumulative ORs that find the hole cost 3x more on a 512 x 200 call, and run only on a row
    # that has one)
    first = keep.argmax(axis=1)
    last = width - 1 - keep[:, ::-1].argmax(axis=1)
    ids = keep.sum(axis=1)
    holed = (ids > 0) & (last - first + 1 != ids)
    if not holed.any():
        return None
    r = int(holed.argmax())
    row = keep[r]
    hole = np.logical_or.accumulate(row) & np.logical_or.accumulate(row[::-1])[::-1] & ~row
    return r, int(hole.argmax())


def _rows_of_text(arr: np.ndarray, name: str, label=None) -> tuple[list, list[int]]:
    """A [B, L] BYTES tensor as (flat non-empty strings in row order, count per row). With ``label`` (an ordered
    input: the history), an empty string between two ids is refused: padding goes before or after a row's ids,
    and a hole in the middle is a missing id (dropping it would answer another history than the one meant)."""
    if arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2:
        raise InputError(f"input '{name}' must have shape [batch, n], got {list(arr.shape)}")
    empty = b"" if arr.size and isinstance(arr.flat[0], (bytes, np.bytes_)) else ""
    keep = arr != empty
    if label is not None and (at := padding_hole(keep)) is not None:
        raise InputError(f"{label(at[0])}: input '{name}' has an empty string at position {at[1]} between item ids "
                         f"(pad a row with empty strings after its ids, never between them)")
    flat = arr[keep].tolist()
    if flat and not isinstance(flat[0], str):
        lens = keep.sum(axis=1).tolist()
        try:                       # Triton's BYTES: one decode for all the ids (21,000 in a 512-row call)
            out = b"\0".join(flat).decode("utf-8").split("\0")
            if len(out) == len(flat):          # else a NUL inside an id: the loops below
                return out, lens
        except (TypeError, UnicodeDecodeError):
            pass
        try:                       # one C-level decode per id; the checked loop names a bad one
            return [x.decode("utf-8") for x in flat], lens
        except (AttributeError, UnicodeDecodeError):
            pass
    flat = [x if isinstance(x, str) else _text(x, f"input '{name}'") for x in flat]
    return flat, keep.sum(axis=1).tolist()


def _column(arr, name: str, b: int) -> list | None:
    """A [B, 1] BYTES tensor as B str-or-None (empty = None)."""
    if arr is None:
        return None
    arr = np.asarray(arr, dtype=object).reshape(-1)
    if len(arr) != b:
        raise InputError(f"input '{name}' has {len(arr)} rows; 'history' has {b}")
    out = [(_text(x, f"row {i}: input '{name}'") or None) for i, x in enumerate(arr.tolist())]
    return out if any(p is not None for p in out) else None


def _ints(arr, name: str, b: int, default) -> list:
    if arr is None:
        return [default] * b
    arr = np.asarray(arr).reshape(-1)
    if len(arr) != b:
        raise InputError(f"input '{name}' has {len(arr)} rows; 'history' has {b}")
    if default is True:
        if arr.dtype != np.bool_:
            raise InputError(f"input '{name}' must be BOOL, got {arr.dtype}")
        return arr.tolist()
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"input '{name}' must be an integer tensor (INT32), got {arr.dtype}")
    return arr.tolist()


def parts_from_tensors(t: dict, cfg, ids: IdCheck | None, label=lambda r: f"row {r}",
                       history: tuple | None = None) -> list[tuple[Part, list[int]]]:
    """One request's named numpy tensors as Parts (one per distinct (k, exclude_history)), each with the
    positions of its rows in the request. Raises InputError / LimitError naming the input and row. ``ids``:
    the item ids checked here (an IdCheck), or None: left to the engine (``columns.run_parts`` isolates a
    culprit in a merged batch). ``history``: the rows' histories mapped already, ``(int64 catalogue indices
    1..N, ids per row)`` (the native Triton backend's), in place of ``t["history"]``."""
    unknown = sorted(set(t) - set(INPUTS))
    if unknown:
        raise InputError(f"unknown input(s) {unknown}; this model takes {', '.join(INPUTS)}")
    form = "ids" if history is None else "indices"
    if history is not None:
        flat, lens = history
    elif t.get("history") is None:
        raise InputError("input 'history' is required (BYTES [batch, n]: item ids, rows padded with empty strings)")
    else:
        flat, lens = _rows_of_text(np.asarray(t["history"], dtype=object), "history", label)
    b = len(lens)
    if b == 0:
        raise InputError("input 'history' has no rows")
    prompts = _column(t.get("prompt"), "prompt", b)
    negatives = _column(t.get("negative_prompt"), "negative_prompt", b)
    ks = _ints(t.get("k"), "k", b, DEFAULT_K)
    excl = _ints(t.get("exclude_history"), "exclude_history", b, True)
    filters = None
    if any(t.get(f) is not None for f in FILTERS):
        filters = [dict() for _ in range(b)]
        for f in FILTERS:
            if t.get(f) is None:
                continue
            arr = np.asarray(t[f], dtype=object)
            if arr.reshape(len(arr), -1).shape[0] != b:
                raise InputError(f"input '{f}' has {arr.shape[0]} rows; 'history' has {b}")
            vals, n = _rows_of_text(arr.reshape(b, -1), f)
            start = 0
            for r, c in enumerate(n):
                if c:
                    filters[r][f] = vals[start:start + c]
                start += c
        filters = [d or None for d in filters]
    for r, k in enumerate(ks):
        if k < 1:
            raise InputError(f"{label(r)}: k must be >= 1, got {k}")
    out = []
    groups = split_rows(ks, excl)
    offsets = np.zeros(b + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    for (k, ex), rows in groups:
        if len(groups) == 1:
            pf, pl, pp, pn, pfl = flat, lens, prompts, negatives, filters
        else:
            if form == "indices":
                pf = np.concatenate([flat[offsets[r]:offsets[r + 1]] for r in rows])
            else:
                pf = [x for r in rows for x in flat[offsets[r]:offsets[r + 1]]]
            pl = [lens[r] for r in rows]
            pp = None if prompts is None else [prompts[r] for r in rows]
            pn = None if negatives is None else [negatives[r] for r in rows]
            pfl = None if filters is None else [filters[r] for r in rows]
        rl = (lambda r, rows=rows: label(rows[r]))
        check_limits(pl, pp, pn, int(k), cfg, rl)
        if ids is not None and form == "ids":
            ids.check(pf, pl, rl)
        out.append((Part(pf, pl, pp, pn, int(k), bool(ex), pfl, form), rows))
    if b > cfg.max_requests_per_call:
        raise LimitError(f"{b} rows in one call; the limit is {cfg.max_requests_per_call} (--max-requests-per-call)", 413)
    return out


STACKABLE = frozenset(("history", "prompt", "negative_prompt", "k", "exclude_history"))
# what a stacked request that omits an optional input gets in its rows (the defaults parts_from_tensors applies)
_DEFAULTS = {"prompt": lambda b: np.full((b, 1), b"", dtype=object),
             "negative_prompt": lambda b: np.full((b, 1), b"", dtype=object),
             "k": lambda b: np.full((b, 1), DEFAULT_K, dtype=np.int64),
             "exclude_history": lambda b: np.ones((b, 1), dtype=np.bool_)}


def _stackable_column(x, name: str, b: int) -> bool:
    """An optional [b, 1] input of the dtype parts_from_tensors takes without refusing it."""
    if not isinstance(x, np.ndarray) or x.shape != (b, 1):
        return False
    if name == "k":
        return np.issubdtype(x.dtype, np.integer)
    if name == "exclude_history":
        return x.dtype == np.bool_
    return x.dtype == object and isinstance(x[0, 0], bytes)          # prompt, negative_prompt


def stack_requests(tensors: list[dict]) -> tuple[dict, list[tuple[int, int]]] | None:
    """Several requests' tensors as one batch: histories padded to the widest with ``b""`` and stacked, the
    other inputs concatenated (an input some requests omit gets its default there), with each request's
    ``(start, stop)`` rows. For the Triton model's common case (the dynamic batcher hands it many one-row
    requests): one :func:`parts_from_tensors` and one :func:`tensors_from_results` for the whole list instead of
    one each per request (~0.3 ms of Python per single-request call on the 2-core VM). None when the requests
    are not all plain (a filter input, an unexpected shape or dtype): the caller takes them one by one, which is
    also what it does when the stacked batch is refused, so every error still names its own request's row."""
    if len(tensors) < 2:
        return None
    spans, start, width = [], 0, 0
    for t in tensors:
        h = t.get("history")
        if not t.keys() <= STACKABLE or not isinstance(h, np.ndarray) or h.ndim != 2 or h.dtype != object \
                or h.shape[0] == 0 or (h.size and not isinstance(h.flat[0], bytes)):
            return None
        b = h.shape[0]
        if not all(_stackable_column(t[name], name, b) for name in _DEFAULTS if name in t):
            return None
        spans.append((start, start + b))
        start += b
        width = max(width, h.shape[1])
    hist = np.full((start, width), b"", dtype=object)
    for t, (a, z) in zip(tensors, spans):
        h = t["history"]
        hist[a:z, :h.shape[1]] = h       # padding after a row's ids: holes and ids stay where they were
    out = {"history": hist}
    for name, default in _DEFAULTS.items():
        if any(name in t for t in tensors):
            out[name] = np.concatenate([t[name] if name in t else default(z - a) for t, (a, z) in zip(tensors, spans)])
    return out, spans


def split_outputs(out: dict, spans: list[tuple[int, int]], parts: list) -> list[dict]:
    """:func:`tensors_from_results` of a stacked batch (its ``parts``: ``(Part, rows)`` as parts_from_tensors
    returned them) cut back into each request's tensors: its rows, and as many columns as its own largest k
    (what the request alone would have got)."""
    ks = np.zeros(len(out["counts"]), np.int64)
    for part, rows in parts:
        ks[rows] = part.k
    res = []
    for a, z in spans:
        kw = int(ks[a:z].max())
        res.append({"item_ids": out["item_ids"][a:z, :kw], "scores": out["scores"][a:z, :kw], "counts": out["counts"][a:z]})
    return res


def result_indices(b: int, parts: list, results: list) -> np.ndarray:
    """The (b, kmax) catalogue indices of the Parts' ResultBatches, rows put back in request order (0, the padding
    index, past a row's own k and count): what ``item_ids`` holds the ids of."""
    idx = np.zeros((b, max(p.k for p, _ in parts)), np.int64)
    for (part, rows), res in zip(parts, results):
        idx[np.asarray(rows), :res.indices.shape[1]] = res.indices
    return idx


def tensors_from_results(engine, b: int, parts: list, results: list, as_bytes: bool = True,
                         indices: np.ndarray | None = None) -> dict:
    """The output tensors of one request from its Parts' ResultBatches (rows put back in request order);
    ``indices``: their :func:`result_indices`, when the caller has them already."""
    idx = result_indices(b, parts, results) if indices is None else indices
    t = tables(engine)
    ids = (t.ids_bytes if as_bytes else t.ids_str)[idx]          # index 0: the padding's empty string
    scores = np.full(idx.shape, PAD_SCORE, dtype=np.float32)
    counts = np.zeros((b, 1), dtype=np.int32)
    for (part, rows), res in zip(parts, results):
        rows = np.asarray(rows)
        counts[rows, 0] = res.counts
        scores[rows, :res.indices.shape[1]] = np.where(np.isfinite(res.scores), res.scores, PAD_SCORE)
    return {"item_ids": ids, "scores": scores, "counts": counts}
