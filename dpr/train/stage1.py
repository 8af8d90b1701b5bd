"""Stage 1, collaborative: backbone + item table, next-item prediction at every position,
full-softmax cross-entropy over all items, early stopping on validation NDCG@10."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dpr.config import TrainConfig
from dpr.data.dataset import Dataset, left_pad
from dpr.train.common import evaluate_standard


def _windows(dataset: Dataset, users: np.ndarray, max_len: int,
             all_windows: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(input, next-item) training windows of max_len + 1 items. By default one per user: the newest
    max_len + 1 items of the training sequence. With ``all_windows`` the older part of a long history
    is cut into further non-overlapping windows too (on ML-1M the newest 200 items hold only 66% of the
    interactions), so no interaction is wasted; the windows still never cross into validation/test."""
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
            end -= max_len        # the next window ends where this one's first target was its input
    return left_pad(inputs, max_len), left_pad(targets, max_len)


def train_stage1(model, dataset: Dataset, cfg: TrainConfig, rng: np.random.Generator,
                 val_users: np.ndarray | None = None, log=print) -> dict:
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
    x_all, y_all = _windows(dataset, users, model.cfg.max_len, cfg.stage1_all_windows)
    best, best_state, bad, history = -1.0, None, 0, []
    t0 = time.time()
    bar = tqdm(range(cfg.stage1_epochs), desc="stage 1 (collaborative)", leave=False)
    for epoch in bar:
        model.train()
        perm = rng.permutation(len(x_all))
        total, count = 0.0, 0
        for s in range(0, len(perm), cfg.batch_size):
            idx = perm[s:s + cfg.batch_size]
            x = torch.from_numpy(x_all[idx]).to(device, non_blocking=True)
            y = torch.from_numpy(y_all[idx]).to(device, non_blocking=True)
            hidden = model.backbone.forward_all(x)                 # (B, L, d)
            sel = y > 0
            logits = hidden[sel] @ model.item_table.t()            # (M, N + 1)
            logits[:, 0] = float("-inf")
            loss = F.cross_entropy(logits, y[sel])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.item_emb.weight[0].zero_()
            total += loss.detach() * len(idx)
            count += len(idx)
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
        bar.set_postfix({k: round(v, 4) for k, v in row.items() if k != "epoch"})
        if bad >= cfg.patience:
            log(f"stage 1: early stop at epoch {epoch + 1} (best valid ndcg@10 {best:.4f})")
            break
        if out_of_time:
            log(f"stage 1: time budget of {cfg.stage1_max_minutes:g} min reached at epoch {epoch + 1}")
            break
    model.cpu()               # later stages and checkpoints work on the CPU copy
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    log(f"stage 1: best valid ndcg@10 {best:.4f} in {time.time() - t0:.0f}s")
    return {"best_valid_ndcg@10": best, "epochs": len(history), "seconds": time.time() - t0, "history": history}
