"""Damaged export folders, generated here from the fixture export (nothing binary is committed): every file the
manifest lists missing, cut short or bit-flipped; files read without hash checks; a pickle in the item table;
manifests whose paths leave the folder; ONNX graphs using another operator domain. Each must be refused with an
error naming the file and the problem, and nothing from the files may execute.

tests/test_engine.py already covers: the item table flipped, the user encoder graph missing, format version
99, unknown backend/retriever, and with verify_hashes=False the item table, items.json, tokenizer.json and
manifest.json cut short; a wrong-shape item table and inconsistent items.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from dpr.errors import DPRError


@pytest.fixture()
def copy(export_dir, tmp_path) -> Path:
    d = tmp_path / "exp"
    shutil.copytree(export_dir, d)
    return d


def _manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def _write_manifest(d: Path, m: dict) -> None:
    (d / "manifest.json").write_text(json.dumps(m))


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _rehash(d: Path, name: str) -> None:
    """Record a changed file's new sha256: a consistent manifest, as a tamperer (or a buggy exporter) leaves it."""
    m = _manifest(d)
    m["files"][name]["sha256"] = _sha(d / name)
    _write_manifest(d, m)


def _user_graph(d: Path) -> str:
    """The export's user encoder file: the fused graph (the default export's only user graph), or the portable
    one where the custom-op library was not built."""
    return "user_encoder.onnx" if (d / "user_encoder.onnx").is_file() else "user_encoder_portable.onnx"


DAMAGES = ["missing", "empty", "half", "flip-first", "flip-middle", "flip-last"]


