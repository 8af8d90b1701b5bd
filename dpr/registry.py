"""Lazy registries: an entry is a callable or a ``"module:attribute"`` string imported on first use,
so optional dependencies (onnxruntime, faiss, tensorrt) are only imported when asked for."""

from __future__ import annotations

import importlib
from typing import Any


def resolve_factory(factory: Any) -> Any:
    """The callable behind a registry entry, importing ``"module:attribute"`` strings."""
    if isinstance(factory, str):
        module, attr = factory.split(":", 1)
        return getattr(importlib.import_module(module), attr)
    return factory
