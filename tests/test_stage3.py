"""Stage-3 training pieces against brute force."""

import torch

from dpr.train.stage3 import history_mask


def test_history_mask_matches_brute_force_and_keeps_the_target():
    g = torch.Generator().manual_seed(0)
    hist = torch.randint(0, 15, (6, 7), generator=g)
    hist[0] = 0                                      # an all-padding row
    hist[1, :3] = 0
    targets = torch.randint(1, 15, (6,), generator=g)
    targets[2] = hist[2, -1]                         # a re-consumed target stays learnable
    m = history_mask(hist, targets, 15)
    assert m.shape == (6, 15) and m.dtype == torch.bool
    for i in range(6):
        # column 0 (padding) is masked by the caller anyway; compare the item columns
        want = {int(v) for v in hist[i] if v > 0} - {int(targets[i])}
        got = {int(j) for j in torch.nonzero(m[i]).flatten() if j > 0}
        assert got == want
        assert not m[i, targets[i]]


def test_keep_order_loss_is_kl_over_the_allowed_items():
    from dpr.train.stage3 import keep_order_loss

    g = torch.Generator().manual_seed(2)
    base = torch.randn(4, 9, generator=g)
    allowed = torch.rand(4, 9, generator=g) > 0.4
    allowed[:, 1] = True
    # a shift by a per-row constant, or any change on disallowed items, keeps the order: zero loss
    same = base + torch.randn(4, 1, generator=g)
    same = torch.where(allowed, same, torch.randn(4, 9, generator=g) * 50)
    assert keep_order_loss(base, same, allowed).abs() < 1e-6
    steered = torch.randn(4, 9, generator=g)
    got = keep_order_loss(base, steered, allowed)
    want = []
    for i in range(4):
        a = allowed[i]
        p, q = torch.softmax(base[i, a], 0), torch.softmax(steered[i, a], 0)
        want.append((p * (p.log() - q.log())).sum())
    assert got > 0 and torch.allclose(got, torch.stack(want).mean(), atol=1e-6)
    # finite with -inf entries (history / padding) outside the allowed set
    base[:, 0] = float("-inf")
    steered[:, 0] = float("-inf")
    allowed[:, 0] = False
    assert torch.isfinite(keep_order_loss(base, steered, allowed))


def test_stage3_applies_the_history_mask_and_the_keep_order_term(small_dataset, text_encoder, monkeypatch):
    """Both stage-3 options reach the loss: the steering logits lose the history columns, and the keep-order
    term sees only negative-only rows with neither forbidden nor history items allowed."""
    import dpr.train.stage3 as stage3
    from dpr.config import ModelConfig, TrainConfig
    from dpr.train.pipeline import train

    seen = {"keep_calls": 0, "masked_rows": 0}
    real_keep, real_loss = stage3.keep_order_loss, stage3.steering_loss

    def keep(base, steered, allowed):
        seen["keep_calls"] += 1
        assert base.shape == steered.shape == allowed.shape
        assert not allowed[:, 0].any()                                     # padding never allowed
        assert torch.isinf(steered[:, 1:]).any(dim=1).all()                # history columns masked ...
        assert not allowed[torch.isinf(steered)].any()                     # ... and never allowed
        assert allowed.sum(1).min() > 0
        return real_keep(base, steered, allowed)

    def loss(logits, targets, forbidden, has_neg, lam):
        seen["masked_rows"] += int((torch.isinf(logits[:, 1:]).sum(1) > 0).sum())
        return real_loss(logits, targets, forbidden, has_neg, lam)

    monkeypatch.setattr(stage3, "keep_order_loss", keep)
    monkeypatch.setattr(stage3, "steering_loss", loss)
    cfg = TrainConfig(stage1_epochs=1, stage2_epochs=1, stage2_steps_per_epoch=2, stage3_epochs=1,
                      stage3_steps_per_epoch=3, batch_size=32, neg_keep_lambda=1.0, pos_lambda=0.0, pos_keep_lambda=0.0, seed=0)
    train(small_dataset, ModelConfig(d=16, max_len=12, fusion_hidden=16, expert_hidden=16), cfg, text_encoder,
          log=lambda *a: None, val_users=20)
    assert seen["keep_calls"] == 3
    assert seen["masked_rows"] > 0                      # history items left the steering softmax
    seen.update(keep_calls=0, masked_rows=0)
    train(small_dataset, ModelConfig(d=16, max_len=12, fusion_hidden=16, expert_hidden=16),
          TrainConfig(**{**cfg.__dict__, "neg_keep_lambda": 0.0, "stage3_mask_history": False}), text_encoder,
          log=lambda *a: None, val_users=20)
    assert seen["keep_calls"] == 0 and seen["masked_rows"] == 0


