"""dpr-train / dpr-eval end to end through their CLIs (tiny sizes), and their error handling."""

import json
import subprocess
import sys

import pytest

from dpr.cli import eval as eval_cli
from dpr.cli import train as train_cli


def test_train_then_eval(tmp_path, tiny_encoder_dir, capsys):
    ckpt = tmp_path / "c.pt"
    args = ["--dataset", "synthetic", "--synthetic-users", "120", "--synthetic-items", "150",
            "--text-encoder", str(tiny_encoder_dir), "--out", str(ckpt), "--d", "8", "--max-len", "10",
            "--fusion-hidden", "8", "--expert-hidden", "8", "--stage1-epochs", "1", "--stage2-epochs", "1",
            "--stage2-steps-per-epoch", "2", "--stage3-epochs", "1", "--stage3-steps-per-epoch", "2",
            "--val-users", "30"]
    assert train_cli.main(args) == 0
    assert ckpt.is_file()
    out = tmp_path / "r.json"
    assert eval_cli.main([str(ckpt), "--dataset", "synthetic", "--synthetic-users", "120",
                          "--synthetic-items", "150", "--max-users", "60", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    for task in ("standard", "positive", "negative", "compound", "positive_heldout"):
        assert task in res
    for method in ("backbone", "post_filter", "post_filter_k", "hard_filter", "rerank", "dpr", "dpr_hard_filter"):
        assert "ndcg@10" in res["positive"][method]
        assert "violation@10" in res["negative"][method]
    assert res["cases"]["standard"] == 60
    assert "positive" in capsys.readouterr().out          # the table is printed


def test_eval_rejects_other_catalogue(tiny_checkpoint, capsys):
    rc = eval_cli.main([str(tiny_checkpoint), "--dataset", "synthetic", "--synthetic-items", "123"])
    assert rc == 2
    assert "different item catalogue" in capsys.readouterr().err


def test_bad_checkpoint_exit_code(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    r = subprocess.run([sys.executable, "-P", "-m", "dpr.cli.eval", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "dpr-eval: error:" in r.stderr and "Traceback" not in r.stderr


def test_unknown_config_field(tmp_path, tiny_encoder_dir, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model": {"dd": 3}}))
    assert train_cli.main(["--config", str(cfg), "--out", str(tmp_path / "x.pt"),
                           "--text-encoder", str(tiny_encoder_dir)]) == 2
    assert "unknown ModelConfig fields: dd" in capsys.readouterr().err


def test_stage1_without_encoder_then_steering_ablation(tmp_path, tiny_encoder_dir, capsys, monkeypatch):
    """Stage 1 runs with no text encoder (as on a GPU box without one); stages 2-3 resume from it, and
    steering flags given with --resume rebuild only the steering modules (how the ablations share one
    backbone). Backbone flags that differ from the checkpoint are refused."""
    import torch

    from dpr.checkpoint import load_checkpoint

    monkeypatch.setenv("DPR_TEXT_ENCODER", str(tmp_path / "no-such-encoder"))   # stage 1 must not look
    data = ["--dataset", "synthetic", "--synthetic-users", "120", "--synthetic-items", "150"]
    s1 = tmp_path / "s1.pt"
    assert train_cli.main(data + ["--out", str(s1), "--stages", "1", "--d", "8", "--max-len", "10",
                                  "--stage1-epochs", "2", "--stage1-all-windows", "--stage1-max-minutes", "5"]) == 0
    ck1 = load_checkpoint(s1)
    assert ck1.meta["stages_done"] == [1] and not ck1.text_encoder.get("hash")
    full = tmp_path / "abl.pt"
    steer = ["--stage2-epochs", "1", "--stage2-steps-per-epoch", "2", "--stage3-epochs", "1",
             "--stage3-steps-per-epoch", "2", "--val-users", "30"]
    assert train_cli.main(data + steer + ["--resume", str(s1), "--stages", "2,3", "--out", str(full),
                                          "--text-encoder", str(tiny_encoder_dir), "--fusion", "add",
                                          "--top-k", "1", "--expert-hidden", "8"]) == 0
    ck = load_checkpoint(full)
    assert (ck.model_config.fusion, ck.model_config.top_k, ck.model_config.expert_hidden) == ("add", 1, 8)
    assert ck.text_encoder["hash"]                                   # the encoder is bound now
    for k, v in ck1.state_dict.items():
        if k.startswith(("item_emb", "backbone")):
            assert torch.equal(v, ck.state_dict[k]), k               # the backbone is untouched
    capsys.readouterr()
    assert train_cli.main(data + steer + ["--resume", str(s1), "--stages", "3", "--out", str(tmp_path / "x.pt"),
                                          "--text-encoder", str(tiny_encoder_dir), "--d", "16"]) == 2
    assert "--d differ" in capsys.readouterr().err
