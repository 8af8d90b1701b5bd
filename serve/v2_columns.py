"""A large KServe v2 infer call, in Triton's binary tensor extension (the body ``tritonclient.http`` sends by
default) or in JSON tensors, read straight into one Part in catalogue indices, for the HTTP service's v2 route.

Why: the checked path (``v2.decode_infer_request``, then ``tensors.parts_from_tensors``) turns a 512-row call's
history (102,400 elements, 21,000 of them ids) into bytes objects, an object array, strings and a Part of id strings
that the engine maps again: about 7 ms per call on the event loop, holding the GIL, beside an 18 ms engine call
(2-core VM). Here the history goes from its wire bytes to catalogue indices and row counts in one native call
without the GIL (``IdIndex.lookup_wire_rows``, as in the native Triton backend), and only the small inputs become
Python objects. A JSON call is read in one native pass (:func:`read_json`: ``dpr.kernels.v2_json_parse``, no
json.loads), or in Python by :func:`read_json_python`, its specification, where the library is not built.

Semantics stay the checked path's: :func:`read` returns a Part only for a call that path would answer with the same
values: only the model's plain inputs (``history``, ``prompt``, ``negative_prompt``, ``k``, ``exclude_history``),
each sent as binary (or each as a JSON ``data`` list), in the shapes and datatypes ``parts_from_tensors`` takes; every history id in the catalogue
and no padding between two ids of a row; one ``k`` and ``exclude_history`` for all rows; every service limit kept
(``columns.one_k_part``). Anything else returns None and the route takes the checked path, which answers, or
refuses, exactly as before. Calls of any size are read here (a one-request call costs about half of the checked
path's time), but for JSON bodies under :data:`MIN_BYTES` where the native reader is not built (its Python
specification saves nothing on them).

:func:`read_call` and :func:`response` are the route's whole read and answer, shared by the route
(``http_app``) and the batching front (``http_front``), so the two give the same Parts and the same bytes.
"""

from __future__ import annotations

import json

import numpy as np

from dpr.errors import InputError

from .body_columns import MIN_BYTES
from .bytes_wire import deserialize_bytes
from .columns import Part, one_k_part
from .render import tables
from .tensors import DEFAULT_K, STACKABLE, padding_hole, parts_from_tensors, result_indices, tensors_from_results
from .v2 import NUMPY, InferRequest, _flatten, answer_form, decode_infer_request, encode_infer_response, split_request

__all__ = ["MIN_BYTES", "read", "read_call", "read_json", "read_json_python", "response"]

# answers with at least this many item ids get them rendered natively (as NATIVE_FLOATS_MIN, v2.py: below it the
# native call costs more than json.dumps saves)
NATIVE_IDS_MIN = 24


def read_call(body: bytes, header_length: str | None, engine, cfg, native: bool) -> tuple[list, InferRequest]:
    """A v2 infer call as ``[(Part, rows)]`` and its answer's form: read by :func:`read` when ``native`` and it
    takes the call, else by ``decode_infer_request`` and ``parts_from_tensors`` (ids left to the engine's check).
    Raises InputError (LimitError for a crossed limit) naming the problem."""
    fast = read(body, header_length, engine, cfg) if native else None
    if fast is not None:
        part, req = fast
        return [(part, range(len(part)))], req
    req = decode_infer_request(body, header_length)
    return parts_from_tensors(req.inputs, cfg, None), req


def response(model: str, engine, req: InferRequest, parts: list, results: list):
    """The route's answer (a Starlette ``Response``) to a call read as ``parts`` with these ResultBatches; raises
    InputError for an output the model does not return."""
    from starlette.responses import Response

    idx = result_indices(sum(len(rows) for _, rows in parts), parts, results)
    out = tensors_from_results(engine, len(idx), parts, results, as_bytes=False, indices=idx)
    content, headers = encode_infer_response(model, req, out, _rendered_ids(engine, req, idx))
    return Response(content, headers=headers, media_type=None if headers else "application/json")


