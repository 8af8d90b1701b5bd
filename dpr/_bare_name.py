"""Keep the repository's top-level folders from standing in for installed modules of the same name.

``engine/``, ``export/``, ``kernels/`` and ``bench/`` are the packages ``dpr.engine``, ``dpr.export``,
``dpr.kernels`` and ``dpr.bench`` (setuptools ``package-dir``). A Python process whose ``sys.path`` holds
the repository root (``python``, ``python -c`` or ``python -m`` started there, pytest's default import
mode) would otherwise import the folder as the bare name, so a third-party ``import kernels`` (transformers
does this) got our folder. The processes the project starts keep the root off ``sys.path`` (``PYTHONSAFEPATH``
in the Makefile, ``-P`` in the subprocesses it starts, pytest's importlib mode); this module is the backstop
for a process a user starts in the root by hand.

Each folder's ``__init__.py`` calls :func:`defer_to_installed` when it finds itself imported under its bare
name. The installed module of that name, found on ``sys.path`` without the repository root, is executed
and put in ``sys.modules`` in the folder's place, and the import statement returns it (importlib returns
whatever ``sys.modules`` holds once the module's code has run). With no such module installed the import
fails with ``ModuleNotFoundError``, as it would outside the repository.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def _same_dir(entry: str, folder: str) -> bool:
    try:
        return os.path.samefile(entry or os.getcwd(), folder)
    except OSError:
        return False


def defer_to_installed(name: str, init_file: str) -> None:
    """Replace the folder module ``name`` (being imported from ``init_file``) with the installed module of
    that name, or raise ModuleNotFoundError when there is none."""
    folder = os.path.dirname(os.path.abspath(init_file))
    root = os.path.dirname(folder)
    path = [p for p in sys.path if isinstance(p, str) and not _same_dir(p, root)]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(
            f"No module named {name!r}: the folder {folder} is the package 'dpr.{name}' (import it as such); "
            f"it is never importable as {name!r}", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        if sys.modules.get(name) is module:
            del sys.modules[name]
        raise
