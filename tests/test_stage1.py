"""Stage-1 training pieces: the training windows, the learning-rate schedule and the history mask,
each against a brute-force statement of what it should do."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dpr.config import ModelConfig, TrainConfig
from dpr.data.dataset import Catalogue, Dataset
from dpr.train.stage1 import _lr_schedule, _windows, train_stage1


def _seen_mask(x: torch.Tensor, y: torch.Tensor, n: int) -> torch.Tensor:
    """The oracle of the history mask, written independently of ``seen_items``: (B, L, N + 1) bool, True
    where the item occurred in the window up to and including position t's input; the target never."""
    b, l = x.shape
    t = torch.arange(l)
    first = torch.full((b, n), l, dtype=torch.long)
    first.scatter_reduce_(1, x, t.expand(b, l), reduce="amin")     # first position of each item, l if absent
    seen = first.unsqueeze(1) <= t.view(1, l, 1)
    seen[..., 0] = False
    seen.scatter_(2, y.unsqueeze(-1), False)
    return seen


def _dataset(lengths, num_items=50, seed=0):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(1, num_items + 1, size=n).astype(np.int64) for n in lengths]
    cat = Catalogue(ids=[str(i) for i in range(1, num_items + 1)], titles=[f"t{i}" for i in range(num_items)],
                    tags=[["a" if i % 2 else "b"] for i in range(num_items)])
    return Dataset("t", cat, [str(u) for u in range(len(lengths))], seqs)


def _pairs(x, y):
    """The (context tuple, target) training pairs a batch of windows holds."""
    out = set()
    for xi, yi in zip(x, y):
        for t in range(len(xi)):
            if yi[t] > 0:
                ctx = tuple(int(v) for v in xi[: t + 1] if v > 0)
                out.add((ctx, int(yi[t])))
    return out


@pytest.mark.parametrize("max_len,stride", [(m, s) for m in (1, 4, 7) for s in (0, 1, 3) if s <= m])
def test_windows_cover_every_training_target_and_never_cross_into_evaluation(max_len, stride):
    ds = _dataset([1, 2, 3, 5, 9, 10, 23, 31])
    users = np.arange(ds.num_users)
    x, y = _windows(ds, users, max_len, all_windows=True, stride=stride)
    assert x.shape == y.shape and x.shape[1] == max_len
    pairs = _pairs(x, y)
    for u in users:
        seq = ds.train_sequence(int(u))
        train_targets = {int(v) for v in seq[1:]}
        got = {t for _, t in pairs}
        assert train_targets <= got
        for ctx, tgt in pairs:     # every context is a contiguous slice of some training sequence
            assert len(ctx) <= max_len
    # every target's context is at most max_len items of the true prefix, and at least one item
    assert all(1 <= len(c) <= max_len for c, _ in pairs)
    held_out = {int(s[-1]) for s in ds.sequences if len(s) >= 3} | {int(s[-2]) for s in ds.sequences if len(s) >= 3}
    # no window reaches into the last two items of a user with >= 3 items
    for xi, yi in zip(x, y):
        row = [int(v) for v in np.concatenate([xi[xi > 0][:1], yi[yi > 0]])]
        assert any(row == list(ds.train_sequence(u)[i:i + len(row)]) for u in users
                   for i in range(len(ds.train_sequence(u)) - len(row) + 1))
    assert held_out  # the fixture has evaluation items at all


