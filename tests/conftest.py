"""Shared fixtures: a tiny locally-built text encoder, a small synthetic dataset and a quickly
trained checkpoint, so every test runs offline in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]

# `python -m pytest` without PYTHONSAFEPATH (make test exports it) puts the working directory, usually the
# repository root, first on sys.path, where kernels/, engine/, ... would stand in for installed modules of those
# names. Take it off before any test module imports anything.
import sys  # noqa: E402

sys.path[:] = [p for p in sys.path if p != "" and Path(p).resolve() != REPO]


def _register_shared(name: str) -> None:
    """Make ``tests/<name>.py`` importable as ``dpr_tests_<name>``: pytest runs in importlib mode, which puts no
    test folder on sys.path (nor should it: the repository root would come with it), and conftest.py is
    imported before any test module, so the test files simply ``import dpr_tests_<name>``."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"dpr_tests_{name}", Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)


_register_shared("fuzz_strategies")
_register_shared("serve_answers")
_register_shared("child_process")
ML1M_DIR = Path(os.environ.get("DPR_ML1M_DIR", REPO.parent / "shared" / "data" / "ml-1m"))


def pytest_collection_modifyitems(config, items):
    import torch

    has_cuda = torch.cuda.is_available()
    try:
        import tensorrt  # noqa: F401
        has_trt = True
    except ImportError:
        has_trt = False
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device (none on this machine)"))
        if "tensorrt" in item.keywords and not has_trt:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT (not installed on this machine)"))


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    from dpr.data.prompts import NEGATIVE_TEMPLATES, POSITIVE_TEMPLATES
    from dpr.model.tiny_encoder import make_tiny_text_encoder

    corpus = list(POSITIVE_TEMPLATES) + list(NEGATIVE_TEMPLATES)
    corpus += ["comedy horror sci-fi drama romance thriller action documentary animation western musical war"]
    return make_tiny_text_encoder(tmp_path_factory.mktemp("tiny-encoder"), corpus)


@pytest.fixture(scope="session")
def text_encoder(tiny_encoder_dir):
    from dpr.model import TextEncoder

    return TextEncoder.load(str(tiny_encoder_dir))


@pytest.fixture(scope="session")
def small_dataset():
    from dpr.data import load_dataset

    return load_dataset("synthetic", num_users=300, num_items=400, num_tags=8, seed=3)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, small_dataset, text_encoder) -> Path:
    """A checkpoint trained for a few steps (seconds): real format, real architecture."""
    from dpr.checkpoint import save_checkpoint
    from dpr.config import ModelConfig, TrainConfig
    from dpr.train.pipeline import train

    ck = train(small_dataset,
               ModelConfig(d=16, max_len=12, fusion_hidden=32, expert_hidden=32, num_heads=2),
               TrainConfig(stage1_epochs=2, stage2_epochs=1, stage2_steps_per_epoch=5, stage3_epochs=1,
                           stage3_steps_per_epoch=5, batch_size=64),
               text_encoder, log=lambda *a: None, val_users=50)
    return save_checkpoint(ck, tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="session")
def export_dir(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint exported (ONNX graphs, torch weights, catalogue: ids i1..i400, as the demo's)."""
    from dpr.export import ExportConfig, export

    return export(tiny_checkpoint, ExportConfig(out=str(tmp_path_factory.mktemp("engine") / "exp")))


@pytest.fixture(scope="session")
def engine(export_dir):
    """The export served by ONNX Runtime (backend and retriever)."""
    from dpr.engine import Engine

    return Engine.load(export_dir, backend="onnxruntime", retriever="onnxruntime")


@pytest.fixture(scope="session")
def reference(export_dir, tiny_checkpoint):
    """The same export served by the torch reference (backend and retriever)."""
    from dpr.engine import Engine

    return Engine.load(export_dir, backend="torch", retriever="torch",
                       backend_options={"checkpoint": str(tiny_checkpoint)})
