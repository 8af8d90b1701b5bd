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
