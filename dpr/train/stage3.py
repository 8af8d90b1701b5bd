"""Stage 3, steering: Fusion + MoE (+ P) trained with the backbone frozen, on a mix of positive,
negative and compound examples. Loss, over the catalogue minus each example's history (the ranking
never returns it): cross-entropy on the target; for negative prompts
``neg_lambda * -log(1 - softmax mass on the forbidden tag's items)``; for rows with only a negative
prompt ``neg_keep_lambda * KL(backbone || steered)`` over the allowed items, so suppressing a tag
keeps the backbone's order among the rest (the order the hard filter ranks by)."""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.nn.functional as F

from dpr.config import TrainConfig
from dpr.data.cases import build_eval_cases, sample_steering_batch
from dpr.data.dataset import Dataset
from dpr.model.moe import POLARITY_NEGATIVE, POLARITY_POSITIVE
from dpr.train.common import step_bar

STEERED = ("fusion", "moe", "projection", "tag_head", "tag_log_scale")


def steering_loss(logits: torch.Tensor, targets: torch.Tensor, forbidden: torch.Tensor,
                  has_neg: torch.Tensor, neg_lambda: float) -> torch.Tensor:
    """CE on the target + lambda * -log(1 - mass on forbidden items) for rows with a negative prompt."""
    ce = F.cross_entropy(logits, targets)
    if not bool(has_neg.any()):
        return ce
    logp = torch.log_softmax(logits[has_neg], dim=1)
    log_mass = torch.logsumexp(logp.masked_fill(~forbidden[has_neg], float("-inf")), dim=1)
    # -log(1 - mass), computed stably as -log1p(-exp(log_mass)); clamp keeps it finite when mass -> 1
    penalty = -torch.log1p(-torch.exp(log_mass).clamp(max=1 - 1e-6))
    return ce + neg_lambda * penalty.mean()


