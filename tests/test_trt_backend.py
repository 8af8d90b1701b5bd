"""The TensorRT backend's decision code, without TensorRT: the version check, the engine cache key, atomic
cache writes, and the choice of the user encoder graph (fused, or the portable gating when TensorRT cannot
parse or build the fused one) with a fake builder standing in for TensorRT.

TensorRT cannot be installed on the development machine (its PyPI packages need a GPU driver), so these
tests replace ``build`` by a fake; the real builds run in the ``tensorrt``-marked tests (test_kernels,
test_engine), which assert that the fused graph is the one in use.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from dpr.engine.backends import tensorrt_backend as tb
from dpr.engine.errors import BackendError
from dpr.kernels.op_spec import MIN_TENSORRT, TRT_NODE_ATTRS
from dpr.kernels.trt_version import parse_version, tensorrt_too_old

onnx = pytest.importorskip("onnx")


# ---- version ----------------------------------------------------------------------------------------

def test_minimum_tensorrt_is_10_9_and_named_in_the_error():
    assert MIN_TENSORRT == (10, 9)
    assert parse_version("10.9.0.34") == (10, 9, 0, 34) and parse_version("10.10.0.post1") == (10, 10, 0)
    for ok in ("10.9.0", "10.9.0.34", "10.10.0.31", "10.13.3", "11.0.0"):
        assert tensorrt_too_old(ok) is None, ok
        tb.check_tensorrt_version(ok)
    for old in ("10.6.0", "10.8.0.43", "8.6.1", "garbage"):
        with pytest.raises(BackendError, match=r"TensorRT >= 10\.9.*aot_impl"):
            tb.check_tensorrt_version(old)


def test_gpu_extra_pins_the_same_minimum():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    gpu = next(line for line in text.splitlines() if line.startswith("gpu ="))
    assert f'"tensorrt>={".".join(map(str, MIN_TENSORRT))}"' in gpu


# ---- engine cache -----------------------------------------------------------------------------------

BASE = dict(onnx_sha256="a" * 64, ptx_sha256="b" * 64, tensorrt_version="10.9.0.34",
            compute_capability=(9, 0), precision="fp32",
            profile={"item_seq": {"min": [1, 1], "opt": [64, 50], "max": [512, 50]}})


@pytest.mark.parametrize("field, other", [
    ("onnx_sha256", "c" * 64), ("ptx_sha256", "d" * 64), ("ptx_sha256", None),
    ("tensorrt_version", "10.10.0.31"), ("compute_capability", (8, 0)), ("precision", "fp16"),
    ("profile", {"item_seq": {"min": [1, 1], "opt": [64, 50], "max": [1024, 50]}}),
])
def test_cache_key_changes_with_each_input(field, other):
    key = tb.engine_cache_key(**BASE)
    assert key == tb.engine_cache_key(**dict(BASE))             # deterministic
    assert tb.engine_cache_key(**dict(BASE, **{field: other})) != key


def test_cache_key_ignores_dict_order():
    p = BASE["profile"]["item_seq"]
    reordered = {"item_seq": {"max": p["max"], "opt": p["opt"], "min": p["min"]}}
    assert tb.engine_cache_key(**dict(BASE, profile=reordered)) == tb.engine_cache_key(**BASE)


def test_atomic_write_replaces_whole_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "k.plan"
    tb.write_atomic(target, b"old plan")
    tb.write_atomic(target, b"new plan")
    assert target.read_bytes() == b"new plan"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.plan"]

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tb.os, "replace", fail)
    with pytest.raises(OSError):
        tb.write_atomic(target, b"x" * 1000)
    # the old plan is intact and no temporary file is left behind
    assert target.read_bytes() == b"new plan"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.plan"]
    monkeypatch.undo()

    with pytest.raises(TypeError):                 # a failure while writing: same guarantee
        tb.write_atomic(tmp_path / "other.plan", object())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.plan"]


# ---- which user graph -------------------------------------------------------------------------------

def _fused_model_bytes() -> bytes:
    """A one-node graph with the exporter's dpr::FusedMoEGate node (plugin attributes + local function)."""
    from dpr.kernels.trt_plugin import make_trt_onnx

    import tempfile

    with tempfile.TemporaryDirectory() as td:
        return make_trt_onnx(Path(td) / "g.onnx").read_bytes()


def _without_function(onnx_bytes: bytes) -> bytes:
    """The fused graph as exports made before the dpr::FusedMoEGate local function wrote it."""
    m = onnx.load_from_string(onnx_bytes)
    del m.functions[:]
    return m.SerializeToString()


def _export(tmp_path: Path, portable: bool, fused: bool = True, function: bool = True):
    graphs = {}
    if fused:
        data = _fused_model_bytes()
        (tmp_path / "user_encoder.onnx").write_bytes(data if function else _without_function(data))
        graphs["user_encoder"] = {"file": "user_encoder.onnx", "tensorrt_profile": {}}
    if portable:
        (tmp_path / "user_encoder_portable.onnx").write_bytes(b"portable graph bytes")
        graphs["user_encoder_portable"] = {"file": "user_encoder_portable.onnx", "tensorrt_profile": {}}

    def graph_file(name):
        g = graphs.get(name)
        return tmp_path / g["file"] if g else None

    return SimpleNamespace(path=tmp_path, graphs=graphs, graph_file=graph_file,
                           manifest={"graphs": graphs, "skipped": {} if fused else {"user_encoder": "moe=shared"}})


