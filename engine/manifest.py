"""Read and validate an export folder written by ``dpr-export`` (format ``dpr-onnx-export``).

Validation: ``manifest.json`` present and parseable, format name and version supported, every file the
manifest lists present with the recorded sha256 (a tampered or missing file is a clear
:class:`ExportFolderError`), and the files the engine needs listed at all. Every path the manifest names
stays inside the folder (no ``..``, no absolute path, no symlink resolving outside it), every listed file
carries a sha256, and every file the engine reads by a manifest key (graphs, item table, items) is one of the
listed (hashed) files: nothing is read that the hashes do not cover. Files read later (the item table,
``items.json``; the engine's tokenizer) that are damaged are an :class:`ExportFolderError` naming the file
too (:meth:`ExportFolder.damaged`): with ``verify_hashes=False`` nothing else catches a truncated file.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

# the format's name and files: the exporter writes them from the same module
from dpr.export.export_format import FORMAT_NAME, FORMAT_VERSION, REQUIRED_FILES, USER_ENCODER_FILES
from dpr.util import file_sha256

from .errors import ExportFolderError

SUPPORTED_VERSIONS = (FORMAT_VERSION,)


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _inside(folder: Path, name, what: str) -> Path:
    """``folder / name`` for a path the manifest names; :class:`ExportFolderError` naming it when it leaves
    the folder: absolute, a drive, ``..`` among its parts, or (after symlinks are resolved) outside it. A
    hostile manifest could otherwise have the engine read, and hash, any file the process can read."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ExportFolderError(f"the manifest of {folder} names {what} {name!r}: not a file name")
    pure = PurePosixPath(name)
    if pure.is_absolute() or PureWindowsPath(name).drive or ".." in pure.parts or "\\" in name:
        raise ExportFolderError(f"the manifest of {folder} names {what} {name!r}, a path outside the export "
                                f"folder (absolute or through '..'): refused")
    full = folder / name
    real, root = full.resolve(), folder.resolve()
    if real != root and root not in real.parents:
        raise ExportFolderError(f"{what} {name} of {folder} is a symlink to {real}, outside the export folder: "
                                f"refused (copy the file into the folder)")
    return full


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
    def retrieval_dim(self) -> int:
        """Width of the retrieval space: the item table's and the steered user vector's columns. ``d`` plus
        one column per tag when the model has a tag channel (dpr.model.dpr_model), else ``d``."""
        shape = (self.manifest.get("item_embeddings") or {}).get("shape")
        return int(shape[1]) if shape else self.dim

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

    def damaged(self, name: str, problem, truncated: bool = True) -> ExportFolderError:
        """The error for a file of this export that cannot be read: names the file and the problem."""
        if isinstance(problem, BaseException):
            problem = f"{type(problem).__name__}: {problem}"
        guess = " (truncated?)" if truncated else ""
        hint = "" if self.verified else (" (loaded with verify_hashes=False; verify_hashes=True checks every "
                                          "file against the manifest's sha256)")
        return ExportFolderError(f"{name} is damaged: {problem}{guess}; re-export or restore it "
                                 f"[{self.path / name}]{hint}")

    def item_embeddings(self) -> np.ndarray:
        """The ``(N + 1, d)`` item table; :class:`ExportFolderError` when the file is damaged or its shape is
        not the one the manifest records."""
        meta = self.manifest.get("item_embeddings") or {}
        name = meta.get("file", "item_embeddings.npy")
        try:
            table = np.load(self.path / name, allow_pickle=False)
        except (OSError, ValueError, EOFError, pickle.UnpicklingError) as exc:
            raise self.damaged(name, exc) from None
        want = meta.get("shape")
        if not isinstance(table, np.ndarray) or table.ndim != 2 or table.dtype.kind != "f" \
                or (want is not None and list(table.shape) != list(want)):
            raise self.damaged(name, f"holds an array of dtype {getattr(table, 'dtype', type(table).__name__)} "
                                     f"and shape {getattr(table, 'shape', None)}; the manifest records a float "
                                     f"table of shape {want if want is not None else '(N + 1, d)'}", truncated=False)
        return np.ascontiguousarray(table, dtype=np.float32)

    def items(self) -> dict:
        """The parsed ``items.json`` (ids, titles, tags), read on each call and not kept: its 10^5-10^6 small
        lists would otherwise stay alive for the export's lifetime, and every full garbage collection of
        the serving process walks them (docs/ARCHITECTURE.md, "Measurements behind the defaults").
        :class:`ExportFolderError`
        when it is damaged (not JSON, lists missing or of different lengths, not the manifest's item count)."""
        meta = self.manifest.get("items") or {}
        name = meta.get("file", "items.json")
        try:
            data = json.loads((self.path / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self.damaged(name, exc) from None
        if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("ids", "titles", "tags")):
            raise self.damaged(name, "it lacks the 'ids', 'titles' and 'tags' lists", truncated=False)
        n = len(data["ids"])
        if len(data["titles"]) != n or len(data["tags"]) != n:
            raise self.damaged(name, f"{n} ids but {len(data['titles'])} titles and {len(data['tags'])} tag lists",
                               truncated=False)
        want = meta.get("num_items")
        if want is not None and n != want:
            raise self.damaged(name, f"{n} items, the manifest records {want}", truncated=False)
        return data


def _named_files(manifest: dict):
    """``(what, name)`` of each file the engine reads by a manifest key rather than from ``files``."""
    graphs = manifest["graphs"]
    for g in sorted(graphs):
        if not isinstance(graphs[g], dict):
            raise ExportFolderError(f"manifest.json is damaged: graph {g!r} is not an object")
        if graphs[g].get("file") is not None:
            yield f"the file of graph {g}", graphs[g]["file"]
    for key, sub in (("item_embeddings", "file"), ("item_embeddings", "fp16_file"), ("items", "file")):
        meta = manifest.get(key)
        if isinstance(meta, dict) and meta.get(sub) is not None:
            yield f"{key}.{sub}", meta[sub]


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
        raise ExportFolderError(f"manifest.json is damaged: not readable JSON ({type(exc).__name__}: {exc}) "
                                f"(truncated?); re-export or restore it [{mpath}]") from None
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
    for key in ("max_len", "d"):
        v = manifest["model_config"].get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ExportFolderError(f"{mpath} is damaged: model_config.{key} is {v!r}, not a positive integer")
    files = manifest["files"]
    for name, meta in sorted(files.items()):
        _inside(folder, name, "file")
        if not isinstance(meta, dict):
            raise ExportFolderError(f"{mpath} is damaged: the entry of {name} under 'files' is not an object")
        if not isinstance(meta.get("sha256"), str) or not _SHA256.fullmatch(meta["sha256"]):
            raise ExportFolderError(f"{mpath} lists {name} without a valid sha256 ({meta.get('sha256')!r}): the "
                                    f"file cannot be verified; re-export the model")
    for name in REQUIRED_FILES:
        if name not in files:
            raise ExportFolderError(f"the manifest of {folder} does not list {name}, which the engine needs")
    if not any(name in files for name in USER_ENCODER_FILES):
        raise ExportFolderError(f"the manifest of {folder} lists no user encoder graph "
                                f"({' or '.join(USER_ENCODER_FILES)}), which the engine needs")
    for what, name in _named_files(manifest):
        _inside(folder, name, what)
        if name not in files:
            raise ExportFolderError(f"the manifest of {folder} names {what} {name}, which its 'files' does not "
                                    f"list (so no sha256 covers it): refused")
    for name, meta in sorted(files.items()):
        p = folder / name
        if not p.is_file():
            raise ExportFolderError(f"export file missing: {p} (listed in manifest.json; re-export the model)")
        if verify_hashes:
            want = meta["sha256"]
            got = file_sha256(p)
            if got != want:
                raise ExportFolderError(f"export file {p} was modified: its sha256 {got[:12]}... does not match "
                                        f"the manifest's {want[:12]}... (tampered or corrupted; re-export the model)")
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode())
        h.update(files[name]["sha256"].encode())
    return ExportFolder(path=folder, manifest=manifest, model_hash=h.hexdigest(), verified=verify_hashes)
