"""The native v2 JSON reader (kernels/v2_json_parse_cpu.cc, through ``dpr.serve.v2_columns.read_json``) against its
specification, the Python reader ``v2_columns.read_json_python`` (json.loads, then the plain case's checks). Random
plain calls (any key order with the name before the data, flat or nested data, escapes, non-ASCII prompts, extra
keys, ids, outputs, whitespace) must be taken by both with the same Part and answer form; byte-level mutations of
them must never be taken natively with other values than the Python reader reads; the documented declines (data
before the name, an escaped key, NaN, a third dimension, deep nesting, ...) are declined."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest

from dpr.kernels import v2_json_parse
from dpr.serve import v2_columns
from dpr.serve.config import ServeConfig

pytestmark = pytest.mark.skipif(v2_json_parse.library() is None,
                                reason="libdpr_id_index.so is not built (python -m dpr.kernels.build)")

CFG = ServeConfig(max_k=50, max_history=60, max_prompt_bytes=300, max_requests_per_call=300)
PROMPTS = ["", "something funny", "no horror tonight", "é 漢 🙂", "a\0b", 'quote " and \\ back', "tab\tnew\nline"]
EXTRA = [None, True, 1.5e-3, -0, [1, {"a": [None, "x"]}], {"nested": {"deep": [1, 2, 3]}}, "é"]


@pytest.fixture(scope="module")
def ids(engine):
    return list(engine.item_ids)


def _input(rng: random.Random, name: str, datatype: str, shape: list, flat: list, nested: bool) -> dict:
    data = [flat[r * shape[1]:(r + 1) * shape[1]] for r in range(shape[0])] if nested else flat
    fields = [("datatype", datatype), ("shape", shape)]
    if rng.random() < 0.2:
        fields.append(("x-extra", rng.choice(EXTRA)))
    rng.shuffle(fields)
    at = rng.randint(0, len(fields))                # the name anywhere before the data
    fields.insert(at, ("name", name))
    fields.insert(rng.randint(at + 1, len(fields)), ("data", data))
    return dict(fields)


def plain_body(rng: random.Random, ids: list, rows: int) -> bytes:
    hist = [[rng.choice(ids) for _ in range(rng.randint(1, 30))] for _ in range(rows)]
    width = max(map(len, hist)) + rng.randint(0, 3)
    flat = []
    for h in hist:
        pad = [""] * (width - len(h))
        flat += (pad + h) if rng.random() < 0.3 else (h + pad)
    nested = rng.random() < 0.5
    inputs = [_input(rng, "history", "BYTES", [rows, width], flat, nested)]
    if rng.random() < 0.7:
        inputs.append(_input(rng, "prompt", "BYTES", [rows, 1], [rng.choice(PROMPTS) for _ in range(rows)], nested))
    if rng.random() < 0.4:
        inputs.append(_input(rng, "negative_prompt", "BYTES", [rows, 1], [rng.choice(PROMPTS) for _ in range(rows)],
                             nested))
    if rng.random() < 0.7:
        inputs.append(_input(rng, "k", rng.choice(["INT32", "INT64", "UINT8", "INT16"]), [rows, 1],
                             [rng.randint(1, 40)] * rows, nested))
    if rng.random() < 0.4:
        inputs.append(_input(rng, "exclude_history", "BOOL", [rows, 1], [rng.random() < 0.5] * rows, nested))
    rng.shuffle(inputs)
    top = [("inputs", inputs)]
    if rng.random() < 0.5:
        top.append(("id", rng.choice(["req-1", "é\"x", 7])))
    if rng.random() < 0.4:
        top.append(("outputs", [{"name": n, **({"parameters": {"binary_data": True}} if rng.random() < 0.3 else {})}
                                for n in rng.sample(["item_ids", "scores", "counts"], rng.randint(1, 3))]))
    if rng.random() < 0.3:
        top.append(("parameters", {"binary_data_output": rng.random() < 0.5}))
    if rng.random() < 0.3:
        top.append(("x-trace", rng.choice(EXTRA)))
    rng.shuffle(top)
    text = json.dumps(dict(top), ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, None, 0, 2]),
                      separators=rng.choice([None, (",", ":"), (" ,  ", " :\t")]))
    if rng.random() < 0.5:                          # some ids written with an escape: "\u0069123" is "i123"
        text = re.sub(r'"i(\d+)"', lambda m: '"\\u0069' + m.group(1) + '"' if rng.random() < 0.3 else m.group(0), text)
    return text.encode()


def same(a, b) -> bool:
    """Two readers' answers (None, or (Part, InferRequest)) hold the same values."""
    if a is None or b is None:
        return a is None and b is None
    (pa, fa), (pb, fb) = a, b
    return (np.array_equal(pa.flat, pb.flat) and list(pa.lens) == list(pb.lens) and pa.prompts == pb.prompts
            and pa.negatives == pb.negatives and pa.k == pb.k and pa.exclude_history is pb.exclude_history
            and pa.form == pb.form and pa.origin is pb.origin
            and (fa.id, fa.outputs, fa.binary) == (fb.id, fb.outputs, fb.binary))


def test_random_plain_calls_are_read_as_the_python_reader_reads_them(engine, ids):
    rng = random.Random(0)
    for case in range(120):
        body = plain_body(rng, ids, rng.randint(1, 60))
        native, python = v2_columns.read_json(body, engine, CFG), v2_columns.read_json_python(body, engine, CFG)
        assert python is not None, body[:300]
        assert native is not None, body[:300]
        assert same(native, python), body[:300]