def _rendered_ids(engine, req: InferRequest, idx: np.ndarray) -> dict | None:
    """``{"item_ids": the JSON text of its data list}`` rendered natively from the answer's catalogue indices ``idx``
    (the bytes json.dumps writes for the ids ``tensors_from_results`` gathers by them), for an answer of at least
    NATIVE_IDS_MIN ids sent as JSON; else None (json.dumps writes it)."""
    if idx.size < NATIVE_IDS_MIN or "*" in req.binary or "item_ids" in req.binary \
            or (req.outputs is not None and "item_ids" not in req.outputs):
        return None
    frags = tables(engine).json_ids()
    if frags is None:
        return None
    from dpr.kernels import json_render

    text = json_render.fragment_list_json(frags, idx)
    return None if text is None else {"item_ids": text.decode("ascii")}


def read(body: bytes, header_length: str | None, engine, cfg) -> tuple[Part, InferRequest] | None:
    """``body`` (with its ``Inference-Header-Content-Length``: binary tensors; without: JSON tensors) as one Part in
    catalogue indices of ``engine`` and the answer's form (:func:`v2.answer_form`: id, outputs, binary), or None:
    let the checked path read it."""
    # at any size: a one-request call costs 23 us (JSON, native; the Python reader only from MIN_BYTES, read_json) and
    # 26 us (binary) here, against 35 and 47 through the checked path (2-core VM)
    if header_length is None:
        return read_json(body, engine, cfg)
    try:
        req, rest = split_request(body, header_length)
    except InputError:
        return None
    pos, raw = 0, {}
    for inp in req["inputs"]:
        if not isinstance(inp, dict) or "data" in inp:
            return None
        name, shape, params = inp.get("name"), inp.get("shape"), inp.get("parameters")
        if name not in STACKABLE or name in raw or not isinstance(params, dict):
            return None
        size = params.get("binary_data_size")
        if type(size) is not int or size < 0 or pos + size > len(rest):
            return None
        if not isinstance(shape, list) or len(shape) != 2 or not all(type(d) is int and d >= 0 for d in shape):
            return None
        raw[name] = (inp.get("datatype"), shape, rest[pos:pos + size])
        pos += size
    if "history" not in raw:
        return None
    dt, (b, width), chunk = raw["history"]
    if dt != "BYTES" or b < 1 or any(shape != [b, 1] for n, (_, shape, _) in raw.items() if n != "history"):
        return None
    ix = tables(engine).id_index()          # the front's own (a reload may close the engine's under this call)
    hist = ix.lookup_wire_rows(bytes(chunk), np.full(b, width, np.int64)) if ix is not None else None
    if hist is None or hist.problem is not None:
        return None
    k, ex = _one_k(raw.get("k"), b), _one_exclude(raw.get("exclude_history"), b)
    prompts, negatives = _prompts(raw.get("prompt"), b), _prompts(raw.get("negative_prompt"), b)
    return _part_and_form(hist.flat, hist.lens, k, ex, prompts, negatives, req, engine, cfg)


def read_json(body: bytes, engine, cfg) -> tuple[Part, InferRequest] | None:
    """A call in JSON tensors (no binary part) as :func:`read` gives it, or None: read natively in one pass where the
    library is built (``dpr.kernels.v2_json_parse``: no json.loads, no Python object per element), else by
    :func:`read_json_python`, its specification. The two take the same calls (the native reader declines some more:
    unusual layouts, which the checked path then reads) and give the same Part."""
    ix = tables(engine).id_index()          # the front's own (a reload may close the engine's under this call)
    if ix is None:
        return None
    from dpr.kernels import v2_json_parse

    if v2_json_parse.library() is None:     # the Python reader saves nothing on a small body
        return read_json_python(body, engine, cfg) if len(body) >= MIN_BYTES else None
    got = v2_json_parse.parse(ix, body)     # None: declined, or an unknown id (the checked path names it)
    if got is None or "history" not in got.inputs:
        return None
    h = got.inputs["history"]
    if h.datatype != "BYTES" or len(h.shape) != 2 or len(h.values) != h.shape[0] * h.shape[1] or h.shape[0] < 1:
        return None
    b, width = h.shape
    if any(i.shape != [b, 1] or len(i.values) != b for n, i in got.inputs.items() if n != "history"):
        return None
    # k and exclude_history as the Python reader holds them ((datatype, shape, list of ints / bools)), so the same
    # checks decide; the prompts are UTF-8 bytes already (strictly valid: the reader declines a lone surrogate)
    cols = {n: (i.datatype, i.shape, i.values.tolist() if n in ("k", "exclude_history") else i.values)
            for n, i in got.inputs.items()}
    k, ex = _json_k(cols.get("k"), b), _json_exclude(cols.get("exclude_history"))
    prompts, negatives = _native_prompts(cols.get("prompt")), _native_prompts(cols.get("negative_prompt"))
    try:
        req = {key: json.loads(text) for key, text in got.spans.items()}
    except (ValueError, RecursionError):    # checked natively: json.loads reads it; kept as a guard
        return None
    return _plain_part(h.values, b, width, k, ex, prompts, negatives, req, engine, cfg)


