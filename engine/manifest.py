"""Read and validate an export folder written by ``dpr-export`` (format ``dpr-onnx-export``).

Validation: ``manifest.json`` present and parseable, format name and version supported, every file the
manifest lists present with the recorded sha256 (a tampered or missing file is a clear
:class:`ExportFolderError`), and the files the engine needs listed at all.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ExportFolderError

FORMAT_NAME = "dpr-onnx-export"
SUPPORTED_VERSIONS = (1,)
REQUIRED_FILES = ("prompt_encoder.onnx", "user_encoder_portable.onnx", "item_embeddings.npy", "items.json",
                  "tokenizer.json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ExportFolder:
    path: Path
    manifest: dict
    model_hash: str                       # identifies this export's weights (prompt cache key etc.)
    verified: bool = True

    # ---- convenience --------------------------------------------------------------------------
    @property
    def model_config(self) -> dict:
        return self.manifest["model_config"]

    @property
    def max_len(self) -> int:
        return int(self.model_config["max_len"])

    @property
    def dim(self) -> int:
        return int(self.model_config["d"])

    @property
    def max_batch(self) -> int:
        return int(self.manifest.get("max_batch") or 512)

    @property
    def graphs(self) -> dict:
        return self.manifest.get("graphs", {})

    def file(self, name: str) -> Path:
        return self.path / name

    def graph_file(self, graph: str) -> Path | None:
        g = self.graphs.get(graph)
        if not g or not g.get("file"):
            return None
        return self.path / g["file"]

    def item_embeddings(self) -> np.ndarray:
        meta = self.manifest.get("item_embeddings") or {}
        table = np.load(self.path / meta.get("file", "item_embeddings.npy"), allow_pickle=False)
        return np.ascontiguousarray(table, dtype=np.float32)

    def items(self) -> dict:
        """The parsed ``items.json`` (ids, titles, tags), read on each call and not kept: its 10^5-10^6 small
        lists would otherwise stay alive for the export's lifetime, and every full garbage collection of
        the serving process walks them (~60 ms per 10^5 items on the 2-core VM)."""
        meta = self.manifest.get("items") or {}
        return json.loads((self.path / meta.get("file", "items.json")).read_text(encoding="utf-8"))


def load_export(path, verify_hashes: bool = True) -> ExportFolder:
    """Open and validate an export folder; raises :class:`ExportFolderError` naming the problem."""
    folder = Path(path)
    if not folder.exists():
        raise ExportFolderError(f"export folder not found: {folder}")
    if not folder.is_dir():
        raise ExportFolderError(f"{folder} is not a folder (expected a dpr-export output folder)")
    mpath = folder / "manifest.json"
    if not mpath.is_file():
        raise ExportFolderError(f"{folder} has no manifest.json: not a dpr export folder (create one with dpr-export)")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportFolderError(f"{mpath} is not readable JSON (damaged export?): {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ExportFolderError(f"{mpath} is not a '{FORMAT_NAME}' manifest (format={manifest.get('format')!r})"
                                if isinstance(manifest, dict) else f"{mpath} is not a dpr export manifest")
    version = manifest.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise ExportFolderError(f"{folder} has export format version {version!r}; this engine reads versions "
                                f"{', '.join(map(str, SUPPORTED_VERSIONS))} (re-export with a matching dpr)")
    for key in ("model_config", "files", "graphs"):
        if not isinstance(manifest.get(key), dict):
            raise ExportFolderError(f"{mpath} lacks '{key}' (damaged or foreign manifest)")
    files = manifest["files"]
    for name in REQUIRED_FILES:
        if name not in files:
            raise ExportFolderError(f"the manifest of {folder} does not list {name}, which the engine needs")
    for name, meta in sorted(files.items()):
        p = folder / name
        if not p.is_file():
            raise ExportFolderError(f"export file missing: {p} (listed in manifest.json; re-export the model)")
        if verify_hashes:
            want = (meta or {}).get("sha256")
            got = _sha256(p)
            if want and got != want:
                raise ExportFolderError(f"export file {p} was modified: its sha256 {got[:12]}... does not match "
                                        f"the manifest's {want[:12]}... (tampered or corrupted; re-export the model)")
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode())
        h.update(str((files[name] or {}).get("sha256", "")).encode())
    return ExportFolder(path=folder, manifest=manifest, model_hash=h.hexdigest(), verified=verify_hashes)