def test_windows_stride_adds_overlap_and_default_is_disjoint():
    ds = _dataset([40])
    ds.sequences[0] = np.arange(1, 41, dtype=np.int64)   # distinct items, so a target names its position
    seq = ds.train_sequence(0)                         # 38 items -> 37 targets
    x0, y0 = _windows(ds, np.array([0]), 10, all_windows=True)
    assert int((y0 > 0).sum()) == len(seq) - 1        # non-overlapping: each target exactly once
    for stride in (5, 2):
        x1, y1 = _windows(ds, np.array([0]), 10, all_windows=True, stride=stride)
        assert len(x1) > len(x0) and int((y1 > 0).sum()) > len(seq) - 1
        longest = {}                                   # target -> its longest context over all windows
        for xi, yi in zip(x1, y1):
            for t in range(10):
                if yi[t] > 0:
                    longest[int(yi[t])] = max(longest.get(int(yi[t]), 0), int((xi[: t + 1] > 0).sum()))
        # overlap: every target past the first window sees at least max_len - stride + 1 items of context
        assert min(c for j, c in longest.items() if j > 10) == 10 - stride + 1
    xn, _ = _windows(ds, np.array([0]), 10, all_windows=False, stride=5)
    assert len(xn) == 1


@pytest.mark.parametrize("stride", [-1, 11])
def test_windows_reject_bad_stride(stride):
    with pytest.raises(ValueError, match="stage1_window_stride"):
        _windows(_dataset([12]), np.array([0]), 10, all_windows=True, stride=stride)


def test_lr_schedule_warmup_cosine_and_time_budget():
    cfg = TrainConfig(lr=0.01, stage1_epochs=10, stage1_lr_schedule="cosine", stage1_warmup_epochs=1)
    lr = _lr_schedule(cfg, steps_per_epoch=10)
    assert lr(0, 0) == pytest.approx(0.001)                # warm-up starts low and rises linearly
    assert lr(4, 0) == pytest.approx(0.005)
    assert lr(10, 0) == pytest.approx(0.01)                 # peak right after warm-up
    assert lr(55, 0) == pytest.approx(0.005)                # half-way through the cosine
    assert lr(100, 0) == pytest.approx(0.0, abs=1e-12)
    assert all(lr(s, 0) >= lr(s + 1, 0) for s in range(10, 100))
    timed = TrainConfig(lr=0.01, stage1_epochs=1000, stage1_lr_schedule="cosine", stage1_max_minutes=1.0)
    lr_t = _lr_schedule(timed, steps_per_epoch=10)
    assert lr_t(5, 30.0) == pytest.approx(0.005)            # the time budget runs out before the epochs
    assert lr_t(5, 0.0) == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 5 / 10000)))
    const = _lr_schedule(TrainConfig(lr=0.02), steps_per_epoch=10)
    assert const(0, 0) == const(10 ** 6, 10 ** 6) == 0.02
    with pytest.raises(ValueError, match="stage1_lr_schedule"):
        _lr_schedule(TrainConfig(stage1_lr_schedule="linear"), 10)


def test_seen_mask_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    b, l, n = 5, 9, 13
    x = torch.randint(0, n, (b, l), generator=g)          # repeats and padding (0) included
    x[0, :4] = 0
    y = torch.randint(1, n, (b, l), generator=g)
    y[1, 3] = x[1, 2]                                      # a target that re-occurs in its own prefix
    m = _seen_mask(x, y, n)
    assert m.shape == (b, l, n)
    for i in range(b):
        for t in range(l):
            want = {int(v) for v in x[i, : t + 1] if v > 0} - {int(y[i, t])}
            assert {int(j) for j in torch.nonzero(m[i, t]).flatten()} == want


@pytest.mark.parametrize("options", [
    dict(stage1_lr_schedule="cosine", stage1_warmup_epochs=0.5, stage1_batch_size=32),
    dict(stage1_mask_history=True, stage1_label_smoothing=0.1, stage1_all_windows=True, stage1_window_stride=3),
])
def test_stage1_options_train(small_dataset, options):
    from dpr.model.dpr_model import DPRModel

    torch.manual_seed(0)
    model = DPRModel(ModelConfig(num_items=small_dataset.num_items, num_tags=small_dataset.catalogue.num_tags,
                                 d=16, max_len=8))
    cfg = TrainConfig(stage1_epochs=4, batch_size=64, lr=5e-3, **options)
    res = train_stage1(model, small_dataset, cfg, np.random.default_rng(0), log=lambda *a: None)
    losses = [h["loss"] for h in res["history"]]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert res["best_valid_ndcg@10"] > 0


