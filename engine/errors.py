"""Errors the engine raises (all :class:`dpr.errors.DPRError`)."""

from __future__ import annotations

from dpr.errors import DPRError, InputError, MissingDependency  # noqa: F401


class ExportFolderError(DPRError):
    """The export folder is missing, incomplete, tampered with or of an unsupported format."""


class BackendError(DPRError):
    """A backend is unknown or cannot run on this machine."""


class OverloadedError(DPRError):
    """The dynamic batcher's queue is full; retry later (back-pressure instead of unbounded memory)."""


class ClosedError(DPRError):
    """The batcher (or engine) was closed."""
