"""A large KServe v2 infer call in Triton's binary tensor extension (the body ``tritonclient.http`` sends by
default) read straight into one Part in catalogue indices, for the HTTP service's v2 route.

Why: the checked path (``v2.decode_infer_request``, then ``tensors.parts_from_tensors``) turns a 512-row call's
history (102,400 elements, 21,000 of them ids) into bytes objects, an object array, strings and a Part of id strings
that the engine maps again: about 7 ms per call on the event loop, holding the GIL, beside an 18 ms engine call
(2-core VM). Here the history goes from its wire bytes to catalogue indices and row counts in one native call
without the GIL (``IdIndex.lookup_wire_rows``, as in the native Triton backend), and only the small inputs become
Python objects.

Semantics stay the checked path's: :func:`read` returns a Part only for a call that path would answer with the same
values: only the model's plain inputs (``history``, ``prompt``, ``negative_prompt``, ``k``, ``exclude_history``),
each sent as binary, in the shapes and datatypes ``parts_from_tensors`` takes; every history id in the catalogue
and no padding between two ids of a row; one ``k`` and ``exclude_history`` for all rows; every service limit kept
(``columns.one_k_part``). Anything else returns None and the route takes the checked path, which answers, or
refuses, exactly as before. Bodies under :data:`MIN_BYTES` stay on that path too (``body_columns`` measured why).

:func:`read_call` and :func:`response` are the route's whole read and answer, shared by the route
(``http_app``) and the batching front (``http_front``), so the two give the same Parts and the same bytes.
"""

from __future__ import annotations

import numpy as np

from dpr.errors import InputError

from .body_columns import MIN_BYTES
from .bytes_wire import deserialize_bytes
from .columns import Part, one_k_part
from .render import tables
from .tensors import DEFAULT_K, STACKABLE, parts_from_tensors, tensors_from_results
from .v2 import NUMPY, InferRequest, answer_form, decode_infer_request, encode_infer_response, split_request

__all__ = ["MIN_BYTES", "read", "read_call", "response"]


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

    out = tensors_from_results(engine, sum(len(rows) for _, rows in parts), parts, results, as_bytes=False)
    content, headers = encode_infer_response(model, req, out)
    return Response(content, headers=headers, media_type=None if headers else "application/json")


def read(body: bytes, header_length: str | None, engine, cfg) -> tuple[Part, InferRequest] | None:
    """``body`` (with its ``Inference-Header-Content-Length``) as one Part in catalogue indices of ``engine`` and
    the answer's form (:func:`v2.answer_form`: id, outputs, binary), or None: let the checked path read it."""
    if header_length is None or len(body) < MIN_BYTES:
        return None
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
    if k is None or ex is None or prompts is False or negatives is False:
        return None
    part = one_k_part(hist.flat, hist.lens, k, ex, prompts, negatives, cfg, origin=engine)
    if part is None:
        return None
    try:
        return part, answer_form(req, {})
    except InputError:              # a malformed outputs list: the checked path words it
        return None


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
