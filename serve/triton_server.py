"""The ``tritonserver`` that PyTriton ships (``nvidia-pytriton``: the real server binary, its Python backend and
one backend stub per Python version), started on a model repository.

The Python backend runs ``model.py`` in a stub process that embeds the Python of the environment first on
``PATH``; it must be the same minor version as the stub and built the usual way: Debian's ``python3.11`` works,
the pyenv 3.11.7 build on these machines fails in the stub (``AttributeError: _recursion_count``), hence
``make triton-env`` (README "Serving"). Started from that venv's Python, :func:`server_env` puts its ``bin/``
first on ``PATH`` and its site-packages in ``DPR_SITE_PACKAGES`` for the repository's ``model.py``.
"""

from __future__ import annotations

import os
import shutil
import signal
import site
import subprocess
import sys
import tempfile
from pathlib import Path

from dpr.errors import require


def _dist() -> tuple[Path, Path, Path]:
    """(tritonserver binary, its folder, its shared libraries) from the installed nvidia-pytriton."""
    pytriton = require("pytriton", "the bundled tritonserver")
    from pytriton.utils.distribution import get_libs_path

    root = Path(pytriton.__file__).parent / "tritonserver"
    return root / "bin" / "tritonserver", root, Path(get_libs_path())


def prepare_backends(workdir) -> Path:
    """A backend folder for this Python: Triton's Python backend plus the stub built for this minor version."""
    _, root, _ = _dist()
    from pytriton.utils.distribution import get_stub_path

    dst = Path(workdir) / "backends"
    shutil.copytree(root / "backends", dst, dirs_exist_ok=True)
    ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    shutil.copy(get_stub_path(ver), dst / "python" / "triton_python_backend_stub")
    return dst


def server_env() -> dict:
    _, _, libs = _dist()
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [env.get("LD_LIBRARY_PATH"), str(libs)]))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["DPR_SITE_PACKAGES"] = os.pathsep.join(site.getsitepackages())
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("OMP_NUM_THREADS", "1")   # the engine sizes its own threads; OpenMP must not add more
    return env


def server_command(repo, backends: Path, cfg, model: str | None = None) -> list[str]:
    binary, _, _ = _dist()
    return [str(binary), f"--model-repository={repo}", f"--backend-directory={backends}",
            f"--http-address={cfg.host}", f"--http-port={cfg.port}",
            f"--http-thread-count={cfg.triton_http_threads()}",
            f"--grpc-address={cfg.host}", f"--grpc-port={cfg.grpc_port}",
            f"--metrics-address={cfg.host}", f"--metrics-port={cfg.metrics_port}",
            "--model-control-mode=explicit", f"--load-model={model or cfg.model_name}",
            # the Python backend's shared memory starts at 1 MB and grows 1 MB at a time; a 512-row request's
            # history tensor alone is about 1 MB, so start at 64 MB and grow 16 MB at a time
            "--backend-config=python,shm-default-byte-size=67108864",
            "--backend-config=python,shm-growth-byte-size=16777216",
            "--strict-readiness=true", f"--exit-timeout-secs={int(cfg.drain_timeout_s)}",
            "--log-verbose=0"]


def start(repo, cfg, workdir, **popen) -> subprocess.Popen:
    """Start tritonserver on ``repo`` (returns at once; poll ``/v2/health/ready``).

    It runs in an empty folder of ``workdir``: the backend stub's embedded Python puts its working directory on
    ``sys.path`` first (``""``, whatever ``PYTHONSAFEPATH`` says; measured), so started from the repository root
    the model's process would find engine/, kernels/, ... ahead of installed modules."""
    backends = prepare_backends(workdir).resolve()
    run_dir = Path(workdir) / "cwd"
    run_dir.mkdir(exist_ok=True)
    popen.setdefault("cwd", run_dir)
    return subprocess.Popen(server_command(Path(repo).resolve(), backends, cfg), env=server_env(), **popen)


def serve_triton(export_dir, cfg) -> int:
    """``dpr-serve --triton``: a repository pointing at ``export_dir`` in a temporary folder, served by the
    bundled tritonserver in the foreground. SIGTERM/SIGINT are passed on (Triton drains, then exits)."""
    from .triton_repo import choose_backend, write_repository

    backend, why = choose_backend(cfg.triton_backend)
    print(f"dpr-serve --triton: the {backend} backend ({why})", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="dpr-triton-") as work:
        write_repository(Path(work) / "repo", export_dir, cfg, copy_export=False, backend=backend)
        proc = start(Path(work) / "repo", cfg, work)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda s, _f: proc.send_signal(s))
        return proc.wait()


def main(argv=None) -> int:
    """``python -m dpr.serve.triton_server REPO [--host H] [--port P] [--grpc-port G] [--metrics-port M]``: the
    bundled tritonserver on a repository written by ``dpr-export --triton-repo`` (foreground)."""
    import argparse

    from .config import ServeConfig

    p = argparse.ArgumentParser(prog="python -m dpr.serve.triton_server")
    p.add_argument("repo")
    d = ServeConfig()
    for f in ("host", "port", "grpc_port", "metrics_port", "model_name"):
        p.add_argument("--" + f.replace("_", "-"), dest=f, type=type(getattr(d, f)), default=getattr(d, f))
    a = p.parse_args(argv)
    cfg = ServeConfig(host=a.host, port=a.port, grpc_port=a.grpc_port, metrics_port=a.metrics_port,
                      model_name=a.model_name)
    with tempfile.TemporaryDirectory(prefix="dpr-triton-") as work:
        proc = start(a.repo, cfg, work)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda s, _f: proc.send_signal(s))
        return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
