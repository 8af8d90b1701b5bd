"""The negative-weight sweep of the hybrid (dpr.eval.hybrid): weight 1 is dpr-eval's dpr_hard_filter, weight 0
on negative-only requests is the hard filter itself (no steering left), bad weights are refused."""

import pytest

from dpr.checkpoint import load_checkpoint
from dpr.data.prompts import PromptBank
from dpr.eval.hybrid import format_sweep, main, negative_weight_sweep
from dpr.eval.protocol import build_context, evaluate


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, small_dataset, text_encoder):
    ck = load_checkpoint(tiny_checkpoint)
    ctx = build_context(text_encoder, small_dataset.catalogue, PromptBank(heldout=ck.train_config.heldout_templates))
    return ck.build_model(), small_dataset, ctx, ck.train_config.recent_window


def test_sweep_ends_are_the_trained_hybrid_and_the_filter(setup):
    model, ds, ctx, window = setup
    sweep = negative_weight_sweep(model, ds, ctx, weights=(0.0, 0.5, 1.0), splits=("test",), max_users=150,
                                  window=window)
    full = evaluate(model, ds, ctx, split="test", tasks=("negative", "compound"), heldout=False, max_users=150,
                    window=window, progress=False)
    for task in ("negative", "compound"):
        row = sweep["test"][task]
        assert row["cases"] == full["cases"][task]
        assert row["weights"][1.0] == full[task]["dpr_hard_filter"]          # weight 1: DPR as trained
        assert row["hard_filter"] == full[task]["hard_filter"]
    neg = sweep["test"]["negative"]
    assert neg["weights"][0.0] == neg["hard_filter"]                         # nothing steers: the filter
    assert neg["weights"][0.0]["violation@10"] == 0.0
    table = format_sweep(sweep)
    assert "| dpr_hard_filter, w = 0.5 |" in table and table.count("\n") == 5


def test_run_task_refuses_a_weight_outside_0_1(setup):
    from dpr.data.cases import build_eval_cases
    from dpr.eval.protocol import run_task

    model, ds, ctx, window = setup
    cases = build_eval_cases(ds, split="test", task="negative", max_users=20, window=window)
    with pytest.raises(ValueError, match="negative_weight"):
        run_task(model, ds.catalogue, cases, ctx, negative_weight=1.5)


@pytest.mark.parametrize("weights", ["0,x", "2", ""])
def test_cli_names_bad_weights(tiny_checkpoint, weights, capsys):
    assert main([str(tiny_checkpoint), "--dataset", "synthetic", "--weights", weights]) == 2
    assert "--weights" in capsys.readouterr().err
