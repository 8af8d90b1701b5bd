"""KServe v2 (Open Inference Protocol) inference bodies: JSON tensors and Triton's binary tensor extension
(what ``tritonclient.http`` sends by default), decoded to numpy and encoded back."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from dpr.errors import InputError

from .bytes_wire import deserialize_bytes, serialize_bytes

NUMPY = {"BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
         "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
         "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
V2_TYPE = {np.dtype(v): k for k, v in NUMPY.items()}


@dataclass
class InferRequest:
    id: str | None
    inputs: dict                         # name -> numpy array (BYTES: object array of bytes or str)
    outputs: list | None = None          # requested output names (None: all)
    binary: set = field(default_factory=set)   # outputs to send as binary


def _shape(inp: dict, name: str) -> list[int]:
    shape = inp.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InputError(f"input '{name}': shape must be a list of non-negative integers, got {shape!r}")
    return shape


def _params(obj: dict, where: str) -> dict:
    """An object's optional ``parameters``: a JSON object or absent (a list or a string there is a 422, not a
    500 from ``.get`` on it)."""
    p = obj.get("parameters")
    if p is None:
        return {}
    if not isinstance(p, dict):
        raise InputError(f"{where}: 'parameters' must be a JSON object, got {type(p).__name__}")
    return p


_STR = {str}


def _flatten(data):
    if isinstance(data, list) and data and isinstance(data[0], list):
        if all(type(r) is list for r in data):
            # a [batch, n] tensor (the usual shape: a 512-row call's history holds 102,400 elements) in one
            # C-level pass; deeper nesting is left to the general walk below
            out = list(chain.from_iterable(data))
            if list not in set(map(type, out)):
                return out
        out = []
        stack = [data]
        while stack:     # depth-first, row-major
            x = stack.pop()
            if isinstance(x, list):
                stack.extend(reversed(x))
            else:
                out.append(x)
        return out
    return data


def _bytes_elements(buf: memoryview, name: str) -> np.ndarray:
    """A binary BYTES input's elements, by the native splitter where it is built (``bytes_wire``: a 512-row
    history of 102,400 elements took 30 ms in a loop of ``struct`` calls, 2.9 ms split natively, on the 2-core VM)."""
    try:
        return deserialize_bytes(bytes(buf))
    except ValueError:
        raise InputError(f"input '{name}': binary BYTES data is truncated") from None


def split_request(body: bytes, header_len: str | None = None) -> tuple[dict, memoryview]:
    """A v2 inference body as (its JSON header, parsed; the binary tensor data after it). Raises InputError naming
    what is wrong with the header length or the JSON."""
    if header_len is not None:
        try:
            hl = int(header_len)
        except ValueError:
            raise InputError(f"Inference-Header-Content-Length must be an integer, got {header_len!r}") from None
        if not 0 < hl <= len(body):
            raise InputError(f"Inference-Header-Content-Length {hl} is outside the body ({len(body)} bytes)")
        head, rest = body[:hl], memoryview(body)[hl:]
    else:
        head, rest = body, memoryview(b"")
    try:
        req = json.loads(head)
    except (ValueError, RecursionError) as exc:     # RecursionError: nesting deeper than json can read
        raise InputError(f"the request body is not valid JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list):
        raise InputError('the request must be a JSON object with an "inputs" list (KServe v2 inference request)')
    return req, rest


def decode_infer_request(body: bytes, header_len: str | None = None) -> InferRequest:
    req, rest = split_request(body, header_len)
    inputs, pos = {}, 0
    for inp in req["inputs"]:
        if not isinstance(inp, dict) or not isinstance(inp.get("name"), str):
            raise InputError("each input must be an object with a 'name'")
        name = inp["name"]
        if name in inputs:
            raise InputError(f"input '{name}' is given twice")
        shape = _shape(inp, name)
        dt = inp.get("datatype")
        if not isinstance(dt, str) or (dt != "BYTES" and dt not in NUMPY):     # a list would be unhashable
            raise InputError(f"input '{name}': unknown datatype {dt!r}")
        count = math.prod(shape)                   # exact: np.prod wraps around past 2**63
        size = _params(inp, f"input '{name}'").get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or pos + size > len(rest):
                raise InputError(f"input '{name}': binary_data_size {size!r} runs past the body")
            chunk = rest[pos:pos + size]
            pos += size
            if dt == "BYTES":
                arr = _bytes_elements(chunk, name)
            else:
                item = np.dtype(NUMPY[dt]).itemsize
                if size != count * item:
                    raise InputError(f"input '{name}': {size} bytes of {dt} do not hold shape {shape}")
                arr = np.frombuffer(chunk, dtype=NUMPY[dt]).copy()
        else:
            data = _flatten(inp.get("data"))
            if not isinstance(data, list):
                raise InputError(f"input '{name}': 'data' must be a list (or binary_data_size given)")
            if dt == "BYTES":
                if data and not set(map(type, data)) <= _STR and not all(isinstance(x, str) for x in data):
                    raise InputError(f"input '{name}': BYTES data must be strings")
                arr = np.empty(len(data), dtype=object)
                arr[:] = data
            else:
                want = (bool,) if dt == "BOOL" else (int,) if dt.startswith(("INT", "UINT")) else (int, float)
                if not all(isinstance(x, want) and (dt == "BOOL" or not isinstance(x, bool)) for x in data):
                    raise InputError(f"input '{name}': {dt} data must be {'true/false' if dt == 'BOOL' else 'numbers'}")
                try:
                    arr = np.asarray(data, dtype=NUMPY[dt])
                except OverflowError:
                    raise InputError(f"input '{name}': a value does not fit {dt}") from None
        if arr.size != count:
            raise InputError(f"input '{name}': shape {shape} needs {count} elements, got {arr.size}")
        inputs[name] = arr.reshape(shape)
    return answer_form(req, inputs)


def answer_form(req: dict, inputs: dict) -> InferRequest:
    """The request's parsed JSON header as an :class:`InferRequest` holding ``inputs``: its id, the outputs it asks
    for (None: all) and which of them go back as binary."""
    outputs, binary = None, set()
    if isinstance(req.get("outputs"), list):
        outputs = []
        for o in req["outputs"]:
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise InputError("each requested output must be an object with a 'name'")
            outputs.append(o["name"])
            if _params(o, f"output '{o['name']}'").get("binary_data"):
                binary.add(o["name"])
    if _params(req, "the request").get("binary_data_output"):
        binary = {"*"}
    rid = req.get("id")
    return InferRequest(rid if isinstance(rid, str) else None, inputs, outputs, binary)


# FP32 data lists at least this long are rendered natively: 512 x 10 scores took json.dumps 1.7 ms, the renderer a
# tenth of that; below it the call costs more than it saves (10 scores: 13.5 against 10.5 us per answer, 2-core VM)
NATIVE_FLOATS_MIN = 24


def encode_infer_response(model: str, req: InferRequest, tensors: dict,
                          rendered: dict | None = None) -> tuple[bytes, dict | None]:
    """The answer's body (JSON, then the binary outputs' bytes) and its headers (None: plain JSON). The JSON is
    ``json.dumps`` of ``{"model_name", "model_version", "outputs": [{"name", "datatype", "shape", "data" |
    "parameters"}, ...], "id"}``, byte for byte; a long FP32 ``data`` list is rendered natively where the library is
    built (``json_render.float_list_json``) and spliced in, and so is ``rendered[name]``: an output's ``data`` list
    as json.dumps writes it, rendered by the caller (``v2_columns.response``: the item ids), used when that output
    goes as JSON."""
    names = req.outputs if req.outputs is not None else list(tensors)
    unknown = [n for n in names if n not in tensors]
    if unknown:
        raise InputError(f"unknown output(s) {unknown}; this model returns {', '.join(tensors)}")
    outs, blobs, spliced = [], [], {}
    for n in names:
        arr = tensors[n]
        dt = "BYTES" if arr.dtype == object else V2_TYPE[arr.dtype]
        o = {"name": n, "datatype": dt, "shape": list(arr.shape)}
        if "*" in req.binary or n in req.binary:
            if dt == "BYTES":
                blob = serialize_bytes(arr.reshape(-1).tolist())
            else:
                blob = np.ascontiguousarray(arr).tobytes()
            o["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif dt == "FP32" and arr.size >= NATIVE_FLOATS_MIN and (text := _float_data(arr)) is not None:
            spliced[len(outs)] = text           # json.dumps' text of the list: "data" is written around it below
        elif rendered and n in rendered:
            spliced[len(outs)] = rendered[n]
        else:
            flat = arr.reshape(-1).tolist()
            if dt == "BYTES" and bytes in set(map(type, flat)):
                flat = [x.decode("utf-8") if isinstance(x, bytes) else x for x in flat]
            o["data"] = flat
        outs.append(o)
    resp = {"model_name": model, "model_version": "1", "outputs": outs}
    if req.id is not None:
        resp["id"] = req.id
    if not spliced:
        head = json.dumps(resp).encode()
    else:                                       # json.dumps(resp), each spliced output's "data" last, as it would be
        texts = [json.dumps(o) if i not in spliced else json.dumps(o)[:-1] + ', "data": ' + spliced[i] + "}"
                 for i, o in enumerate(outs)]
        head = json.dumps({"model_name": model, "model_version": "1"})[:-1] + ', "outputs": [' + ", ".join(texts) + "]"
        if req.id is not None:
            head += ', "id": ' + json.dumps(req.id)
        head = (head + "}").encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), {"Inference-Header-Content-Length": str(len(head)),
                                    "Content-Type": "application/octet-stream"}


def _float_data(arr: np.ndarray) -> str | None:
    """An FP32 tensor's ``data`` list as json.dumps writes it, rendered natively; None without the library."""
    from dpr.kernels import json_render

    text = json_render.float_list_json(arr)
    return None if text is None else text.decode("ascii")
