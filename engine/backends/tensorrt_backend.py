"""TensorRT 10 backend (GPU only; UNVERIFIED here: no GPU/TensorRT on the development machine).

Builds one engine per graph from the export's ONNX files with an optimisation profile over batch
1..max_batch (the manifest's ``tensorrt_profile`` per graph), FP16 when ``fp16=True``, registers the
kernels' ``dpr::FusedMoEGate`` plugin (``import dpr.kernels.trt_plugin``) for the fused graph, caches the
serialized engines on disk keyed by the export's model hash, the TensorRT version and the GPU name, and
keeps one execution context per thread (``threading.local``). Buffers are torch CUDA tensors.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import numpy as np

from dpr.errors import require

from ..errors import BackendError
from .base import Backend, cuda_available


def _cache_dir() -> Path:
    base = os.environ.get("DPR_TRT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dpr", "tensorrt")
    p = Path(base)
    p.mkdir(parents=True, exist_ok=True)
    return p


class _TrtGraph:
    def __init__(self, trt, torch, onnx_path: Path, profile: dict, fp16: bool, key: str, logger):
        self.trt, self.torch = trt, torch
        cache = _cache_dir() / f"{key}.plan"
        runtime = trt.Runtime(logger)
        engine = None
        if cache.is_file():
            engine = runtime.deserialize_cuda_engine(cache.read_bytes())
        if engine is None:
            builder = trt.Builder(logger)
            network = builder.create_network(0)          # TensorRT 10: explicit batch always
            parser = trt.OnnxParser(network, logger)
            if not parser.parse_from_file(str(onnx_path)):
                errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                raise BackendError(f"TensorRT cannot parse {onnx_path.name}: {errs}")
            config = builder.create_builder_config()
            if fp16:
                config.set_flag(trt.BuilderFlag.FP16)
            prof = builder.create_optimization_profile()
            for name, p in profile.items():
                prof.set_shape(name, tuple(p["min"]), tuple(p["opt"]), tuple(p["max"]))
            config.add_optimization_profile(prof)
            plan = builder.build_serialized_network(network, config)
            if plan is None:
                raise BackendError(f"TensorRT failed to build an engine for {onnx_path.name}")
            cache.write_bytes(bytes(plan))
            engine = runtime.deserialize_cuda_engine(plan)
        self.engine = engine
        self.inputs, self.outputs = [], []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            mode = engine.get_tensor_mode(name)
            (self.inputs if mode == trt.TensorIOMode.INPUT else self.outputs).append(name)
        self._local = threading.local()

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
        import torch

        self.trt, self.torch, self.fp16 = trt, torch, bool(fp16)
        self.prompt_variant = "fp16" if self.fp16 else "fp32"
        logger = trt.Logger(trt.Logger.WARNING)
        fused_file = export.graph_file("user_encoder")
        use_fused = fused is not False and fused_file is not None
        if use_fused:
            try:
                import dpr.kernels.trt_plugin as plugin
                plugin.register()
            except Exception as exc:  # noqa: BLE001
                if fused:
                    raise BackendError(f"the dpr::FusedMoEGate TensorRT plugin cannot be registered: {exc}") from None
                use_fused = False
        self.fused = use_fused
        gpu = torch.cuda.get_device_name(torch.device(device))

        def key(graph):
            h = hashlib.sha256(f"{export.model_hash}|{graph}|{trt.__version__}|{gpu}|fp16={fp16}".encode())
            return h.hexdigest()[:32]

        g = export.graphs
        self.prompt = _TrtGraph(trt, torch, export.graph_file("prompt_encoder"),
                                g["prompt_encoder"]["tensorrt_profile"], fp16, key("prompt_encoder"), logger)
        ug = "user_encoder" if use_fused else "user_encoder_portable"
        self.user_graph = ug
        self.user = _TrtGraph(trt, torch, export.graph_file(ug), g[ug]["tensorrt_profile"], fp16, key(ug), logger)
        self.gpu = gpu

    def encode_prompts(self, input_ids, attention_mask):
        return self.prompt.run({"input_ids": input_ids, "attention_mask": attention_mask}).astype(np.float32)

    def encode_users(self, item_seq, p_pos, p_neg, presence):
        return self.user.run({"item_seq": item_seq, "p_pos": p_pos, "p_neg": p_neg,
                              "presence": presence}).astype(np.float32)

    def describe(self) -> dict:
        return {"backend": self.name, "device": self.device, "tensorrt": self.trt.__version__, "gpu": self.gpu,
                "fp16": self.fp16, "user_graph": self.user_graph, "engine_cache": str(_cache_dir())}

    @classmethod
    def availability(cls, device: str) -> tuple[bool, str]:
        if not device.startswith("cuda"):
            return False, "TensorRT needs a CUDA device (device=cpu)"
        try:
            import tensorrt as trt
        except ImportError:
            return False, "tensorrt is not installed"
        if not cuda_available():
            return False, "no CUDA device visible to torch"
        return True, f"TensorRT {trt.__version__}"