def test_cross_entropy_smoothing_ignores_masked_columns():
    from dpr.train.stage1 import _cross_entropy

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 9, generator=g)
    target = torch.tensor([1, 2, 3, 4, 5, 8])
    assert torch.allclose(_cross_entropy(logits, target, 0.0), torch.nn.functional.cross_entropy(logits, target))
    # without masked columns it is torch's label smoothing
    assert torch.allclose(_cross_entropy(logits, target, 0.2),
                          torch.nn.functional.cross_entropy(logits, target, label_smoothing=0.2), atol=1e-6)
    # masked columns (-inf) take no smoothing mass: equal to smoothing over the remaining columns
    masked = logits.clone()
    masked[:, 0] = float("-inf")
    got = _cross_entropy(masked, target, 0.2)
    want = torch.nn.functional.cross_entropy(logits[:, 1:], target - 1, label_smoothing=0.2)
    assert torch.isfinite(got) and torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("bad,match", [
    (dict(stage1_label_smoothing=1.0), "stage1_label_smoothing"),
    (dict(stage1_label_smoothing=-0.1), "stage1_label_smoothing"),
    (dict(stage1_warmup_epochs=-1), "stage1_warmup_epochs"),
    (dict(stage1_batch_size=-4), "batch size"),
    (dict(stage1_lr_schedule="step"), "stage1_lr_schedule"),
])
def test_stage1_rejects_bad_settings_before_training(small_dataset, bad, match):
    from dpr.model.dpr_model import DPRModel

    model = DPRModel(ModelConfig(num_items=small_dataset.num_items, num_tags=small_dataset.catalogue.num_tags,
                                 d=8, max_len=6))
    with pytest.raises(ValueError, match=match):
        train_stage1(model, small_dataset, TrainConfig(stage1_epochs=1, **bad), np.random.default_rng(0),
                     log=lambda *a: None)


def _masked_batch(seed, b=6, l=11, n=30, d=7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, n + 1, (b, l), generator=g)
    x[0, :5] = 0                                            # left padding
    x[1, 7] = x[1, 2]                                       # a repeat
    y = torch.randint(1, n + 1, (b, l), generator=g)
    y[x == 0] = 0
    y[2, 6] = x[2, 1]                                       # a target re-consumed from its own prefix
    sel = y > 0
    h = torch.randn(int(sel.sum()), d, generator=g, dtype=torch.float64)
    table = torch.randn(n + 1, d, generator=g, dtype=torch.float64)
    return x, y, sel, h, table


def test_seen_items_are_the_seen_mask_rows():
    from dpr.train.chunked_ce import seen_items

    x, y, sel, _, table = _masked_batch(3)
    seen = seen_items(x, y, sel)
    ref = _seen_mask(x, y, table.shape[0])[sel]
    assert seen.shape == (int(sel.sum()), x.shape[1])
    for i in range(seen.shape[0]):
        assert {int(v) for v in seen[i] if v > 0} == {int(j) for j in torch.nonzero(ref[i]).flatten()}


