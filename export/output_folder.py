"""The export folder is complete or absent: written to a temporary sibling folder, renamed at the end."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from dpr.export.config import ExportError


def _prepare_out(out: Path, force: bool) -> Path:
    """Check ``out`` can be (re)placed and create the temporary sibling folder; return the temp folder."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"output folder {out} exists and is not empty (pass --force to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise ExportError(f"cannot write the output folder {out}: {exc.strerror or exc}") from None
    if not os.access(tmp, os.W_OK):
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"cannot write the output folder {out}: permission denied")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)                     # mkdtemp makes 0700; a normal folder is wanted
    return tmp


def _commit(tmp: Path, out: Path) -> None:
    """Move the finished temporary folder to ``out`` (replacing an old one: rename aside, rename in, delete)."""
    old = None
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            old.rmdir()
            os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