def test_stage3_rejects_negative_loss_weights_before_any_stage_runs(small_dataset, text_encoder, monkeypatch):
    import pytest

    import dpr.train.pipeline as pipeline

    monkeypatch.setattr(pipeline, "train_stage1", lambda *a, **k: pytest.fail("stage 1 ran before the check"))

    from dpr.config import ModelConfig, TrainConfig
    from dpr.train.pipeline import train

    for bad in (dict(neg_lambda=-1.0), dict(neg_keep_lambda=-0.5)):
        with pytest.raises(ValueError, match="neg_lambda and neg_keep_lambda"):
            train(small_dataset, ModelConfig(d=8, max_len=6, fusion_hidden=8, expert_hidden=8),
                  TrainConfig(stage1_epochs=1, stage2_epochs=1, stage2_steps_per_epoch=1, stage3_epochs=1,
                              stage3_steps_per_epoch=1, **bad), text_encoder, log=lambda *a: None, val_users=10)


def test_positive_rows_get_the_tag_mass_and_keep_order_terms_over_the_tag_only(small_dataset, text_encoder,
                                                                               monkeypatch):
    """pos_lambda and pos_keep_lambda reach the loss once per step, each over the rows with a positive prompt,
    allowing only items that carry some tag and never the history; both switch off at 0."""
    import dpr.train.stage3 as stage3
    from dpr.config import ModelConfig, TrainConfig
    from dpr.train.pipeline import train

    tagged = torch.from_numpy(small_dataset.catalogue.item_tags.any(1))
    seen = {"keep": 0, "mass": 0}
    real_keep, real_mass = stage3.keep_order_loss, stage3.tag_mass_loss

    def keep(base, steered, allowed):
        seen["keep"] += 1
        assert (allowed <= tagged).all() and not allowed[torch.isinf(steered)].any()
        return real_keep(base, steered, allowed)

    def mass(logits, wanted):
        seen["mass"] += 1
        assert (wanted <= tagged).all() and wanted.any(1).all()
        return real_mass(logits, wanted)

    monkeypatch.setattr(stage3, "keep_order_loss", keep)
    monkeypatch.setattr(stage3, "tag_mass_loss", mass)
    cfg = TrainConfig(stage1_epochs=1, stage2_epochs=1, stage2_steps_per_epoch=2, stage3_epochs=1,
                      stage3_steps_per_epoch=3, batch_size=32, neg_keep_lambda=0.0, pos_lambda=1.0,
                      pos_keep_lambda=1.0, mix_positive=1.0, mix_negative=0.0, mix_compound=0.0,
                      stage3_calibrate=False, seed=0)
    model_cfg = dict(d=16, max_len=12, fusion_hidden=16, expert_hidden=16)
    train(small_dataset, ModelConfig(**model_cfg), cfg, text_encoder, log=lambda *a: None, val_users=20)
    assert seen == {"keep": 3, "mass": 3}
    seen.update(keep=0, mass=0)
    train(small_dataset, ModelConfig(**model_cfg),
          TrainConfig(**{**cfg.__dict__, "pos_lambda": 0.0, "pos_keep_lambda": 0.0}), text_encoder,
          log=lambda *a: None, val_users=20)
    assert seen == {"keep": 0, "mass": 0}
