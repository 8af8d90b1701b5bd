"""TensorRT backend (GPU only; UNVERIFIED here: no GPU/TensorRT on the development machine).

Needs TensorRT >= 10.9 (``dpr.kernels.op_spec.MIN_TENSORRT``): the ``dpr::FusedMoEGate`` plugin is a
``tensorrt.plugin`` ahead-of-time plugin (``@trtp.aot_impl``), which first shipped in 10.9. An older
TensorRT is refused with an error naming the version.

Builds one engine per graph from the export's ONNX files with an optimisation profile over batch
1..max_batch (the manifest's ``tensorrt_profile`` per graph), FP16 when ``fp16=True``, and keeps one
execution context per thread (``threading.local``). Buffers are torch CUDA tensors.

The user encoder: the fused graph with the plugin registered when the export has one. When TensorRT cannot
parse or build it, the backend retries with the portable gating: the same fused graph with its
``dpr::FusedMoEGate`` model-local function inlined (standard ops only; exports made before the function
existed: their ``user_encoder_portable.onnx``), and says why in ``fused_reason`` (which the engine
appends to ``choice_reason``) and in the log. ``fused`` is True only when the built network really holds
the plugin layer: a parser that imports the local function instead leaves ``fused`` False.

Serialized engines are cached on disk (``DPR_TRT_CACHE``, default ``~/.cache/dpr/tensorrt``) under a key
over everything that changes the engine: the ONNX graph's sha256, the plugin PTX's sha256, the TensorRT
version, the GPU's compute capability, the precision and the optimisation profile. Writes are atomic
(temporary file + ``os.replace``), so a crash never leaves a truncated plan that a later run would load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from dpr.errors import require
from dpr.kernels.op_spec import OP_DOMAIN, OP_NAME
from dpr.kernels.trt_version import tensorrt_too_old

from ..errors import BackendError
from .base import Backend, cuda_available

log = logging.getLogger("dpr.engine.tensorrt")


# ---- version --------------------------------------------------------------------------------------

def check_tensorrt_version(version: str) -> None:
    """BackendError unless ``version`` >= op_spec.MIN_TENSORRT (the plugin's @trtp.aot_impl needs 10.9)."""
    too_old = tensorrt_too_old(version)
    if too_old:
        raise BackendError(too_old)


# ---- engine cache ---------------------------------------------------------------------------------

def engine_cache_key(onnx_sha256: str, ptx_sha256: str | None, tensorrt_version: str,
                     compute_capability: tuple[int, int], precision: str, profile: dict) -> str:
    """A key over everything that changes a built engine; any change gives a new key (a stale plan is never
    served after a kernel, graph, TensorRT, GPU, precision or profile change)."""
    parts = {"onnx": onnx_sha256, "ptx": ptx_sha256 or "none", "tensorrt": str(tensorrt_version),
             "sm": list(compute_capability), "precision": precision, "profile": profile}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:40]


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``: readers see
    the old file or the whole new one, and a failure leaves no partial file behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _cache_dir() -> Path:
    base = os.environ.get("DPR_TRT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dpr", "tensorrt")
    p = Path(base)
    p.mkdir(parents=True, exist_ok=True)
    return p


# ---- graph sources --------------------------------------------------------------------------------

class GraphSource:
    """The ONNX bytes one engine is built from, their sha256, and whether the plugin is wanted."""

    def __init__(self, name: str, data: bytes, plugin: bool, origin: str):
        self.name, self.data, self.plugin, self.origin = name, data, plugin, origin
        self.sha256 = hashlib.sha256(data).hexdigest()


def has_gate_function(model) -> bool:
    """Whether the ONNX ``model`` carries the dpr::FusedMoEGate model-local function (exports made before it
    was added do not; their portable gating is only in ``user_encoder_portable.onnx``)."""
    return any(f.domain == OP_DOMAIN and f.name == OP_NAME for f in model.functions)


def inlined_gate(onnx_bytes: bytes) -> bytes:
    """The fused graph with its dpr::FusedMoEGate calls replaced by the model-local function's body
    (``onnx.inliner.inline_local_functions``): standard ONNX ops only, the portable gating, so any TensorRT
    parser imports it whatever it does with plugin attributes or local functions."""
    import onnx
    from onnx.inliner import inline_local_functions

    model = onnx.load_from_string(onnx_bytes)
    if not has_gate_function(model):
        raise BackendError("the fused graph has no dpr::FusedMoEGate local function to fall back to")
    return inline_local_functions(model).SerializeToString()