@pytest.mark.parametrize("chunk", [1, 3, 16, 10 ** 6])
def test_chunked_masked_ce_matches_the_one_matrix_loss_and_gradients(chunk):
    """Loss and both gradients of the chunked history-masked cross-entropy equal stage 1's one-matrix form
    (logits, _seen_mask, F.cross_entropy), in float64, for chunk sizes that split rows every way."""
    from dpr.train.chunked_ce import masked_ce, masked_ce_reference, seen_items

    x, y, sel, h, table = _masked_batch(chunk)
    h1, t1 = h.clone().requires_grad_(True), table.clone().requires_grad_(True)
    logits = (h1 @ t1.t()).masked_fill(_seen_mask(x, y, table.shape[0])[sel], float("-inf"))
    logits[:, 0] = float("-inf")
    ref = torch.nn.functional.cross_entropy(logits, y[sel])
    (3.0 * ref).backward()
    h2, t2 = h.clone().requires_grad_(True), table.clone().requires_grad_(True)
    got = masked_ce(h2, t2, y[sel], seen_items(x, y, sel), chunk=chunk)
    (3.0 * got).backward()
    assert torch.allclose(got, ref, rtol=0, atol=1e-12)
    assert torch.allclose(h2.grad, h1.grad, atol=1e-12) and torch.allclose(t2.grad, t1.grad, atol=1e-12)
    assert t2.grad[0].abs().max() == 0                      # the padding row is never a candidate
    spec = masked_ce_reference(h, table, y[sel], seen_items(x, y, sel))
    assert torch.allclose(spec, ref, atol=1e-12)


def test_stage1_takes_the_chunked_loss_on_the_cpu(small_dataset, monkeypatch):
    """Stage 1 on the CPU uses the chunked loss when the history mask is on and there is no smoothing, and
    the one-matrix form otherwise (label smoothing)."""
    import dpr.train.stage1 as s1
    from dpr.model.dpr_model import DPRModel

    calls = []
    real = s1.masked_ce
    monkeypatch.setattr(s1, "masked_ce", lambda *a, **k: calls.append(1) or real(*a, **k))
    for smoothing, expect in ((0.0, True), (0.1, False)):
        calls.clear()
        torch.manual_seed(0)
        model = DPRModel(ModelConfig(num_items=small_dataset.num_items, num_tags=small_dataset.catalogue.num_tags,
                                     d=16, max_len=8))
        cfg = TrainConfig(stage1_epochs=2, batch_size=64, lr=5e-3, stage1_label_smoothing=smoothing)
        res = s1.train_stage1(model, small_dataset, cfg, np.random.default_rng(0), log=lambda *a: None)
        assert bool(calls) is expect and all(np.isfinite(h["loss"]) for h in res["history"])


def test_plain_batches_are_the_old_permutation_at_full_width():
    from dpr.train.stage1 import _batches

    lengths = np.array([3, 10, 1, 7, 10, 2, 5])
    got = _batches(lengths, 3, np.random.default_rng(4), bucketed=False)
    perm = np.random.default_rng(4).permutation(len(lengths))      # what stage 1 always drew per epoch
    assert [list(i) for i, _ in got] == [list(perm[0:3]), list(perm[3:6]), list(perm[6:])]
    assert {w for _, w in got} == {10}
    for bucketed in (False, True):                                  # no windows: no batches, no warning
        assert _batches(np.zeros(0, np.int64), 3, np.random.default_rng(0), bucketed) == []


