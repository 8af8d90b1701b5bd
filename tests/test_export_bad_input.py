"""dpr-export, bad input: every case gets a clear error and a non-zero exit code, and nothing is left
half-written (no output folder, no temporary sibling, a --force target intact)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from dpr.export import ExportConfig, ExportError, export  # noqa: E402
from dpr.export.cli import main as cli_main  # noqa: E402


def _no_leftovers(parent: Path, name: str) -> None:
    left = [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]
    assert not left, f"temporary folders left behind: {left}"


# ---- bad input: clear errors, exit code != 0, nothing written --------------------------------------

def _cli_fails(capsys, argv, *needles) -> str:
    rc = cli_main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc != 0
    assert err.startswith("dpr-export: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n.lower() in err.lower(), err
    return err


def test_missing_checkpoint(tmp_path, capsys):
    _cli_fails(capsys, [tmp_path / "nope.pt", "--out", tmp_path / "o"], "not found")
    assert not (tmp_path / "o").exists()


def test_truncated_checkpoint(tmp_path, tiny_checkpoint, capsys):
    bad = tmp_path / "trunc.pt"
    bad.write_bytes(Path(tiny_checkpoint).read_bytes()[:100])
    _cli_fails(capsys, [bad, "--out", tmp_path / "o"], "truncated")
    assert not (tmp_path / "o").exists()


def test_foreign_files(tmp_path, capsys):
    f1 = tmp_path / "dict.pt"
    torch.save({"weights": torch.randn(3), "x": 1}, f1)
    _cli_fails(capsys, [f1, "--out", tmp_path / "o"], "not a dpr checkpoint")
    f2 = tmp_path / "notes.txt"
    f2.write_text("hello, not a checkpoint\n")
    _cli_fails(capsys, [f2, "--out", tmp_path / "o"], "checkpoint")
    assert not (tmp_path / "o").exists()


def test_unknown_version(tmp_path, tiny_checkpoint, capsys):
    payload = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    payload["version"] = 99
    bad = tmp_path / "v99.pt"
    torch.save(payload, bad)
    _cli_fails(capsys, [bad, "--out", tmp_path / "o"], "version 99")
    assert not (tmp_path / "o").exists()


def test_unwritable_output(tmp_path, tiny_checkpoint, capsys):
    afile = tmp_path / "a_file"
    afile.write_text("x")
    _cli_fails(capsys, [tiny_checkpoint, "--out", afile / "sub"], "cannot write")
    _cli_fails(capsys, [tiny_checkpoint, "--out", afile], "not a folder")
    if os.geteuid() != 0:                     # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            _cli_fails(capsys, [tiny_checkpoint, "--out", ro / "out"], "cannot write")
            assert not (ro / "out").exists()
        finally:
            ro.chmod(0o700)


def test_refuses_non_empty_output(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _cli_fails(capsys, [tiny_checkpoint, "--out", out], "--force")
    assert (out / "keep.txt").read_text() == "mine"


def test_text_encoder_missing_or_mismatched(tmp_path, tiny_checkpoint, tiny_encoder_dir, capsys):
    _cli_fails(capsys, [tiny_checkpoint, "--out", tmp_path / "o", "--text-encoder", tmp_path / "missing"],
               "not found")
    other = tmp_path / "other-encoder"
    shutil.copytree(tiny_encoder_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["layer_norm_eps"] = 1e-5
    (other / "config.json").write_text(json.dumps(cfg))
    _cli_fails(capsys, [tiny_checkpoint, "--out", tmp_path / "o", "--text-encoder", other], "does not match")
    assert not (tmp_path / "o").exists()
    _no_leftovers(tmp_path, "o")


def test_parity_failure_leaves_nothing(tmp_path, tiny_checkpoint):
    """A forced parity failure (impossible tolerance) raises ExportError; a --force target stays intact."""
    out = tmp_path / "prev"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    with pytest.raises(ExportError, match="parity check failed"):
        export(tiny_checkpoint, ExportConfig(out=str(out), force=True, fused=False, atol=1e-12,
                                             parity_batches=(1, 7)))
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
    _no_leftovers(tmp_path, "prev")
    fresh = tmp_path / "fresh"
    with pytest.raises(ExportError):
        export(tiny_checkpoint, ExportConfig(out=str(fresh), fused=False, min_overlap=1.0, atol=0.0,
                                             parity_batches=(7,)))
    assert not fresh.exists()
    _no_leftovers(tmp_path, "fresh")


def test_fused_unavailable_is_reported(monkeypatch):
    """Without the ORT custom-op library the fused variant is skipped with a reason (not exported unverified)."""
    from dpr.export import exporter

    monkeypatch.setenv("DPR_ORT_OPS_LIB", "/nonexistent/libdpr_ort_ops.so")
    monkeypatch.setattr("dpr.kernels.build.build", lambda *a, **k: None)
    table, lib, why = exporter._fused_available()
    assert lib is None and "not built" in why


def test_bad_config(tmp_path, tiny_checkpoint, capsys):
    _cli_fails(capsys, [tiny_checkpoint, "--out", tmp_path / "o", "--max-batch", "0"], "max-batch")
    _cli_fails(capsys, [tiny_checkpoint, "--out", tmp_path / "o", "--opset", "9"], "opset")
    assert not (tmp_path / "o").exists()
