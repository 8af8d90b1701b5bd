"""A Triton model repository for dpr: ``config.pbtxt`` + the model's code, which loads an export through
``dpr.engine`` (``dpr-export --triton-repo DIR``; ``dpr-serve --triton`` writes one for itself).

    DIR/dpr/config.pbtxt
    DIR/dpr/1/model.py          # Python backend: re-exports dpr.serve.triton_python.TritonPythonModel
    DIR/dpr/libtriton_dpr.so    # or the native backend (backend: "dpr"), built for this machine's Python
    DIR/dpr/1/export/           # the export, copied (unless the repository points at a folder elsewhere)

The Python backend is the portable choice (NVIDIA's container runs it as written); the native one embeds the
Python that built it and runs inside tritonserver (``dpr.serve.triton_native``).

The Python backend must import ``dpr`` (``pip install "dpr[cpu]"`` in the Triton container); ``model.py`` also
adds the folders of ``$DPR_SITE_PACKAGES`` (``os.pathsep``-separated) as site directories first, which is how a
venv outside the container's Python is reached.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from dpr.errors import InputError

from .config import ServeConfig
from .tensors import INPUTS, OUTPUTS

BACKEND = "dpr"         # the native backend's name in config.pbtxt: Triton loads libtriton_dpr.so

TYPE = {"BYTES": "TYPE_STRING", "INT32": "TYPE_INT32", "BOOL": "TYPE_BOOL", "FP32": "TYPE_FP32"}

MODEL_PY = '''"""dpr as a Triton Python-backend model (written by dpr.serve.triton_repo)."""
import os
import site

for _p in filter(None, os.environ.get("DPR_SITE_PACKAGES", "").split(os.pathsep)):
    site.addsitedir(_p)     # a venv outside the backend's Python (its .pth files, editable installs included)

from dpr.serve.triton_python import TritonPythonModel  # noqa: E402,F401
'''


def config_pbtxt(cfg: ServeConfig, export_dir: str, instances: int | None = None, backend: str = "python") -> str:
    """``backend``: "python" or "native" (Triton's backend name ``dpr``: ``libtriton_dpr.so``)."""
    instances = cfg.instances if instances is None else instances
    name = {"python": "python", "native": BACKEND}[backend]
    lines = [f'name: "{cfg.model_name}"', f'backend: "{name}"', f"max_batch_size: {cfg.max_batch_size}",
             "dynamic_batching {", f"  preferred_batch_size: [ {cfg.preferred_batch_size} ]",
             f"  max_queue_delay_microseconds: {cfg.max_queue_delay_us}", "}", "input ["]
    ins = []
    for name, (dt, dims, optional) in INPUTS.items():
        # [-1] inputs: each request pads its own rows; allow_ragged_batch lets requests of different widths
        # share a batch (either backend gets each request's tensor as sent, nothing is concatenated)
        extra = (" allow_ragged_batch: true" if dims == [-1] else "") + (" optional: true" if optional else "")
        ins.append(f'  {{ name: "{name}" data_type: {TYPE[dt]} dims: [ {dims[0]} ]{extra} }}')
    lines += [",\n".join(ins), "]", "output ["]
    lines.append(",\n".join(f'  {{ name: "{n}" data_type: {TYPE[dt]} dims: [ {dims[0]} ] }}'
                            for n, (dt, dims) in OUTPUTS.items()))
    lines += ["]", f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]"]
    params = {"export_dir": export_dir, "backend": cfg.backend, "retriever": cfg.retriever,
              "unknown_items": cfg.unknown_items, "max_requests_per_call": cfg.max_requests_per_call,
              "max_history": cfg.max_history, "max_k": cfg.max_k, "max_prompt_bytes": cfg.max_prompt_bytes}
    for k, v in params.items():
        lines.append(f'parameters: {{ key: "{k}" value: {{ string_value: "{v}" }} }}')
    return "\n".join(lines) + "\n"


def check_target(repo_dir, model_name: str = "dpr") -> None:
    """Refuse a repository folder that already holds this model (checked before a long export)."""
    version = Path(repo_dir) / model_name / "1"
    if version.exists() and (not version.is_dir() or any(version.iterdir())):
        raise InputError(f"{version} already exists and is not empty; choose another --triton-repo folder")
    if Path(repo_dir).exists() and not Path(repo_dir).is_dir():
        raise InputError(f"--triton-repo {repo_dir} is a file, not a folder")


def choose_backend(wanted: str, python=None) -> tuple[str, str]:
    """("native" or "python", why) for ``ServeConfig.triton_backend``: "auto" takes native where its library
    builds for ``python`` (the interpreter tritonserver will import dpr from; default this one); "native" raises
    InputError naming what is missing."""
    backend, why, _ = _resolve(wanted, python)
    return backend, why


def _resolve(wanted: str, python) -> tuple[str, str, Path | None]:
    """:func:`choose_backend`, and the library it built for "native" (None for "python")."""
    if wanted == "python":
        return "python", "asked for", None
    from . import triton_native

    try:
        lib = triton_native.build_for(python)
    except RuntimeError as exc:
        if wanted == "native":
            raise InputError(str(exc)) from None
        return "python", f"the native backend is not available here ({exc}); using Triton's Python backend", None
    return "native", "libtriton_dpr.so built for this Python", lib


def write_repository(repo_dir, export_dir, cfg: ServeConfig | None = None, copy_export: bool = True,
                     backend: str | None = None, python=None) -> Path:
    """Write ``repo_dir/<model>/config.pbtxt`` and the model's code (``1/model.py`` for the Python backend, or
    ``libtriton_dpr.so`` for the native one); the export is copied to ``1/export`` (or, with
    ``copy_export=False``, referenced by its absolute path). ``backend``: "python", "native" or "auto" (default:
    ``cfg.triton_backend``); the native library is built for ``python`` (the interpreter tritonserver will import
    dpr from; default this one). Returns the model folder."""
    cfg = (cfg or ServeConfig()).check()
    backend, _, lib = _resolve(backend or cfg.triton_backend, python)
    export_dir = Path(export_dir)
    if not (export_dir / "manifest.json").is_file():
        raise InputError(f"{export_dir} is not a dpr-export folder (no manifest.json)")
    check_target(repo_dir, cfg.model_name)
    model = Path(repo_dir) / cfg.model_name
    version = model / "1"
    version.mkdir(parents=True, exist_ok=True)
    if copy_export:
        shutil.copytree(export_dir, version / "export")
        ref = "export"
    else:
        ref = str(export_dir.resolve())
    if backend == "native":
        from .triton_native import install

        install(model, lib)
    else:
        (version / "model.py").write_text(MODEL_PY)
    (model / "config.pbtxt").write_text(config_pbtxt(cfg, ref, backend=backend))
    return model
