"""Small helpers with nothing but the standard library under them, used across the package: the default
thread count (:func:`physical_cores`: the CPU retrievers, ONNX Runtime's sessions, the benchmark's machine
record) and the sha256 of a file (:func:`file_sha256`: the export's manifest, checkpoints, the engine's
check of every export file)."""

from __future__ import annotations

import hashlib
import os

__all__ = ["physical_cores", "file_sha256"]


def physical_cores() -> int:
    """Number of physical cores this process may use (hyper-threads counted once)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    cores: set[tuple[str, str]] = set()
    try:
        phys = core = None
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("physical id"):
                    phys = line.split(":", 1)[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":", 1)[1].strip()
                elif not line.strip():
                    if core is not None:
                        cores.add((str(phys), core))
                    phys = core = None
    except OSError:
        pass
    return max(1, min(usable, len(cores))) if cores else max(1, usable)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of the file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