def tag_mass_loss(logits: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -log(softmax mass on the ``wanted`` items) (B, N + 1 bool, at least one finite wanted
    item per row): a positive prompt asks for the tag's items, all of the top-k, not only the one target."""
    log_all = torch.logsumexp(logits, dim=1)
    log_wanted = torch.logsumexp(logits.masked_fill(~wanted, float("-inf")), dim=1)
    return (log_all - log_wanted).mean()


def keep_order_loss(base_logits: torch.Tensor, steered_logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(p_base || p_steered), both softmaxes taken over the ``allowed`` items only
    (B, N + 1 bool; each row must allow at least one item). Zero when steering leaves the order and the
    relative scores of the allowed items as the backbone had them; the hard filter's ranking is exactly
    the backbone's order over the allowed items, so this pulls `dpr_hard_filter` towards it while the
    CE term pushes beyond it."""
    neg_inf = float("-inf")
    lb = torch.log_softmax(base_logits.masked_fill(~allowed, neg_inf), dim=1)
    ls = torch.log_softmax(steered_logits.masked_fill(~allowed, neg_inf), dim=1)
    kl = torch.where(allowed, lb.exp() * (lb - ls), 0.0).sum(1)
    return kl.mean()


def history_mask(histories: torch.Tensor, targets: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) bool: each row's history items, which the ranking never returns (the evaluation and the
    engine exclude them), so the steering need not spend its shift on pushing them down. The target
    is never masked (a re-consumed item stays learnable); padding (0) is masked anyway."""
    seen = torch.zeros(histories.shape[0], n, dtype=torch.bool).scatter_(1, histories, True)
    seen[torch.arange(len(targets)), targets] = False
    return seen


def steering_score(results: dict) -> float:
    """Model selection: NDCG of steered cases plus a small bonus for tag precision, minus violations."""
    pos, neg = results.get("positive", {}), results.get("negative", {})
    return (pos.get("ndcg@10", 0.0) + neg.get("ndcg@10", 0.0)
            + 0.1 * (pos.get("tag_precision@10", 0.0) - neg.get("violation@10", 0.0)))


def check_stage3_config(cfg: TrainConfig, allow_auto: bool = False) -> None:
    """Reject stage-3 settings that cannot train, before any work (the pipeline calls it up front, with
    ``allow_auto``: -1 for pos_lambda / pos_keep_lambda means the pipeline chooses them on validation)."""
    if cfg.neg_lambda < 0 or cfg.neg_keep_lambda < 0:
        raise ValueError(f"neg_lambda and neg_keep_lambda must be >= 0, got {cfg.neg_lambda} and {cfg.neg_keep_lambda}")
    if (cfg.stage3_epochs < 0 or cfg.stage3_steps_per_epoch < 0 or cfg.stage3_examples_per_user <= 0
            or cfg.stage3_min_steps < 0):
        raise ValueError("stage3_epochs and stage3_steps_per_epoch must be >= 0 (0: chosen from the dataset) and "
                         f"stage3_examples_per_user > 0, stage3_min_steps >= 0, got {cfg.stage3_epochs}, "
                         f"{cfg.stage3_steps_per_epoch}, {cfg.stage3_examples_per_user}, {cfg.stage3_min_steps}")
    if cfg.stage3_patience < 1 or not 0 <= cfg.neg_max_violation <= 1:
        raise ValueError(f"stage3_patience must be >= 1 and neg_max_violation in [0, 1], got {cfg.stage3_patience} "
                         f"and {cfg.neg_max_violation}")
    auto = (-1.0,) if allow_auto else ()
    if any(v < 0 and v not in auto for v in (cfg.pos_lambda, cfg.pos_keep_lambda)):
        raise ValueError(f"pos_lambda and pos_keep_lambda must be >= 0{' (or -1: chosen on validation)' if auto else ''}"
                         f", got {cfg.pos_lambda} and {cfg.pos_keep_lambda}")


def train_stage3(model, dataset: Dataset, cfg: TrainConfig, rng: np.random.Generator, ctx,
                 validate: bool = True, val_users: int = 1000, log=print, stand_ins=None) -> dict:
    from dpr.eval.protocol import run_task

    check_stage3_config(cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if n.startswith(STEERED)]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.stage3_lr, weight_decay=cfg.weight_decay)
    item_tags = torch.from_numpy(dataset.catalogue.item_tags)
    users = np.arange(dataset.num_users)
    if cfg.max_train_users:
        users = users[: cfg.max_train_users]
    mix = (cfg.mix_positive, cfg.mix_negative, cfg.mix_compound)
    val_cases = {}
    table = ctx.table     # only the training wordings (indices < ctx.train_wordings[pol]) are used
    if validate:
        for task in ("positive", "negative"):
            val_cases[task] = build_eval_cases(dataset, "valid", task, seed=cfg.seed, max_users=val_users,
                                               window=cfg.recent_window)
    t0, history = time.time(), []
    best, best_state, bad = -float("inf"), None, 0
    bar = step_bar("stage 3 (steering)", cfg.stage3_epochs, cfg.stage3_steps_per_epoch)
    for epoch in range(cfg.stage3_epochs):
        model.train()
        model.backbone.eval()                       # frozen: no dropout noise in h
        total, steps = 0.0, 0
        for _ in range(cfg.stage3_steps_per_epoch):
            bar.update(1)
            batch = sample_steering_batch(dataset, rng.choice(users, size=cfg.batch_size), rng, mix=mix,
                                          window=cfg.recent_window, max_len=model.cfg.max_len)
            if len(batch) == 0:
                continue
            b = len(batch)
            has_pos, has_neg = batch.pos_tag >= 0, batch.neg_tag >= 0
            if not (has_pos.any() or has_neg.any()):
                continue
            with torch.no_grad():
                h = model.user_vector(torch.from_numpy(batch.histories))
            t_pos = table.lookup(POLARITY_POSITIVE, rng.integers(ctx.train_wordings[POLARITY_POSITIVE], size=b),
                                 batch.pos_tag)
            t_neg = table.lookup(POLARITY_NEGATIVE, rng.integers(ctx.train_wordings[POLARITY_NEGATIVE], size=b),
                                 batch.neg_tag)
            if stand_ins:
                t_pos = stand_ins.mix(t_pos, batch.pos_tag, rng)
                t_neg = stand_ins.mix(t_neg, batch.neg_tag, rng)
            presence = torch.from_numpy(np.stack([has_pos, has_neg], axis=1).astype(np.int64))
            h2 = model.retrieval_vector(h, model.project_prompt(t_pos), model.project_prompt(t_neg), presence)
            table_r = model.retrieval_table
            logits = h2 @ table_r.t()
            targets = torch.from_numpy(batch.targets)
            if cfg.stage3_mask_history:
                logits = logits.masked_fill(history_mask(torch.from_numpy(batch.histories), targets,
                                                         logits.shape[1]), float("-inf"))
            logits[:, 0] = float("-inf")
            forbidden = item_tags[:, np.maximum(batch.neg_tag, 0)].t()
            # rows with no prompt carry no trainable signal (h' == h); they are left out of the loss
            rows = torch.from_numpy(has_pos | has_neg)
            loss = steering_loss(logits[rows], targets[rows], forbidden[rows],
                                 torch.from_numpy(has_neg)[rows], cfg.neg_lambda)
            neg_only = torch.from_numpy(has_neg & ~has_pos)
            if cfg.neg_keep_lambda and bool(neg_only.any()):
                steered = logits[neg_only]                  # only these rows enter the term
                allowed = ~forbidden[neg_only] & torch.isfinite(steered)
                with torch.no_grad():
                    base = h[neg_only] @ model.item_table.t()     # = lift(h) @ retrieval table
                loss = loss + cfg.neg_keep_lambda * keep_order_loss(base, steered, allowed)
            with_pos = torch.from_numpy(has_pos)
            if (cfg.pos_lambda or cfg.pos_keep_lambda) and bool(with_pos.any()):
                steered = logits[with_pos]
                wanted = item_tags[:, np.maximum(batch.pos_tag, 0)].t()[with_pos]
                allowed = wanted & ~torch.where(torch.from_numpy(has_neg)[with_pos, None], forbidden[with_pos], False)
                allowed &= torch.isfinite(steered)
                keep = allowed.any(1)
                if bool(keep.any()):
                    steered, allowed = steered[keep], allowed[keep]
                    if cfg.pos_lambda:
                        loss = loss + cfg.pos_lambda * tag_mass_loss(steered, allowed)
                    if cfg.pos_keep_lambda:
                        with torch.no_grad():
                            base = h[with_pos][keep] @ model.item_table.t()
                        loss = loss + cfg.pos_keep_lambda * keep_order_loss(base, steered, allowed)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            steps += 1
        row = {"epoch": epoch + 1, "loss": total / max(steps, 1)}
        if val_cases:
            res = {task: run_task(model, dataset.catalogue, c, ctx, seed=cfg.seed, methods=("dpr",))["dpr"]
                   for task, c in val_cases.items() if len(c)}
            row.update({f"{t}_{m}": v for t, r in res.items() for m, v in r.items()})
            score = steering_score(res)
            row["score"] = score
            if score > best:
                best, bad = score, 0
                best_state = copy.deepcopy({k: v for k, v in model.state_dict().items() if k.startswith(STEERED)})
            else:
                bad += 1
        history.append(row)
        bar.set_postfix(epoch=epoch + 1, loss=round(row["loss"], 4), score=round(row.get("score", 0.0), 4))
        if bad >= cfg.stage3_patience:
            log(f"stage 3: early stop at epoch {epoch + 1}")
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    model.eval()
    log(f"stage 3: best valid steering score {best:.4f} in {time.time() - t0:.0f}s")
    out = {"best_valid_score": best, "epochs": len(history), "seconds": time.time() - t0, "history": history}
    if cfg.stage3_calibrate and val_cases:
        from dpr.train.calibrate import CALIBRATION_USERS, calibrate_shift_scales

        shift_cases = None
        if model.cfg.tag_channel:              # the shift-alone pass: all validation users, compound too
            shift_cases = {task: build_eval_cases(dataset, "valid", task, seed=cfg.seed, max_users=CALIBRATION_USERS,
                                                  window=cfg.recent_window) for task in (*val_cases, "compound")}
        out["calibration"] = cal = calibrate_shift_scales(model, dataset.catalogue, val_cases, ctx, seed=cfg.seed,
                                                          max_violation=cfg.neg_max_violation, shift_cases=shift_cases)
        out["calibration_users"] = {t: len(c) for t, c in (shift_cases or val_cases).items()}
        chosen = {t: c["final"] for t, c in cal.items() if isinstance(c, dict) and "final" in c}
        if chosen:
            out["calibrated_score"] = steering_score(chosen)
        log("stage 3: shift scales chosen on validation: "
            + (", ".join(f"{t} x{c['scale']:g}" + (f" (shift of h alone x{c['shift_scale']:g})" if "shift_scale" in c
                                                 else "") for t, c in cal.items() if isinstance(c, dict)) or str(cal)))
    return out
