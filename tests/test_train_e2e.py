"""End to end: train on a small synthetic dataset, then DPR must beat the unprompted backbone on
positive steering and lower violation@10 on negative steering."""

import pytest

from dpr.config import ModelConfig, TrainConfig
from dpr.data import load_dataset
from dpr.data.prompts import PromptBank
from dpr.eval.protocol import build_context, evaluate
from dpr.train.pipeline import train


@pytest.fixture(scope="module")
def trained(text_encoder):
    ds = load_dataset("synthetic", num_users=600, num_items=800, seed=0)
    ck = train(ds, ModelConfig(max_len=30, d=32, fusion_hidden=64, expert_hidden=64),
               TrainConfig(stage1_epochs=15, stage2_epochs=4, stage2_steps_per_epoch=100, stage3_epochs=8,
                           stage3_steps_per_epoch=100,
                           batch_size=128, seed=0),
               text_encoder, log=lambda *a: None, val_users=300)
    return ds, ck


def test_dpr_steers(trained, text_encoder):
    ds, ck = trained
    model = ck.build_model()
    ctx = build_context(text_encoder, ds.catalogue, PromptBank())
    r = evaluate(model, ds, ctx, max_users=400, progress=False)
    assert r["standard"]["dpr"] == r["standard"]["backbone"]
    assert r["standard"]["backbone"]["ndcg@10"] > 0.03            # the backbone learned something
    pos, neg = r["positive"], r["negative"]
    assert pos["dpr"]["ndcg@10"] > 1.3 * pos["backbone"]["ndcg@10"]
    assert pos["dpr"]["tag_precision@10"] > pos["backbone"]["tag_precision@10"] + 0.1
    assert neg["dpr"]["violation@10"] < 0.8 * neg["backbone"]["violation@10"]
    # filters behave as defined
    assert pos["hard_filter"]["tag_precision@10"] == 1.0
    assert neg["hard_filter"]["violation@10"] == 0.0
    # post_filter_k filters the backbone's own top 10 in place: a target (it always passes the filter)
    # stays in the list and can only move up, and the list is a prefix of post_filter's
    for task in (pos, neg, r["compound"]):
        assert task["post_filter_k"]["recall@10"] == pytest.approx(task["backbone"]["recall@10"])
        assert task["backbone"]["ndcg@10"] <= task["post_filter_k"]["ndcg@10"] <= task["post_filter"]["ndcg@10"] + 1e-12
    assert pos["post_filter_k"]["ndcg@10"] > pos["backbone"]["ndcg@10"]
    assert neg["post_filter_k"]["violation@10"] == 0.0
    assert set(r) >= {"compound", "positive_heldout", "negative_heldout", "cases"}


def test_training_is_reproducible(text_encoder):
    ds = load_dataset("synthetic", num_users=80, num_items=100, seed=1)
    cfg = dict(stage1_epochs=1, stage2_epochs=1, stage2_steps_per_epoch=3, stage3_epochs=1,
               stage3_steps_per_epoch=3, batch_size=32, seed=5)
    a = train(ds, ModelConfig(max_len=8, d=8, fusion_hidden=8, expert_hidden=8), TrainConfig(**cfg), text_encoder,
              log=lambda *x: None, val_users=20)
    b = train(ds, ModelConfig(max_len=8, d=8, fusion_hidden=8, expert_hidden=8), TrainConfig(**cfg), text_encoder,
              log=lambda *x: None, val_users=20)
    for k in a.state_dict:
        assert (a.state_dict[k] == b.state_dict[k]).all(), k
