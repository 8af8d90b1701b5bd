"""Which backends a run measures: ``--backends auto|all|LIST`` resolved against this machine and export.

A bench backend is an engine backend plus options (``onnxruntime-int8`` is the onnxruntime backend with
``prompt_encoder="int8"``). ``auto`` keeps the ones that can run here; ``all`` also lists the ones that
cannot, with why; a backend named explicitly that cannot run is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dpr.errors import DPRError

from .config import AUTO_BACKENDS, BENCH_BACKENDS, BenchError


@dataclass
class BackendPlan:
    name: str
    engine_backend: str
    options: dict = field(default_factory=dict)
    available: bool = True
    reason: str = ""


def resolve_device(device: str) -> str:
    from dpr.engine.backends import cuda_available

    dev = "cuda" if device == "gpu" else device
    if dev == "auto":
        return "cuda" if cuda_available() else "cpu"
    if dev.startswith("cuda") and not cuda_available():
        raise BenchError(f"--device {device}: no CUDA device is visible to torch (use --device cpu)")
    return dev


def _check(name: str, export, device: str) -> tuple[bool, str]:
    from dpr.engine.backends import backend_class

    engine_backend, opts = BENCH_BACKENDS[name]
    if opts.get("prompt_encoder") == "int8" and export.graph_file("prompt_encoder_int8") is None:
        return False, "the export has no int8 prompt encoder (export with dpr-export --int8)"
    if opts.get("fused") is False and export.graph_file("user_encoder") is None:
        return False, "the export has no fused graph, so onnxruntime already runs the portable one"
    try:
        ok, why = backend_class(engine_backend).availability(device)
    except (DPRError, ImportError) as exc:
        return False, str(exc)
    return ok, why


def plan_backends(requested: list[str], export, device: str) -> list[BackendPlan]:
    """The backends to measure, in order (those that cannot run kept with ``available=False``)."""
    explicit = requested not in (["auto"], ["all"])
    names = requested if explicit else list(BENCH_BACKENDS if requested == ["all"] else AUTO_BACKENDS)
    plans = []
    for name in names:
        ok, why = _check(name, export, device)
        if not ok and explicit:
            raise BenchError(f"--backends {name}: cannot run here on {device}: {why}")
        engine_backend, opts = BENCH_BACKENDS[name]
        plans.append(BackendPlan(name, engine_backend, dict(opts), ok, why))
    return plans


def load_engine(plan: BackendPlan, export_dir, device: str, checkpoint: str = ""):
    """An Engine for ``plan`` (its own prompt cache; the default retriever for the device)."""
    from dpr.engine import Engine

    opts = dict(plan.options)
    if checkpoint and plan.engine_backend == "torch":
        opts["checkpoint"] = checkpoint
    # the runner's load_export has already checked every file's sha256: do not hash the export again per backend
    return Engine.load(export_dir, backend=plan.engine_backend, device=device, backend_options=opts,
                       verify_hashes=False)