def portable_source(export) -> GraphSource:
    """The portable gating: the fused graph with its local function inlined (every export since the function
    was added; the default export has no other user graph), else the export's portable graph."""
    import onnx

    fused = export.graph_file("user_encoder")
    if fused is not None:
        data = fused.read_bytes()
        if has_gate_function(onnx.load_from_string(data)):
            return GraphSource("user_encoder", inlined_gate(data), False, f"{fused.name}, dpr::FusedMoEGate inlined")
    portable = export.graph_file("user_encoder_portable")
    if portable is not None and portable.is_file():
        return GraphSource("user_encoder_portable", portable.read_bytes(), False, portable.name)
    raise BackendError(f"the export {export.path} has no portable user encoder: no user_encoder_portable.onnx, "
                       f"and no user_encoder.onnx with the dpr::FusedMoEGate local function (re-export the model)")


def choose_user_graph(export, build: Callable[[GraphSource], object], fused: bool | None,
                      plugin_error: str | None) -> tuple[object, bool, str]:
    """Build the user encoder: the fused graph when wanted and possible, else the portable gating.

    ``build(source)`` returns a built graph with ``plugin_layers`` (how many plugin layers its network
    held) or raises BackendError when TensorRT cannot parse or build it. ``plugin_error``: why the plugin
    could not be registered (None when it was). Returns ``(graph, fused, reason)``; ``fused`` is True only
    when the built network holds the plugin. ``fused=True`` makes every fallback an error.
    """
    fused_file = export.graph_file("user_encoder")
    if fused is False:
        why = "disabled (fused=False)"
    elif fused_file is None:
        why = (export.manifest.get("skipped") or {}).get("user_encoder", "the export has no fused graph")
    elif plugin_error is not None:
        why = f"the dpr::FusedMoEGate TensorRT plugin cannot be registered: {plugin_error}"
    else:
        try:
            graph = build(GraphSource("user_encoder", fused_file.read_bytes(), True, fused_file.name))
        except BackendError as exc:
            why = f"TensorRT could not use the fused graph ({exc}); retried with the portable gating"
        else:
            if getattr(graph, "plugin_layers", 0) > 0:
                return graph, True, f"fused dpr::FusedMoEGate plugin ({fused_file.name})"
            why = ("TensorRT's parser imported the dpr::FusedMoEGate local function instead of the plugin "
                   "(the plugin was not found under the node's plugin_namespace/plugin_version)")
            if fused:
                raise BackendError(f"fused user encoder requested but unavailable: {why}")
            log.warning("dpr.engine: tensorrt user encoder: %s", why)
            return graph, False, f"portable gating: {why}"
    if fused:
        raise BackendError(f"fused user encoder requested but unavailable: {why}")
    if fused is not False:
        log.warning("dpr.engine: tensorrt user encoder: %s", why)
    source = portable_source(export)
    return build(source), False, f"portable gating ({source.origin}): {why}"


# ---- one engine -----------------------------------------------------------------------------------

class _TrtGraph:
    def __init__(self, trt, torch, source: GraphSource, profile: dict, fp16: bool, cache_key: str, logger):
        self.trt, self.torch = trt, torch
        self.name = source.name
        cache = _cache_dir() / f"{cache_key}.plan"
        meta_path = cache.with_suffix(".json")
        runtime = trt.Runtime(logger)
        engine = None
        if cache.is_file() and meta_path.is_file():
            engine = runtime.deserialize_cuda_engine(cache.read_bytes())
            self.plugin_layers = int(json.loads(meta_path.read_text()).get("plugin_layers", 0))
        if engine is None:
            plan, self.plugin_layers = self._build(source, profile, fp16, logger)
            # the metadata first: a plan is only trusted with its metadata beside it
            write_atomic(meta_path, json.dumps({"plugin_layers": self.plugin_layers, "graph": source.origin,
                                                "onnx_sha256": source.sha256}).encode())
            write_atomic(cache, plan)
            engine = runtime.deserialize_cuda_engine(plan)
            if engine is None:
                raise BackendError(f"TensorRT cannot deserialize the engine it built for {source.origin}")
        self.engine = engine
        self.inputs, self.outputs = [], []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            mode = engine.get_tensor_mode(name)
            (self.inputs if mode == trt.TensorIOMode.INPUT else self.outputs).append(name)
        self._local = threading.local()

    def _build(self, source: GraphSource, profile: dict, fp16: bool, logger) -> tuple[bytes, int]:
        trt = self.trt
        builder = trt.Builder(logger)
        network = builder.create_network(0)          # TensorRT 10: explicit batch always
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(source.data):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendError(f"TensorRT cannot parse {source.origin}: {errs}")
        # count the plugin layers: a parser that imported the local function body instead holds none
        kinds = {getattr(trt.LayerType, k) for k in ("PLUGIN", "PLUGIN_V2", "PLUGIN_V3") if hasattr(trt.LayerType, k)}
        plugin_layers = sum(1 for i in range(network.num_layers) if network.get_layer(i).type in kinds)
        config = builder.create_builder_config()
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        prof = builder.create_optimization_profile()
        for name, p in profile.items():
            prof.set_shape(name, tuple(p["min"]), tuple(p["opt"]), tuple(p["max"]))
        config.add_optimization_profile(prof)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise BackendError(f"TensorRT failed to build an engine for {source.origin}")
        return bytes(plan), plugin_layers

    def _context(self):
        ctx = getattr(self._local, "ctx", None)
        if ctx is None:
            ctx = self.engine.create_execution_context()
            self._local.ctx = ctx
            self._local.stream = self.torch.cuda.Stream()
        return ctx, self._local.stream

    def run(self, feeds: dict) -> np.ndarray:
        trt, torch = self.trt, self.torch
        ctx, stream = self._context()
        keep = []
        with torch.cuda.stream(stream):
            for name in self.inputs:
                arr = np.ascontiguousarray(feeds[name])
                want = trt.nptype(self.engine.get_tensor_dtype(name))
                t = torch.from_numpy(arr.astype(want, copy=False)).cuda(non_blocking=True)
                keep.append(t)
                ctx.set_input_shape(name, tuple(arr.shape))
                ctx.set_tensor_address(name, t.data_ptr())
            out_name = self.outputs[0]
            shape = tuple(ctx.get_tensor_shape(out_name))
            odt = trt.nptype(self.engine.get_tensor_dtype(out_name))
            out = torch.empty(shape, dtype=torch.from_numpy(np.zeros(0, odt)).dtype, device="cuda")
            ctx.set_tensor_address(out_name, out.data_ptr())
            if not ctx.execute_async_v3(stream.cuda_stream):
                raise BackendError("TensorRT execution failed")
            host = out.float().cpu()
        stream.synchronize()
        return host.numpy()


