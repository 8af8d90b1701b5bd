"""Inference backends: a registry of lazily imported classes, all with the :class:`Backend` interface.

* ``"torch"``: the PyTorch model rebuilt from the export (the reference every backend is checked against);
* ``"onnxruntime"``: ONNX Runtime sessions for both graphs (fused custom op when its library is present);
* ``"tensorrt"``: TensorRT 10 engines built from the ONNX graphs (GPU only).
"""

from __future__ import annotations

from dpr.registry import resolve_factory

from typing import Callable

from ..errors import BackendError
from .base import Backend, cuda_available

__all__ = ["BACKENDS", "Backend", "backend_class", "register_backend", "cuda_available", "AUTO_ORDER"]

BACKENDS: dict[str, str | Callable[..., Backend]] = {
    "tensorrt": "dpr.engine.backends.tensorrt_backend:TensorRTBackend",
    "onnxruntime": "dpr.engine.backends.onnxruntime_backend:OnnxRuntimeBackend",
    "torch": "dpr.engine.backends.torch_backend:TorchBackend",
}

#: the order ``backend="auto"`` tries
AUTO_ORDER = ("tensorrt", "onnxruntime", "torch")


def register_backend(name: str, factory, *, overwrite: bool = False) -> None:
    if name in BACKENDS and not overwrite:
        raise BackendError(f"backend {name!r} is already registered")
    BACKENDS[name] = factory


def backend_class(name: str):
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of: auto, {', '.join(BACKENDS)}")
    return resolve_factory(BACKENDS[name])
