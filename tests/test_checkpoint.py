"""Checkpoint round trip and bad checkpoints."""

import pytest
import torch

from dpr.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from dpr.errors import CheckpointError


def test_round_trip(tiny_checkpoint, tmp_path, small_dataset):
    ck = load_checkpoint(tiny_checkpoint)
    assert ck.catalogue.ids == small_dataset.catalogue.ids
    assert ck.catalogue.titles == small_dataset.catalogue.titles
    assert ck.model_config.num_items == small_dataset.num_items
    assert set(ck.meta["stages_done"]) == {1, 2, 3}
    assert len(ck.text_encoder["hash"]) == 64
    m = ck.build_model()
    again = save_checkpoint(ck, tmp_path / "again.pt")
    m2 = load_checkpoint(again).build_model()
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    # plain dict, loadable with weights_only=True
    raw = torch.load(again, weights_only=True)
    assert raw["format"] == "dpr-checkpoint" and raw["version"] == FORMAT_VERSION


def test_missing(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_truncated(tiny_checkpoint, tmp_path):
    bad = tmp_path / "trunc.pt"
    bad.write_bytes(tiny_checkpoint.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated or foreign"):
        load_checkpoint(bad)


def test_foreign_files(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError):
        load_checkpoint(text)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, other)
    with pytest.raises(CheckpointError, match="not a dpr checkpoint"):
        load_checkpoint(other)


def test_newer_version_and_damaged(tiny_checkpoint, tmp_path):
    raw = torch.load(tiny_checkpoint, weights_only=True)
    raw["version"] = FORMAT_VERSION + 1
    newer = tmp_path / "newer.pt"
    torch.save(raw, newer)
    with pytest.raises(CheckpointError, match="version"):
        load_checkpoint(newer)
    raw["version"] = FORMAT_VERSION
    del raw["catalogue"]
    damaged = tmp_path / "damaged.pt"
    torch.save(raw, damaged)
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(damaged)
    raw = torch.load(tiny_checkpoint, weights_only=True)
    raw["model_config"]["d"] = 8                       # config no longer matches the weights
    wrong = tmp_path / "wrong.pt"
    torch.save(raw, wrong)
    with pytest.raises(CheckpointError):
        load_checkpoint(wrong).build_model()


def test_content_hash_catches_edits_and_old_checkpoints_still_load(tiny_checkpoint, tmp_path):
    """Every checkpoint records a sha256 of its content: a changed title or weight is refused by name; one
    written before the hash existed (no ``content_sha256``) still loads."""
    raw = torch.load(tiny_checkpoint, weights_only=True)
    assert len(raw["content_sha256"]) == 64
    edited = dict(raw, catalogue=dict(raw["catalogue"], titles=["x"] + raw["catalogue"]["titles"][1:]))
    torch.save(edited, tmp_path / "title.pt")
    with pytest.raises(CheckpointError, match=r"title\.pt is damaged: its content does not match the sha256"):
        load_checkpoint(tmp_path / "title.pt")
    name = sorted(raw["state_dict"])[0]
    weights = dict(raw["state_dict"])
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] += 1
    torch.save(dict(raw, state_dict=weights), tmp_path / "weight.pt")
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        load_checkpoint(tmp_path / "weight.pt")
    old = {k: v for k, v in raw.items() if k != "content_sha256"}
    torch.save(old, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt").catalogue.ids == load_checkpoint(tiny_checkpoint).catalogue.ids