# ---- the backend ----------------------------------------------------------------------------------

class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, export, device: str = "cuda", fp16: bool = False, fused: bool | None = None, **options):
        super().__init__(export, device)
        if options:
            raise BackendError(f"tensorrt backend got unknown option(s): {', '.join(sorted(options))}")
        ok, why = self.availability(device)
        if not ok:
            raise BackendError(f"TensorRT backend unavailable: {why}")
        trt = require("tensorrt", "the tensorrt backend")
        check_tensorrt_version(trt.__version__)
        import torch

        self.trt, self.torch, self.fp16 = trt, torch, bool(fp16)
        self.prompt_variant = "fp16" if self.fp16 else "fp32"
        precision = "fp16" if self.fp16 else "fp32"
        logger = trt.Logger(trt.Logger.WARNING)
        dev = torch.device(device)
        self.gpu = torch.cuda.get_device_name(dev)
        sm = tuple(torch.cuda.get_device_capability(dev))

        plugin_error, ptx_sha = None, None
        if fused is not False and export.graph_file("user_encoder") is not None:
            try:
                import dpr.kernels.trt_plugin as plugin

                plugin.register()
                ptx_sha = plugin.ptx_sha256()
            except Exception as exc:  # noqa: BLE001 - any failure means: no plugin
                plugin_error = f"{type(exc).__name__}: {exc}"
        profiles = export.graphs

        def build(source: GraphSource, graph: str | None = None) -> _TrtGraph:
            profile = profiles[graph or source.name]["tensorrt_profile"]
            key = engine_cache_key(source.sha256, ptx_sha if source.plugin else None, trt.__version__, sm,
                                   precision, profile)
            return _TrtGraph(trt, torch, source, profile, self.fp16, key, logger)

        pe = export.graph_file("prompt_encoder")
        self.prompt = build(GraphSource("prompt_encoder", pe.read_bytes(), False, pe.name))
        self.user, self.fused, self.fused_reason = choose_user_graph(export, build, fused, plugin_error)
        self.user_graph = self.user.name

    def encode_prompts(self, input_ids, attention_mask):
        return self.prompt.run({"input_ids": input_ids, "attention_mask": attention_mask}).astype(np.float32)

    def encode_users(self, item_seq, p_pos, p_neg, presence):
        return self.user.run({"item_seq": item_seq, "p_pos": p_pos, "p_neg": p_neg,
                              "presence": presence}).astype(np.float32)

    def describe(self) -> dict:
        return {"backend": self.name, "device": self.device, "tensorrt": self.trt.__version__, "gpu": self.gpu,
                "fp16": self.fp16, "user_graph": self.user_graph, "fused": self.fused,
                "fused_reason": self.fused_reason, "engine_cache": str(_cache_dir())}

    @classmethod
    def availability(cls, device: str) -> tuple[bool, str]:
        if not device.startswith("cuda"):
            return False, "TensorRT needs a CUDA device (device=cpu)"
        try:
            import tensorrt as trt
        except ImportError:
            return False, "tensorrt is not installed"
        try:
            check_tensorrt_version(trt.__version__)
        except BackendError as exc:
            return False, str(exc)
        if not cuda_available():
            return False, "no CUDA device visible to torch"
        return True, f"TensorRT {trt.__version__}"
