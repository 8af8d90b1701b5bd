"""Stage 1, collaborative: backbone + item table, next-item prediction at every position,
full-softmax cross-entropy over all items (by default without the items already in the window, which
the ranking never returns), optional warm-up + cosine learning rate, early stopping on validation
NDCG@10."""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from dpr.config import TrainConfig
from dpr.data.dataset import Dataset, left_pad
from dpr.train.chunked_ce import masked_ce, masked_logits, seen_items
from dpr.train.common import evaluate_standard, step_bar


def _windows(dataset: Dataset, users: np.ndarray, max_len: int,
             all_windows: bool = False, stride: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(input, next-item) training windows of max_len + 1 items. By default one per user: the newest
    max_len + 1 items of the training sequence. With ``all_windows`` the older part of a long history
    is cut into further windows too (on ML-1M the newest 200 items hold only 66% of the interactions),
    so no interaction is wasted; the windows still never cross into validation/test. Consecutive window
    ends are ``stride`` items apart (0: max_len, no overlap); a smaller stride also trains the first
    targets of each window with a long context."""
    if stride < 0 or stride > max_len:
        raise ValueError(f"stage1_window_stride must be in [0, max_len={max_len}], got {stride}")
    stride = stride or max_len
    inputs, targets = [], []
    for u in users:
        seq = dataset.train_sequence(int(u))
        end = len(seq)
        while end >= 2:
            s = seq[max(0, end - (max_len + 1)):end]
            inputs.append(s[:-1])
            targets.append(s[1:])
            if not all_windows:
                break
            if end - (max_len + 1) <= 0:
                break             # this window already starts at the sequence's first item
            end -= stride         # stride == max_len: the next window ends at this one's first input
    return left_pad(inputs, max_len), left_pad(targets, max_len)


def _batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
             bucketed: bool) -> list[tuple[np.ndarray, int]]:
    """One epoch's batches as (window indices, width to keep from the right). Plain: a random
    permutation cut every ``batch_size`` windows, all at full width. Bucketed: windows sorted by length
    (ties in random order) and cut into batches of about ``batch_size`` x mean-length padded tokens, each
    at its longest window's width, in random order. Equal token budgets keep about as many target
    positions per step (and steps per epoch) as plain batches, so the loss weights positions alike."""
    n = len(lengths)
    perm = rng.permutation(n)
    if n == 0:
        return []
    if not bucketed:
        return [(perm[s:s + batch_size], int(lengths.max())) for s in range(0, n, batch_size)]
    order = perm[np.argsort(-lengths[perm], kind="stable")]       # longest first; equal lengths shuffled
    budget = batch_size * max(float(lengths.mean()), 1.0)
    out, start = [], 0
    while start < n:
        width = max(int(lengths[order[start]]), 1)                 # the batch's longest window
        take = max(1, int(budget // width))
        out.append((order[start:start + take], width))
        start += take
    return [out[i] for i in rng.permutation(len(out))]


def check_stage1_config(cfg: TrainConfig) -> None:
    """Reject stage-1 settings that cannot train, before any work (the pipeline calls it up front)."""
    if not 0.0 <= cfg.stage1_label_smoothing < 1.0:
        raise ValueError(f"stage1_label_smoothing must be in [0, 1), got {cfg.stage1_label_smoothing}")
    if cfg.stage1_warmup_epochs < 0:
        raise ValueError(f"stage1_warmup_epochs must be >= 0, got {cfg.stage1_warmup_epochs}")
    if (cfg.stage1_batch_size or cfg.batch_size) < 1:
        raise ValueError(f"stage-1 batch size must be >= 1, got {cfg.stage1_batch_size or cfg.batch_size}")
    if cfg.stage1_lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"stage1_lr_schedule must be 'constant' or 'cosine', got {cfg.stage1_lr_schedule!r}")


def _lr_schedule(cfg: TrainConfig, steps_per_epoch: int):
    """lr(step, elapsed seconds): linear warm-up, then constant or cosine to 0. Under a wall-clock budget
    the cosine follows whichever runs out first, the epochs or the time, so a budgeted run still ends
    on a decayed learning rate."""
    check_stage1_config(cfg)      # an unknown schedule name must not silently run as cosine
    total = max(1, cfg.stage1_epochs * steps_per_epoch)
    warm = cfg.stage1_warmup_epochs * steps_per_epoch
    budget = 60.0 * cfg.stage1_max_minutes

    def lr_at(step: int, elapsed: float) -> float:
        if step < warm:
            return cfg.lr * (step + 1) / warm
        if cfg.stage1_lr_schedule == "constant":
            return cfg.lr
        done = (step - warm) / max(1.0, total - warm)
        if budget > 0:
            done = max(done, elapsed / budget)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))

    return lr_at


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy with label smoothing spread over the allowed (finite-logit) items only: torch's
    ``label_smoothing`` also puts mass on the -inf columns (padding, masked history) and returns inf."""
    if smoothing == 0:
        return F.cross_entropy(logits, target)
    logp = torch.log_softmax(logits, dim=-1)
    allowed = torch.isfinite(logits)
    nll = -logp.gather(1, target.unsqueeze(1)).squeeze(1)
    uniform = -torch.where(allowed, logp, 0.0).sum(1) / allowed.sum(1)
    return ((1.0 - smoothing) * nll + smoothing * uniform).mean()


def train_stage1(model, dataset: Dataset, cfg: TrainConfig, rng: np.random.Generator,
                 val_users: np.ndarray | None = None, log=print) -> dict:
    check_stage1_config(cfg)
    device = torch.device(cfg.device)
    model.to(device)          # stage 1 is the only costly stage; it alone runs on cfg.device (e.g. cuda)
    model.train()
    params = [p for n, p in model.named_parameters() if n.startswith(("item_emb", "backbone"))]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    users = np.array([u for u in range(dataset.num_users) if len(dataset.train_sequence(u)) >= 2])
    if cfg.max_train_users:
        users = users[: cfg.max_train_users]
    if cfg.stage1_length_buckets and not model.backbone.padding_invariant:
        raise ValueError(f"stage1_length_buckets needs a backbone whose output does not depend on left padding "
                         f"(sasrec); {model.cfg.backbone}'s state moves through padding steps, and serving pads "
                         f"every history to max_len")
    x_all, y_all = _windows(dataset, users, model.cfg.max_len, cfg.stage1_all_windows, cfg.stage1_window_stride)
    lengths = (x_all > 0).sum(1) if cfg.stage1_length_buckets else np.full(len(x_all), x_all.shape[1])
    batch_size = cfg.stage1_batch_size or cfg.batch_size
    steps_per_epoch = len(_batches(lengths, batch_size, np.random.default_rng(0), cfg.stage1_length_buckets))
    lr_at = _lr_schedule(cfg, steps_per_epoch)
    # On the CPU the history-masked loss runs in row chunks (dpr.train.chunked_ce: the same loss and
    # gradients, 7.9 -> 4.5 s per ML-1M SASRec step on 2 cores); a GPU keeps the one-matrix form.
    chunked = device.type == "cpu" and cfg.stage1_mask_history and cfg.stage1_label_smoothing == 0
    best, best_state, bad, history = -1.0, None, 0, []
    t0 = time.time()
    bar = step_bar("stage 1 (collaborative)", cfg.stage1_epochs, steps_per_epoch)
    for epoch in range(cfg.stage1_epochs):
        model.train()
        total, count = 0.0, 0
        for i, (idx, width) in enumerate(_batches(lengths, batch_size, rng, cfg.stage1_length_buckets)):
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch * steps_per_epoch + i, time.time() - t0)
            cols = slice(x_all.shape[1] - width, None)                # windows are left-padded
            x = torch.from_numpy(np.ascontiguousarray(x_all[idx, cols])).to(device, non_blocking=True)
            y = torch.from_numpy(np.ascontiguousarray(y_all[idx, cols])).to(device, non_blocking=True)
            hidden = model.backbone.forward_all(x)                 # (B, L, d)
            sel = y > 0
            # each position's earlier items in the window (the ranking never returns them), target excepted
            seen = seen_items(x, y, sel) if cfg.stage1_mask_history else None
            if chunked:
                loss = masked_ce(hidden[sel], model.item_table, y[sel], seen)
            else:                                                  # the (M, N + 1) logits at once
                loss = _cross_entropy(masked_logits(hidden[sel], model.item_table, seen), y[sel],
                                      cfg.stage1_label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.item_emb.weight[0].zero_()
            total += loss.detach() * len(idx)
            count += len(idx)
            bar.update(1)
        row = {"epoch": epoch + 1, "loss": float(total) / max(count, 1), "seconds": round(time.time() - t0, 1)}
        out_of_time = bool(cfg.stage1_max_minutes) and time.time() - t0 > 60 * cfg.stage1_max_minutes
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.stage1_epochs or out_of_time:
            row.update(evaluate_standard(model, dataset, "valid", val_users))
            score = row["ndcg@10"]
            if score > best:
                best, bad = score, 0
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
                              if k.startswith(("item_emb", "backbone"))}
            else:
                bad += 1
        history.append(row)
        bar.set_postfix({k: round(v, 4) for k, v in row.items()})
        if bad >= cfg.patience:
            log(f"stage 1: early stop at epoch {epoch + 1} (best valid ndcg@10 {best:.4f})")
            break
        if out_of_time:
            log(f"stage 1: time budget of {cfg.stage1_max_minutes:g} min reached at epoch {epoch + 1}")
            break
    bar.close()
    model.cpu()               # later stages and checkpoints work on the CPU copy
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    log(f"stage 1: best valid ndcg@10 {best:.4f} in {time.time() - t0:.0f}s")
    return {"best_valid_ndcg@10": best, "epochs": len(history), "seconds": time.time() - t0, "history": history}
