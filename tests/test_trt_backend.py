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


def _export(tmp_path: Path, portable: bool, fused: bool = True):
    graphs = {}
    if fused:
        (tmp_path / "user_encoder.onnx").write_bytes(_fused_model_bytes())
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
def test_parse_failure_falls_back_to_the_portable_gating(tmp_path, portable, caplog):
    b = FakeBuilder(fail_fused=True)
    with caplog.at_level(logging.WARNING, logger="dpr.engine.tensorrt"):
        graph, fused, reason = tb.choose_user_graph(_export(tmp_path, portable=portable), b, None, None)
    assert fused is False
    assert [s.plugin for s in b.sources] == [True, False]          # tried the fused graph, then the portable
    assert "Plugin not found" in reason and "portable" in reason
    assert any("Plugin not found" in r.getMessage() for r in caplog.records)
    if portable:
        assert graph.source.data == b"portable graph bytes"
    else:
        # the fused graph without the plugin attributes: TensorRT's parser imports the local function body
        m = onnx.load_from_string(graph.source.data)
        node = next(n for n in m.graph.node if n.op_type == "FusedMoEGate")
        assert not {a.name for a in node.attribute} & set(TRT_NODE_ATTRS)
        assert [(f.domain, f.name) for f in m.functions] == [("dpr", "FusedMoEGate")]
        onnx.checker.check_model(m, full_check=True)


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
