"""Damaged checkpoints, generated here from the tiny fixture checkpoint (no binary is committed): cut at many
lengths, bit-flipped, foreign files and torch objects, versions this dpr cannot read, and pickles that would
run code. Each must be a CheckpointError naming the file; nothing from the file may execute.

tests/test_checkpoint.py already covers: a missing file, a cut at 200 bytes, a text file, a torch dict without
the format marker, version + 1, a missing catalogue and weights that do not match their config.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dpr.checkpoint import FORMAT_VERSION, load_checkpoint
from dpr.errors import CheckpointError


def _refused(path: Path, match: str = "") -> str:
    with pytest.raises(CheckpointError) as info:       # any other exception type fails the test
        load_checkpoint(path)
    msg = str(info.value)
    assert str(path) in msg, msg                       # the message names the file
    if match:
        assert match in msg, msg
    return msg


@pytest.mark.parametrize("keep", [0, 1, 4, 64, 0.1, 0.5, 0.9, 0.999, -1])
def test_truncated_anywhere_is_refused(tiny_checkpoint, tmp_path, keep):
    """Cut at the start, inside the zip header, the pickle, the tensor data and the central directory."""
    raw = tiny_checkpoint.read_bytes()
    n = len(raw) + keep if keep == -1 else int(len(raw) * keep) if isinstance(keep, float) else keep
    bad = tmp_path / "cut.pt"
    bad.write_bytes(raw[:n])
    _refused(bad, "truncated or foreign")


def _record_span(path: Path, suffix: str, tensors_only: bool = False) -> tuple[int, int]:
    """(start, length) of the largest zip member whose name ends with ``suffix`` (``tensors_only``: among the
    tensor storages, ``.../data/N``) inside the file (torch checkpoints store them uncompressed)."""
    with zipfile.ZipFile(path) as z:
        members = [i for i in z.infolist() if i.filename.endswith(suffix)
                   and (not tensors_only or i.filename.rsplit("/", 2)[-2:-1] == ["data"])]
        info = max(members, key=lambda i: i.file_size)
        with open(path, "rb") as fh:
            fh.seek(info.header_offset + 26)
            name_len, extra_len = int.from_bytes(fh.read(2), "little"), int.from_bytes(fh.read(2), "little")
        return info.header_offset + 30 + name_len + extra_len, info.file_size


def _flip(raw: bytes, pos: int) -> bytes:
    b = bytearray(raw)
    b[pos] ^= 0x10
    return bytes(b)


@pytest.mark.parametrize("where", ["zip-magic", "pickle-opcode", "central-directory"])
def test_bit_flip_in_the_structure_is_refused(tiny_checkpoint, tmp_path, where):
    raw = tiny_checkpoint.read_bytes()
    if where == "zip-magic":
        pos = 0
    elif where == "pickle-opcode":
        pos, _ = _record_span(tiny_checkpoint, "data.pkl")        # the pickle's PROTO opcode
    else:
        pos = raw.rfind(b"PK\x05\x06")                           # end of central directory record
    bad = tmp_path / "flip.pt"
    bad.write_bytes(_flip(raw, pos))
    _refused(bad)


def test_bit_flip_in_tensor_data_is_refused(tiny_checkpoint, tmp_path):
    # the largest tensor storage (not the pickle, which can be larger: a flip there may land on a memo index
    # that nothing reads again, leaving the loaded objects unchanged)
    start, size = _record_span(tiny_checkpoint, "", tensors_only=True)
    bad = tmp_path / "flip.pt"
    bad.write_bytes(_flip(tiny_checkpoint.read_bytes(), start + size // 2))
    _refused(bad)


def _zip_of_text(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "not a checkpoint")


@pytest.mark.parametrize("kind", ["random-bytes", "empty", "zip-not-torch", "tensor", "list", "none", "npy",
                                  "state-dict-only"])
def test_foreign_files_are_refused(tmp_path, kind):
    p = tmp_path / f"{kind}.pt"
    if kind == "random-bytes":
        p.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "zip-not-torch":
        _zip_of_text(p)
    elif kind == "npy":
        buf = io.BytesIO()
        np.save(buf, np.zeros(4))
        p.write_bytes(buf.getvalue())
    else:
        obj = {"tensor": torch.zeros(3), "list": [1, 2], "none": None,
               "state-dict-only": {"projection.weight": torch.zeros(2, 2)}}[kind]
        torch.save(obj, p)
    _refused(p)


def test_a_folder_named_like_a_checkpoint_is_refused(tmp_path):
    d = tmp_path / "ckpt.pt"
    d.mkdir()
    _refused(d)


@pytest.mark.parametrize("version", [0, -1, FORMAT_VERSION + 1, 2 ** 70, "1", None, 1.0, [1]],
                         ids=["zero", "negative", "newer", "huge", "string", "none", "float", "list"])
def test_versions_this_dpr_cannot_read_are_refused(tiny_checkpoint, tmp_path, version):
    raw = torch.load(tiny_checkpoint, weights_only=True)
    raw["version"] = version
    p = tmp_path / "v.pt"
    torch.save(raw, p)
    _refused(p, "version")


def test_a_boolean_version_is_refused(tiny_checkpoint, tmp_path):
    raw = torch.load(tiny_checkpoint, weights_only=True)
    raw["version"] = True
    p = tmp_path / "v.pt"
    torch.save(raw, p)
    _refused(p, "version")


class _Payload:
    """Unpickling this creates ``marker``: proof that code from the file ran."""
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")      # torch's note on the raw pickle's protocol
@pytest.mark.parametrize("how", ["raw-pickle", "torch-save", "inside-state-dict", "protocol-0"])
def test_pickled_code_never_runs(tiny_checkpoint, tmp_path, how):
    marker = tmp_path / "PAYLOAD-RAN"
    evil = _Payload(marker)
    p = tmp_path / "evil.pt"
    if how == "raw-pickle":
        p.write_bytes(pickle.dumps(evil))
    elif how == "protocol-0":
        p.write_bytes(pickle.dumps(evil, protocol=0))
    elif how == "torch-save":
        torch.save({"format": "dpr-checkpoint", "version": FORMAT_VERSION, "meta": evil}, p)
    else:                                               # a real checkpoint with one object slipped in
        raw = torch.load(tiny_checkpoint, weights_only=True)
        raw["state_dict"] = dict(raw["state_dict"], extra=evil)
        torch.save(raw, p)
    # the payload does run when unpickled without weights_only: the test would notice if it were loaded so
    assert not marker.exists()
    _refused(p, "truncated or foreign")
    assert not marker.exists(), "a pickled payload ran while the checkpoint was loaded"
    if how == "raw-pickle":                            # control: the payload is live
        pickle.loads(p.read_bytes()).close()
        assert marker.exists()
        os.unlink(marker)
