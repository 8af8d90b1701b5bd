"""KServe v2 JSON tensors as the service decodes them (serve/v2.py ``decode_infer_request``): nested ``data`` is
flattened row-major at any depth (the [batch, n] fast path and the general walk agree), BYTES data must be
strings, and a wrong element count is refused naming the input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dpr.errors import InputError
from dpr.serve.v2 import decode_infer_request


def body(data, shape, datatype="BYTES", name="history"):
    return json.dumps({"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]}).encode()


@pytest.mark.parametrize("shape", [(3,), (2, 3), (1, 1), (2, 2, 2), (3, 1, 2), (2, 3, 1, 2)])
def test_nested_data_is_read_row_major_at_any_depth(shape):
    flat = [f"i{j}" for j in range(int(np.prod(shape)))]
    nested = np.array(flat, dtype=object).reshape(shape).tolist()
    for data in (nested, flat):
        got = decode_infer_request(body(data, list(shape))).inputs["history"]
        assert got.shape == shape and got.reshape(-1).tolist() == flat


def test_numbers_nested_and_flat():
    got = decode_infer_request(body([[1, 2], [3, 4]], [2, 2], "INT32", "k")).inputs["k"]
    assert got.dtype == np.int32 and got.tolist() == [[1, 2], [3, 4]]


@pytest.mark.parametrize("data,why", [
    ([["a", 1], ["b", "c"]], "must be strings"),
    ([["a", "b"], ["c"]], "needs 4 elements"),
    ([["a", None], ["c", "d"]], "must be strings"),
])
def test_bad_bytes_data_is_refused_naming_the_input(data, why):
    with pytest.raises(InputError, match=why):
        decode_infer_request(body(data, [2, 2]))


def binary_body(tensors: dict) -> tuple[bytes, str]:
    """A request in Triton's binary tensor extension (what tritonclient.http sends): a JSON header naming each
    input's binary_data_size, then the inputs' raw bytes (BYTES in their wire form); and the header's length."""
    heads, blobs = [], []
    for name, (dt, arr) in tensors.items():
        if dt == "BYTES":
            blob = b"".join(len(x).to_bytes(4, "little") + x for x in arr.reshape(-1).tolist())
        else:
            blob = arr.tobytes()
        heads.append({"name": name, "shape": list(arr.shape), "datatype": dt,
                      "parameters": {"binary_data_size": len(blob)}})
        blobs.append(blob)
    head = json.dumps({"inputs": heads}).encode()
    return head + b"".join(blobs), str(len(head))


@pytest.mark.parametrize("rows,width", [(1, 1), (3, 7), (512, 200)])
def test_binary_bytes_inputs_read_as_the_elements_sent(rows, width):
    """Binary BYTES inputs (the native splitter for large ones, the Python loop for small ones) come back as the
    elements sent, empty padding, non-ASCII and a NUL inside an element included, in shape; numbers alongside."""
    rng = np.random.default_rng(rows)
    pool = [b"", b"", b"i1", "é漢".encode(), b"a\0b", b"x" * 300]
    hist = np.empty((rows, width), dtype=object)
    hist.reshape(-1)[:] = [pool[i] for i in rng.integers(0, len(pool), rows * width)]
    k = rng.integers(1, 20, (rows, 1)).astype(np.int32)
    data, hl = binary_body({"history": ("BYTES", hist), "k": ("INT32", k)})
    got = decode_infer_request(data, hl).inputs
    assert got["history"].shape == (rows, width) and got["history"].tolist() == hist.tolist()
    assert got["k"].dtype == np.int32 and got["k"].tolist() == k.tolist()


@pytest.mark.parametrize("cut", [1, 3, 5])
def test_truncated_binary_bytes_are_refused_naming_the_input(cut):
    hist = np.array([[b"i1", b"i2"], [b"i3", b"x" * 2000]], dtype=object)
    data, hl = binary_body({"history": ("BYTES", hist)})
    head = json.loads(data[:int(hl)])
    head["inputs"][0]["parameters"]["binary_data_size"] -= cut       # the last element runs past the input's bytes
    new_head = json.dumps(head).encode()
    with pytest.raises(InputError, match="input 'history': binary BYTES data is truncated"):
        decode_infer_request(new_head + data[int(hl):], str(len(new_head)))


def _dumped(model, req, tensors):
    """The specification of the answer's JSON: json.dumps of the whole answer as one dict (the binary outputs'
    bytes after it)."""
    from dpr.serve.bytes_wire import serialize_bytes
    from dpr.serve.v2 import V2_TYPE

    outs, blobs = [], []
    for n in (req.outputs if req.outputs is not None else list(tensors)):
        arr = tensors[n]
        dt = "BYTES" if arr.dtype == object else V2_TYPE[arr.dtype]
        o = {"name": n, "datatype": dt, "shape": list(arr.shape)}
        if "*" in req.binary or n in req.binary:
            blob = serialize_bytes(arr.reshape(-1).tolist()) if dt == "BYTES" else arr.tobytes()
            o["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            o["data"] = [x.decode() if isinstance(x, bytes) else x for x in arr.reshape(-1).tolist()]
        outs.append(o)
    resp = {"model_name": model, "model_version": "1", "outputs": outs}
    if req.id is not None:
        resp["id"] = req.id
    return json.dumps(resp).encode() + b"".join(blobs)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("rows,k", [(1, 1), (3, 7), (4, 6), (512, 10)])     # 24 scores: the native renderer's least
def test_the_answer_is_json_dumps_of_the_answer_byte_for_byte(rows, k, native, monkeypatch):
    """``encode_infer_response`` (FP32 data rendered natively where built, else by json.dumps; the rest spliced
    around it) writes exactly what json.dumps of the whole answer writes: ids with quotes, escapes and non-ASCII,
    NaN and infinities, an id, a subset of outputs, binary outputs beside JSON ones."""
    from dpr.kernels import json_render
    from dpr.serve.v2 import InferRequest, encode_infer_response

    if native and json_render.library() is None:
        pytest.skip("libdpr_id_index.so is not built (python -m dpr.kernels.build)")
    if not native:
        monkeypatch.setattr(json_render, "float_list_json", lambda arr: None)

    rng = np.random.default_rng(rows)
    pool = ["i1", 'q"uote', "back\\slash", "é漢🙂", "tab\there", "", "x" * 40]
    ids = np.empty((rows, k), dtype=object)
    ids.reshape(-1)[:] = [pool[i] for i in rng.integers(0, len(pool), rows * k)]
    scores = (rng.standard_normal((rows, k)) * 10).astype(np.float32)
    scores.reshape(-1)[:3] = [np.nan, np.inf, -np.inf][:rows * k]
    tensors = {"item_ids": ids, "scores": scores, "counts": rng.integers(0, k + 1, (rows, 1)).astype(np.int32)}
    forms = [InferRequest(None, {}), InferRequest("call-7 \"é\"", {}), InferRequest(None, {}, ["scores", "counts"]),
             InferRequest("x", {}, None, {"item_ids"}), InferRequest(None, {}, ["counts", "scores"], {"*"}),
             InferRequest(None, {}, [])]
    for form in forms:
        body, headers = encode_infer_response("dpr", form, tensors)
        assert body == _dumped("dpr", form, tensors), form
        assert (headers is None) == (not form.binary or form.outputs == [])