def test_length_buckets_cover_every_window_once_within_the_token_budget():
    from dpr.train.stage1 import _batches

    rng = np.random.default_rng(0)
    lengths = np.concatenate([np.full(40, 200), rng.integers(1, 200, 300)])
    budget = 16 * lengths.mean()
    orders = []
    for epoch in range(3):
        got = _batches(lengths, 16, rng, bucketed=True)
        idx = np.concatenate([i for i, _ in got])
        assert sorted(idx.tolist()) == list(range(len(lengths)))    # each window exactly once
        for i, w in got:
            assert w == lengths[i].max()                            # cut to its longest window, no shorter
            assert len(i) * w <= budget or len(i) == 1
        widths = sorted(w for _, w in got)
        assert widths[len(widths) // 2] < 200                       # most batches are narrower than max_len
        orders.append([w for _, w in got])
    assert len({len(o) for o in orders}) == 1                       # a fixed number of steps per epoch
    assert orders[0] != orders[1]                                   # batches come in a new order each epoch


def test_a_trimmed_sasrec_batch_has_the_full_width_loss_and_gradients():
    """What length buckets rely on: cutting a left-padded batch to its longest window changes neither
    the history-masked loss nor any gradient (SASRec, no dropout)."""
    from dpr.model.dpr_model import DPRModel
    from dpr.train.chunked_ce import masked_ce, seen_items

    torch.manual_seed(0)
    model = DPRModel(ModelConfig(num_items=30, num_tags=3, d=16, max_len=12, num_blocks=2, dropout=0.0)).double()
    model.train()
    g = torch.Generator().manual_seed(1)
    x = torch.zeros(4, 12, dtype=torch.int64)
    y = torch.zeros(4, 12, dtype=torch.int64)
    for r, n in enumerate((7, 3, 5, 7)):                            # longest window 7 of max_len 12
        x[r, 12 - n:] = torch.randint(1, 31, (n,), generator=g)
        y[r, 12 - n:] = torch.randint(1, 31, (n,), generator=g)

    def loss_and_grads(xb, yb):
        model.zero_grad()
        sel = yb > 0
        loss = masked_ce(model.backbone.forward_all(xb)[sel], model.item_table, yb[sel], seen_items(xb, yb, sel))
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    full, g_full = loss_and_grads(x, y)
    cut, g_cut = loss_and_grads(x[:, 5:], y[:, 5:])
    assert torch.allclose(full, cut, atol=1e-12)
    assert g_full.keys() == g_cut.keys() and any("pos_emb" in k for k in g_full)
    for k in g_full:
        assert torch.allclose(g_full[k], g_cut[k], atol=1e-10), k


def test_length_buckets_train_sasrec_and_refuse_a_recurrent_backbone(small_dataset):
    from dpr.model.dpr_model import DPRModel

    for backbone in ("sasrec", "gru4rec"):
        torch.manual_seed(0)
        model = DPRModel(ModelConfig(num_items=small_dataset.num_items, num_tags=small_dataset.catalogue.num_tags,
                                     d=16, max_len=8, backbone=backbone))
        cfg = TrainConfig(stage1_epochs=4, batch_size=16, lr=5e-3, stage1_length_buckets=True,
                          stage1_all_windows=True)
        if backbone == "gru4rec":
            with pytest.raises(ValueError, match="stage1_length_buckets.*gru4rec"):
                train_stage1(model, small_dataset, cfg, np.random.default_rng(0), log=lambda *a: None)
            continue
        res = train_stage1(model, small_dataset, cfg, np.random.default_rng(0), log=lambda *a: None)
        losses = [h["loss"] for h in res["history"]]
        assert all(np.isfinite(losses)) and losses[-1] < losses[0] and res["best_valid_ndcg@10"] > 0



RECIPES = sorted((Path(__file__).resolve().parent.parent / "configs").glob("ml1m-*.json"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_ml1m_recipes_load_and_only_sasrec_buckets(path):
    """Every recipe in configs/ is a valid {model, train} pair that stage 1 accepts; only a backbone whose
    output ignores left padding is trained in length buckets."""
    from dpr.config import from_dict
    from dpr.model.backbones import BACKBONES
    from dpr.train.stage1 import check_stage1_config

    cfg = json.loads(path.read_text())
    model, train = from_dict(ModelConfig, cfg["model"]), from_dict(TrainConfig, cfg["train"])
    check_stage1_config(train)
    assert not train.stage1_length_buckets or BACKBONES[model.backbone].padding_invariant


def test_the_cpu_recipes_put_stage1_on_a_clock_that_fits_90_minutes():
    cpu = [json.loads(p.read_text())["train"] for p in RECIPES if p.name.endswith("-cpu.json")]
    assert len(cpu) == 2 and all(t.get("stage1_max_minutes", 0) > 0 for t in cpu)
    assert sum(t["stage1_max_minutes"] for t in cpu) <= 80       # stages 2-3 + evaluation: about 6 min here
