"""The Triton model's BYTES (de)serializers against the ones Triton's Python backend ships (the file nvidia-pytriton
installs in .venv-triton): the same bytes and objects on random tensors, odd shapes and empty elements included.
No server needed: both modules are plain Python."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from dpr.serve import bytes_wire as tm  # the BYTES codec the Triton bindings and the v2 route share

REPO = Path(__file__).resolve().parents[1]
UTILS = sorted(REPO.glob(".venv-triton/lib/python3*/site-packages/pytriton/tritonserver/backends/python/"
                         "triton_python_backend_utils.py"))
pytestmark = pytest.mark.skipif(not UTILS, reason="no .venv-triton with nvidia-pytriton (make triton-env)")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, UTILS[0])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ours(monkeypatch_module):
    """serve.triton_python imported with Triton's utils module standing in for the stub's (it patches that copy)."""
    monkeypatch_module.setitem(sys.modules, "triton_python_backend_utils", _load("triton_python_backend_utils"))
    monkeypatch_module.delitem(sys.modules, "dpr.serve.triton_python", raising=False)
    import dpr.serve.triton_python as tp

    yield tp
    sys.modules.pop("dpr.serve.triton_python", None)      # imported against a stand-in: not for other tests


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _random_bytes(rng, n):
    return [bytes(rng.integers(0, 256, size=int(rng.integers(0, 12)), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("shape", [(1, 10), (3, 7), (5,), (2, 1, 3), (1, 0), (0, 4)])
def test_serialize_matches_tritons_byte_for_byte(ours, shape):
    ref = _load("pristine_triton_utils")
    rng = np.random.default_rng(sum(shape) + len(shape))
    n = int(np.prod(shape))
    obj = np.empty(n, dtype=object)
    obj[:] = _random_bytes(rng, n)
    obj = obj.reshape(shape)
    assert ours._serialize_byte_tensor(obj) == ref.serialize_byte_tensor(obj)
    # str and other objects are encoded as Triton encodes them; fixed-width bytes_ lose trailing NULs alike
    mixed = np.empty(n, dtype=object)
    mixed[:] = [("é" * i if i % 3 == 0 else i if i % 3 == 1 else b"x\x00") for i in range(n)]
    mixed = mixed.reshape(shape)
    assert ours._serialize_byte_tensor(mixed) == ref.serialize_byte_tensor(mixed)
    fixed = np.array([b"ab\x00", b"c", b""] * (n // 3 + 1), dtype=np.bytes_)[:n].reshape(shape)
    assert ours._serialize_byte_tensor(fixed) == ref.serialize_byte_tensor(fixed)
    # a non-contiguous view serializes in C order of its elements
    if obj.ndim >= 2 and obj.shape[0] > 1 and obj.shape[1] > 1:
        view = obj.T
        assert ours._serialize_byte_tensor(view) == ref.serialize_byte_tensor(view)


def test_serialize_leaves_numeric_tensors_to_triton(ours):
    ref = _load("pristine_triton_utils")
    x = np.arange(6, dtype=np.float32)
    assert ours._serialize_byte_tensor(x) is None and ref.serialize_byte_tensor(x) is None


def test_deserialize_round_trips_and_matches_tritons(ours):
    ref = _load("pristine_triton_utils")
    rng = np.random.default_rng(7)
    obj = np.empty(33, dtype=object)
    obj[:] = _random_bytes(rng, 33)
    wire = ref.serialize_byte_tensor(obj)
    got, want = ours._deserialize_bytes_tensor(wire), ref.deserialize_bytes_tensor(wire)
    assert got.dtype == want.dtype == object and got.tolist() == want.tolist() == obj.tolist()


def test_the_stub_gets_the_fast_versions(ours):
    pb = sys.modules["triton_python_backend_utils"]
    assert pb.serialize_byte_tensor is ours._serialize_byte_tensor
    assert pb.deserialize_bytes_tensor is ours._deserialize_bytes_tensor


@pytest.mark.parametrize("n", [0, 1, 7, 1000])
def test_deserialize_native_and_python_splits_match_tritons(ours, n):
    """Both splitters (the native one the model uses when the kernels are built, and its Python loop) give
    Triton's objects, empty elements (padding) included."""
    ref = _load("pristine_triton_utils")
    rng = np.random.default_rng(n)
    obj = np.empty(n, dtype=object)
    obj[:] = [b"" if i % 5 == 0 else x for i, x in enumerate(_random_bytes(rng, n))]
    wire = ref.serialize_byte_tensor(obj) if n else b""
    want = ref.deserialize_bytes_tensor(wire).tolist()
    assert tm._split_python(wire) == want
    if tm._split_native is not None:
        got = tm._split_native(wire)
        assert got.dtype == object and got.shape == (n,) and got.tolist() == want
    assert ours._deserialize_bytes_tensor(wire).tolist() == want


@pytest.mark.parametrize("wire", [b"\x05\x00\x00\x00abc", b"\x01\x00", b"\x01\x00\x00\x00a\x03\x00\x00\x00xy"])
def test_deserialize_refuses_truncated_data(ours, wire):
    ref = _load("pristine_triton_utils")
    with pytest.raises(Exception):
        ref.deserialize_bytes_tensor(wire)             # Triton's loop: struct.error
    with pytest.raises(ValueError, match="truncated"):
        tm._split_python(wire)
    if tm._split_native is not None:
        with pytest.raises(ValueError, match="truncated"):
            tm._split_native(wire)


@pytest.mark.parametrize("n, shape", [(1, (1, 1)), (7, (3, 5)), (1000, (512, 10)), (300, (0, 4)), (50, (13,))])
def test_wire_table_gather_is_tritons_serialization_of_the_gathered_tensor(n, shape):
    """WireTable.gather (the native Triton backend's item_ids output): the wire form Triton's serialize_byte_tensor
    writes for ``elements[index]``, odd shapes, empty and NUL-holding elements included; the native gather and its
    numpy reference agree byte for byte, offsets included; an index outside the table is refused by element."""
    from dpr.kernels import bytes_tensor

    ref = _load("pristine_triton_utils")
    rng = np.random.default_rng(n)
    elements = [b""] + _random_bytes(rng, n - 1) + [b"a\0b"]
    table = bytes_tensor.WireTable(elements)
    index = rng.integers(0, len(elements), size=shape)
    obj = np.empty(shape, dtype=object)
    obj.reshape(-1)[:] = [elements[i] for i in index.reshape(-1)]
    want = bytes(ref.serialize_byte_tensor(obj)) if obj.size else b""
    got, offsets = table.gather(index)
    ref_got, ref_offsets = table.gather_reference(index)
    assert got == ref_got == want
    np.testing.assert_array_equal(offsets, ref_offsets)
    assert offsets[-1] == len(got) and len(offsets) == index.size + 1
    for e, i in enumerate(index.reshape(-1)[:50]):
        assert got[offsets[e]:offsets[e + 1]] == len(elements[i]).to_bytes(4, "little") + elements[i]
    bad = index.reshape(-1).copy()
    if bad.size:
        bad[bad.size // 2] = len(elements)
        for gather in (table.gather, table.gather_reference):
            with pytest.raises(IndexError, match=f"element {bad.size // 2}: index {len(elements)}"):
                gather(bad)
        bad[bad.size // 2] = -1
        with pytest.raises(IndexError, match="index -1 is outside"):
            table.gather(bad)