def read_json_python(body: bytes, engine, cfg) -> tuple[Part, InferRequest] | None:
    """:func:`read_json` in Python, its specification and the fallback without the library. The JSON is parsed as
    the checked path parses it (``split_request``); what that path then does in Python per element (an object array
    of the history's strings, the padding mask, a Part of id strings the engine maps again: 4.4 ms of decoding and
    2.5 ms of ``parts_from_tensors`` for a 512-row call, beside 2.0 ms of ``json.loads``, 2-core VM) is one join and
    one native lookup of the whole history (``IdIndex.lookup``). Only plain calls: the model's stackable inputs,
    each once, as ``data`` lists (flat or one list per row) in the shapes the binary reader takes; anything else,
    or any value the checked path would refuse or read otherwise, returns None."""
    try:
        req, _ = split_request(body, None)
    except InputError:
        return None
    got = {}
    for inp in req["inputs"]:
        if not isinstance(inp, dict) or inp.get("parameters", {}) != {}:
            return None
        name, shape = inp.get("name"), inp.get("shape")
        if name not in STACKABLE or name in got or not isinstance(shape, list) or len(shape) != 2 \
                or not all(type(d) is int and d >= 0 for d in shape):
            return None
        data = _flatten(inp.get("data"))
        if not isinstance(data, list) or len(data) != shape[0] * shape[1]:
            return None
        got[name] = (inp.get("datatype"), shape, data)
    if "history" not in got:
        return None
    dt, (b, width), data = got["history"]
    if dt != "BYTES" or b < 1 or any(shape != [b, 1] for n, (_, shape, _) in got.items() if n != "history"):
        return None
    ix = tables(engine).id_index()
    if ix is None:
        return None
    vals = ix.lookup(data, len(data))       # None: an element that is not a str, or holds a NUL
    if vals is None or ix.lookup(["", ""], 2)[0] != 0:  # "" is padding, never an id (a catalogue holding it: declined;
        return None                                      # two of them: one alone joins to no token at all)
    if int(np.count_nonzero(vals == 0)) != data.count(""):
        return None                         # an unknown id: the checked path names it
    k, ex = _json_k(got.get("k"), b), _json_exclude(got.get("exclude_history"))
    prompts, negatives = _json_prompts(got.get("prompt")), _json_prompts(got.get("negative_prompt"))
    return _plain_part(vals, b, width, k, ex, prompts, negatives, req, engine, cfg)


def _plain_part(vals: np.ndarray, b: int, width: int, k, ex, prompts, negatives, req: dict, engine, cfg):
    """The Part of a plain call read in JSON tensors (history ``vals``: catalogue indices, 0 = padding, b x width)
    and its answer form, or None: a hole, a value the checked path refuses, a crossed limit, a malformed form."""
    if b == 1:                              # one request (most calls of one): its ids one run, without the 2-D steps
        at = np.flatnonzero(vals)
        if len(at) and at[-1] - at[0] + 1 != len(at):
            return None
        return _part_and_form(vals[at], np.array([len(at)], np.int64), k, ex, prompts, negatives, req, engine, cfg)
    keep = vals.reshape(b, width) > 0
    if padding_hole(keep) is not None:
        return None
    return _part_and_form(vals[vals > 0], keep.sum(axis=1), k, ex, prompts, negatives, req, engine, cfg)