def test_every_listed_file_missing_cut_or_flipped_is_named(export_dir, copy):
    """For each file of the manifest (graphs, item table, catalogue, tokenizer, torch weights, the text encoder's
    files): each damage is an ExportFolderError naming the file and what is wrong; restored, the folder loads."""
    from dpr.engine import ExportFolderError, load_export

    files = sorted(_manifest(copy)["files"])
    assert {"prompt_encoder.onnx", _user_graph(copy), "item_embeddings.npy", "items.json",
            "tokenizer.json"} <= set(files)
    tried = 0
    for name in files:
        p, good = copy / name, (export_dir / name).read_bytes()
        for damage in DAMAGES:
            if damage == "missing":
                p.unlink()
            else:
                raw = bytearray(good)
                if damage == "empty":
                    raw = bytearray()
                elif damage == "half":
                    raw = raw[: len(raw) // 2]
                else:
                    raw[{"flip-first": 0, "flip-middle": len(raw) // 2, "flip-last": len(raw) - 1}[damage]] ^= 0x01
                p.write_bytes(bytes(raw))
            with pytest.raises(ExportFolderError) as info:
                load_export(copy)
            msg = str(info.value)
            assert str(p) in msg, (name, damage, msg)
            assert ("missing" if damage == "missing" else "sha256") in msg, (name, damage, msg)
            p.write_bytes(good)
            tried += 1
    assert tried == len(files) * len(DAMAGES)
    load_export(copy)                                   # every file restored: the folder verifies again


@pytest.mark.parametrize("name,backend", [
    ("prompt_encoder.onnx", "onnxruntime"), ("user encoder", "onnxruntime"), ("model_state.safetensors", "torch"),
])
def test_cut_graphs_and_weights_without_hash_checks_are_named(copy, name, backend):
    """verify_hashes=False: nothing compares sha256s, the reader must still name the file it cannot read."""
    from dpr.engine import Engine

    name = _user_graph(copy) if name == "user encoder" else name
    p = copy / name
    if not p.is_file():
        pytest.skip(f"this export has no {name}")
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    # the user graph is read with the kernel or, without the custom-op library, inlined: either way it is read
    with pytest.raises(DPRError) as info:
        Engine.load(copy, backend=backend, retriever="torch", verify_hashes=False)
    assert name in str(info.value), str(info.value)


def test_a_pickle_in_the_item_table_never_runs(copy, tmp_path):
    """item_embeddings.npy holding a pickled object array that would create a file, with a manifest that
    records its sha256 (so the hash check passes): refused as damaged, the payload never runs."""
    from dpr.engine import Engine, ExportFolderError

    marker = tmp_path / "PAYLOAD-RAN"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    arr = np.empty(2, dtype=object)
    arr[0], arr[1] = Payload(), 1.0
    np.save(copy / "item_embeddings.npy", arr, allow_pickle=True)
    _rehash(copy, "item_embeddings.npy")
    with pytest.raises(ExportFolderError, match=r"item_embeddings\.npy is damaged"):
        Engine.load(copy, backend="onnxruntime", retriever="torch")
    assert not marker.exists(), "a pickled payload in the item table ran"
    np.load(copy / "item_embeddings.npy", allow_pickle=True)[0].close()   # control: the payload is live
    assert marker.exists()


# ---- paths that leave the export folder ---------------------------------------------------------------------

def _outside(tmp_path: Path) -> Path:
    p = tmp_path / "outside" / "secret.bin"
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(b"not part of the export")
    return p


def _refused_as_escape(d: Path, what: str) -> None:
    from dpr.engine import ExportFolderError, load_export

    with pytest.raises(ExportFolderError) as info:
        load_export(d)
    assert what in str(info.value) and "outside" in str(info.value), str(info.value)


def test_a_dotdot_path_in_the_manifest_is_refused(copy, tmp_path):
    out = _outside(tmp_path)
    m = _manifest(copy)
    name = os.path.relpath(out, copy)                  # ../outside/secret.bin
    m["files"][name] = {"sha256": _sha(out)}
    _write_manifest(copy, m)
    _refused_as_escape(copy, name)


def test_an_absolute_path_in_the_manifest_is_refused(copy, tmp_path):
    out = _outside(tmp_path)
    m = _manifest(copy)
    m["files"][str(out)] = {"sha256": _sha(out)}
    _write_manifest(copy, m)
    _refused_as_escape(copy, str(out))


def test_a_symlink_out_of_the_folder_is_refused(copy, tmp_path):
    """The item table moved out and linked back: same bytes, same sha256, but read from outside the folder."""
    elsewhere = tmp_path / "outside" / "item_embeddings.npy"
    elsewhere.parent.mkdir(exist_ok=True)
    shutil.move(copy / "item_embeddings.npy", elsewhere)
    os.symlink(elsewhere, copy / "item_embeddings.npy")
    _refused_as_escape(copy, "item_embeddings.npy")


def test_a_graph_file_outside_the_folder_is_refused(copy, tmp_path):
    out = tmp_path / "outside" / "prompt_encoder.onnx"
    out.parent.mkdir(exist_ok=True)
    shutil.copyfile(copy / "prompt_encoder.onnx", out)
    m = _manifest(copy)
    m["graphs"]["prompt_encoder"]["file"] = str(out)
    _write_manifest(copy, m)
    _refused_as_escape(copy, str(out))


def test_a_graph_file_the_manifest_does_not_hash_is_refused(copy):
    """Inside the folder, but not under 'files': no sha256 covers it, so it could be swapped unseen."""
    from dpr.engine import ExportFolderError, load_export

    shutil.copyfile(copy / "prompt_encoder.onnx", copy / "other_encoder.onnx")
    m = _manifest(copy)
    m["graphs"]["prompt_encoder"]["file"] = "other_encoder.onnx"
    _write_manifest(copy, m)
    with pytest.raises(ExportFolderError, match=r"prompt_encoder.*other_encoder\.onnx.*does not list"):
        load_export(copy)


def test_a_symlink_inside_the_folder_is_taken(copy):
    """A link that stays inside the folder is no escape (same bytes, same sha256): it loads."""
    from dpr.engine import load_export

    shutil.move(copy / "item_embeddings.npy", copy / "table.npy")
    os.symlink("table.npy", copy / "item_embeddings.npy")
    m = _manifest(copy)
    m["files"]["table.npy"] = dict(m["files"]["item_embeddings.npy"])
    _write_manifest(copy, m)
    assert load_export(copy).item_embeddings().shape[0] > 1


def test_a_listed_file_without_a_hash_is_refused(copy):
    from dpr.engine import ExportFolderError, load_export

    m = _manifest(copy)
    m["files"]["item_embeddings.npy"].pop("sha256")
    _write_manifest(copy, m)
    with pytest.raises(ExportFolderError, match=r"item_embeddings\.npy"):
        load_export(copy)


# ---- ONNX graphs with operators of another domain -----------------------------------------------------------

def _redomain(d: Path, name: str, domain: str, op_type: str | None = None, only: str | None = None) -> None:
    """Move one standard-domain node of graph ``name`` (of type ``only`` when given) to ``domain`` (renamed to
    ``op_type`` when given), import that domain, and record the graph's new sha256."""
    import onnx

    model = onnx.load(str(d / name), load_external_data=False)
    node = next(n for n in model.graph.node if n.domain in ("", "ai.onnx") and (only is None or n.op_type == only))
    node.domain = domain
    if op_type:
        node.op_type = op_type
    if domain not in {o.domain for o in model.opset_import}:
        model.opset_import.append(onnx.helper.make_opsetid(domain, 1))
    onnx.save(model, str(d / name))
    _rehash(d, name)


@pytest.mark.parametrize("name", ["prompt_encoder.onnx", "user encoder"])
def test_an_unknown_operator_domain_is_refused(copy, name):
    from dpr.engine import BackendError, Engine

    name = _user_graph(copy) if name == "user encoder" else name
    _redomain(copy, name, "com.example.evil")
    with pytest.raises(BackendError) as info:
        Engine.load(copy, backend="onnxruntime", retriever="torch", backend_options={"fused": False})
    assert name in str(info.value) and "com.example.evil" in str(info.value), str(info.value)


def test_an_operator_of_the_runtime_contrib_domain_is_refused(copy):
    import onnx

    from dpr.engine import BackendError, Engine

    name = _user_graph(copy)
    if not any(n.op_type == "MatMul" for n in onnx.load(str(copy / name), load_external_data=False).graph.node):
        pytest.skip("no MatMul in this graph to move to com.microsoft's FusedMatMul")
    _redomain(copy, name, "com.microsoft", op_type="FusedMatMul", only="MatMul")
    with pytest.raises(BackendError, match="com.microsoft"):
        Engine.load(copy, backend="onnxruntime", retriever="torch", backend_options={"fused": False})