def test_byte_mutations_are_never_read_otherwise(engine, ids):
    """Flipped, dropped, doubled and inserted bytes: the native reader takes a mutant only as the Python reader does
    (either may decline what the other takes? no: the native reader never takes what the Python reader declines)."""
    rng = random.Random(1)
    alphabet = b'{}[]",:\\ 0123456789-+.eEtruefalsnul\x00\x1f\x7f\xc3\xa9\xed\xa0\x80\xff"'
    taken = 0
    for case in range(1500):
        body = bytearray(plain_body(rng, ids, rng.randint(1, 6)))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(body))
            op = rng.randrange(4)
            if op == 0:
                body[at] = rng.choice(alphabet)
            elif op == 1:
                del body[at]
            elif op == 2:
                body[at:at] = body[at:at + rng.randint(1, 8)]
            else:
                body[at:at] = bytes([rng.choice(alphabet)])
        body = bytes(body)
        native = v2_columns.read_json(body, engine, CFG)
        if native is None:
            continue
        taken += 1
        assert same(native, v2_columns.read_json_python(body, engine, CFG)), body
    assert taken > 100                              # mutants that stay plain (a space, a digit in k) are taken


@pytest.mark.parametrize("what,edit", [
    ("data before the name", lambda t: t.replace('{"name": "history", "datatype": "BYTES", "shape": [2, 2], "data"',
                                                 '{"data": [["i1", ""], ["i2", "i3"]], "datatype": "BYTES", '
                                                 '"shape": [2, 2], "name": "history", "x"', 1)),
    ("an escaped key", lambda t: t.replace('"inputs"', '"\\u0069nputs"', 1)),
    ("an escaped name", lambda t: t.replace('"history"', '"\\u0068istory"', 1)),
    ("NaN in an extra key", lambda t: t[:-1] + ', "x": NaN}'),
    ("Infinity in an extra key", lambda t: t[:-1] + ', "x": [1, -Infinity]}'),
    ("a third dimension", lambda t: t.replace('"shape": [2, 2]', '"shape": [2, 2, 1]', 1)),
    ("nesting 70 deep", lambda t: t[:-1] + ', "x": ' + "[" * 70 + "]" * 70 + "}"),
    ("a UTF-8 byte-order mark", lambda t: "\ufeff" + t),
    ("trailing bytes", lambda t: t + " x"),
    ("an input's parameters", lambda t: t.replace('"datatype": "BYTES"', '"parameters": {}, "datatype": "BYTES"', 1)),
    ("inputs twice", lambda t: t[:-1] + ', "inputs": []}'),
    ("id twice", lambda t: t[:-1] + ', "id": "a", "id": "b"}'),
    ("a number with a leading zero", lambda t: t[:-1] + ', "x": 01}'),
    ("a number ending in a point", lambda t: t[:-1] + ', "x": 1.}'),
    ("k as a float", lambda t: t.replace('"data": [[4], [4]]', '"data": [[4.0], [4]]', 1)),
    ("k of 19 digits", lambda t: t.replace('"data": [[4], [4]]', '"data": [[4], [1000000000000000000]]', 1)),
    ("rows and scalars mixed", lambda t: t.replace('[["i1", ""], ["i2", "i3"]]', '[["i1", ""], "i2", "i3"]', 1)),
    ("a lone surrogate in an id", lambda t: t.replace('"i1"', '"\\ud800"', 1)),
    ("a raw control character", lambda t: t.replace('"i1"', '"i\x011"', 1)),
    ("an unknown id", lambda t: t.replace('"i1"', '"no-such-id"', 1)),
    ("an unknown input", lambda t: t.replace('"exclude_history"', '"include_tags"', 1)),
])
def test_documented_declines(engine, what, edit):
    body = {"inputs": [{"name": "history", "datatype": "BYTES", "shape": [2, 2], "data": [["i1", ""], ["i2", "i3"]]},
                       {"name": "k", "datatype": "INT32", "shape": [2, 1], "data": [[4], [4]]},
                       {"name": "exclude_history", "datatype": "BOOL", "shape": [2, 1], "data": [[True], [True]]}]}
    text = json.dumps(body)
    assert v2_columns.read_json(text.encode(), engine, CFG) is not None      # the base is taken
    mutated = edit(text)
    assert mutated != text, what
    status, parsed, _ = v2_json_parse.parse_status(v2_columns.tables(engine).id_index(), mutated.encode())
    assert v2_columns.read_json(mutated.encode(), engine, CFG) is None, what
    assert parsed is None or what in ("a third dimension", "an unknown input", "k as a float"), (what, status)


def test_unusual_but_plain_layouts_agree(engine, ids):
    """Empty rows in nested data, a one-dimensional prompt shape, and a history of one column: both readers take
    the same ones (or both decline)."""
    bodies = [
        {"inputs": [{"name": "history", "datatype": "BYTES", "shape": [3, 2], "data": [["i1", "i2"], ["i3", ""],
                                                                                      ["", "i4"]]}]},
        {"inputs": [{"name": "history", "datatype": "BYTES", "shape": [2, 3], "data": [["i1", "i2", "i5"], []]}]},
        {"inputs": [{"name": "history", "datatype": "BYTES", "shape": [2, 1], "data": ["i1", "i2"]},
                    {"name": "prompt", "datatype": "BYTES", "shape": [2], "data": ["x", "y"]}]},
        {"inputs": [{"name": "history", "datatype": "BYTES", "shape": [1, 1], "data": [["i9"]]},
                    {"name": "k", "datatype": "UINT64", "shape": [1, 1], "data": [[3]]}], "id": None,
         "outputs": "not a list", "parameters": {"binary_data_output": 0}},
    ]
    for b in bodies:
        body = json.dumps(b).encode()
        assert same(v2_columns.read_json(body, engine, CFG), v2_columns.read_json_python(body, engine, CFG)), b