def _part_and_form(flat: np.ndarray, lens: np.ndarray, k, ex, prompts, negatives, req: dict, engine, cfg):
    """A plain call's columns (``flat`` catalogue indices, ``lens`` per row; k, exclude_history and the prompts as
    the readers read them: None / False for a value the checked path would word) as one Part and the answer form
    of its header ``req``, or None."""
    if k is None or ex is None or prompts is False or negatives is False:
        return None
    part = one_k_part(flat, lens, k, ex, prompts, negatives, cfg, origin=engine)
    if part is None:
        return None
    try:
        return part, answer_form(req, {})
    except InputError:              # a malformed outputs list: the checked path words it
        return None


def _native_prompts(got) -> list | bool | None:
    """A prompt input the native reader read (its elements' UTF-8 bytes): the bytes, None when absent, False when
    not BYTES."""
    if got is None:
        return None
    return got[2] if got[0] == "BYTES" else False


def _json_k(got, b: int) -> int | None:
    """The k every row holds (JSON integers of an integer datatype, within its range), the default when absent, or
    None (rows differ, or the checked path would refuse or convert a value)."""
    if got is None:
        return DEFAULT_K
    dt, _, data = got
    t = NUMPY.get(dt) if isinstance(dt, str) else None
    if t is None or not np.issubdtype(t, np.integer) or not data or type(data[0]) is not int:
        return None
    k = data[0]
    if data.count(k) != b or set(map(type, data)) != {int}:          # count: 10 == 10.0 == True
        return None
    lo, hi = _int_range(t)
    return k if lo <= k <= hi else None


_INT_RANGES: dict = {}


def _int_range(t) -> tuple[int, int]:
    """An integer dtype's (min, max), kept (``np.iinfo`` builds an object per call)."""
    got = _INT_RANGES.get(t)
    if got is None:
        info = np.iinfo(t)
        got = _INT_RANGES[t] = (int(info.min), int(info.max))
    return got


def _json_exclude(got) -> bool | None:
    """The exclude_history every row holds (BOOL true/false), True when absent, or None."""
    if got is None:
        return True
    dt, _, data = got
    if dt != "BOOL" or not data or not all(x is data[0] for x in data) or type(data[0]) is not bool:
        return None
    return data[0]


def _json_prompts(got) -> list | bool | None:
    """A [b, 1] BYTES prompt input's elements as UTF-8 bytes (what ``one_k_part`` checks), None when absent, False
    when not strings (or a lone surrogate, which has no UTF-8 form)."""
    if got is None:
        return None
    dt, _, data = got
    if dt != "BYTES" or not all(type(x) is str for x in data):
        return False
    try:
        return [x.encode("utf-8") for x in data]
    except UnicodeEncodeError:
        return False


def _one_value(got, b: int, dtype: np.dtype):
    """The value every row of a [b, 1] input of ``dtype`` holds, or None: rows differ, or the size is not b."""
    _, _, chunk = got
    if len(chunk) != b * dtype.itemsize:
        return None
    vals = np.frombuffer(chunk, dtype)
    return vals[0] if (vals == vals[0]).all() else None


def _one_k(got, b: int) -> int | None:
    """The k of every row (any integer datatype, as the checked path takes), the default when absent, or None."""
    if got is None:
        return DEFAULT_K
    t = NUMPY.get(got[0]) if isinstance(got[0], str) else None
    if t is None or not np.issubdtype(t, np.integer):
        return None
    v = _one_value(got, b, np.dtype(t))
    return None if v is None else int(v)


def _one_exclude(got, b: int) -> bool | None:
    """The exclude_history of every row (BOOL), True when absent, or None."""
    if got is None:
        return True
    v = _one_value(got, b, np.dtype(np.bool_)) if got[0] == "BOOL" else None
    return None if v is None else bool(v)


def _prompts(got, b: int) -> list | bool | None:
    """A [b, 1] BYTES prompt input's elements (bytes), None when absent, False when not that."""
    if got is None:
        return None
    dt, _, chunk = got
    if dt != "BYTES":
        return False
    try:
        vals = deserialize_bytes(bytes(chunk))
    except ValueError:
        return False
    return vals.tolist() if len(vals) == b else False