class FakeBuilder:
    """Stands in for TensorRT: records what it was asked to build; fails to parse the fused graph when told."""

    def __init__(self, fail_fused: bool = False, plugin_layers: int = 1):
        self.fail_fused, self.plugin_layers, self.sources = fail_fused, plugin_layers, []

    def __call__(self, source):
        self.sources.append(source)
        if source.plugin and self.fail_fused:
            raise BackendError("TensorRT cannot parse user_encoder.onnx: In node 7 (FusedMoEGate): "
                               "Plugin not found, are the plugin name, version, and namespace correct?")
        return SimpleNamespace(name=source.name, plugin_layers=self.plugin_layers if source.plugin else 0,
                               source=source)


def test_fused_graph_used_when_it_builds_with_the_plugin(tmp_path):
    b = FakeBuilder()
    graph, fused, reason = tb.choose_user_graph(_export(tmp_path, portable=True), b, None, None)
    assert fused is True and graph.source.plugin and "fused" in reason
    assert [s.name for s in b.sources] == ["user_encoder"]


@pytest.mark.parametrize("portable", [True, False], ids=["two-graph export", "single-graph export"])
def test_parse_failure_falls_back_to_the_fused_graph_inlined(tmp_path, portable, caplog):
    b = FakeBuilder(fail_fused=True)
    with caplog.at_level(logging.WARNING, logger="dpr.engine.tensorrt"):
        graph, fused, reason = tb.choose_user_graph(_export(tmp_path, portable=portable), b, None, None)
    assert fused is False
    assert [s.plugin for s in b.sources] == [True, False]          # tried the fused graph, then the portable
    assert "Plugin not found" in reason and "portable" in reason and "inlined" in reason
    assert any("Plugin not found" in r.getMessage() for r in caplog.records)
    # the same fused graph with the local function's body inlined, the portable file (if any) unused: standard
    # ops only, no function left, so any TensorRT parser imports it
    assert graph.name == "user_encoder" and graph.source.data != b"portable graph bytes"
    m = onnx.load_from_string(graph.source.data)
    assert not [n for n in m.graph.node if n.op_type == "FusedMoEGate" or n.domain not in ("", "ai.onnx")]
    assert not m.functions and {"TopK", "Softmax"} <= {n.op_type for n in m.graph.node}
    onnx.checker.check_model(m, full_check=True)
    assert not [a for n in m.graph.node for a in n.attribute if set(TRT_NODE_ATTRS) & {a.name}]


def test_export_without_the_local_function_falls_back_to_its_portable_graph(tmp_path):
    """An export made before the fused graph carried its local function: the fallback is its portable graph,
    and without one the error says what is missing."""
    b = FakeBuilder(fail_fused=True)
    graph, fused, reason = tb.choose_user_graph(_export(tmp_path, portable=True, function=False), b, None, None)
    assert fused is False and graph.name == "user_encoder_portable"
    assert graph.source.data == b"portable graph bytes" and "user_encoder_portable.onnx" in reason
    (tmp_path / "user_encoder_portable.onnx").unlink()
    with pytest.raises(BackendError, match="no portable user encoder.*re-export"):
        tb.choose_user_graph(_export(tmp_path, portable=False, function=False), FakeBuilder(fail_fused=True),
                             None, None)


def test_parse_failure_with_fused_required_is_an_error(tmp_path):
    with pytest.raises(BackendError, match="fused user encoder requested.*Plugin not found"):
        tb.choose_user_graph(_export(tmp_path, portable=True), FakeBuilder(fail_fused=True), True, None)


def test_local_function_imported_instead_of_the_plugin_is_not_called_fused(tmp_path):
    graph, fused, reason = tb.choose_user_graph(_export(tmp_path, portable=True), FakeBuilder(plugin_layers=0),
                                                None, None)
    assert fused is False and "local function" in reason


def test_plugin_registration_failure_and_fused_false(tmp_path):
    ex = _export(tmp_path, portable=True)
    b = FakeBuilder()
    _, fused, reason = tb.choose_user_graph(ex, b, None, "RuntimeError: TensorRT 10.8.0 is too old")
    assert fused is False and "too old" in reason and [s.plugin for s in b.sources] == [False]
    with pytest.raises(BackendError, match="too old"):
        tb.choose_user_graph(ex, FakeBuilder(), True, "RuntimeError: TensorRT 10.8.0 is too old")
    b = FakeBuilder()
    _, fused, reason = tb.choose_user_graph(ex, b, False, None)
    assert fused is False and "fused=False" in reason and [s.plugin for s in b.sources] == [False]


def test_export_without_a_fused_graph_uses_the_portable_one(tmp_path):
    b = FakeBuilder()
    graph, fused, reason = tb.choose_user_graph(_export(tmp_path, portable=True, fused=False), b, None, None)
    assert fused is False and "moe=shared" in reason and graph.name == "user_encoder_portable"


def test_backend_module_imports_without_tensorrt():
    # no GPU/TensorRT here: the backend reports itself unavailable instead of failing at import
    ok, why = tb.TensorRTBackend.availability("cuda")
    assert isinstance(ok, bool) and why
    assert tb.TensorRTBackend.availability("cpu") == (False, "TensorRT needs a CUDA device (device=cpu)")
