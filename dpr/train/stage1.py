"""Stage 1, collaborative: backbone + item table, next-item prediction at every position,
full-softmax cross-entropy over all items, early stopping on validation NDCG@10."""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dpr.config import TrainConfig
from dpr.data.dataset import Dataset, left_pad
from dpr.train.common import evaluate_standard


def _windows(dataset: Dataset, users: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """For each user: the last max_len + 1 items of the training sequence as (input, next-item) pairs."""
    inputs, targets = [], []
    for u in users:
        s = dataset.train_sequence(int(u))[-(max_len + 1):]
        inputs.append(s[:-1])
        targets.append(s[1:])
    return left_pad(inputs, max_len), left_pad(targets, max_len)


def train_stage1(model, dataset: Dataset, cfg: TrainConfig, rng: np.random.Generator,
                 val_users: np.ndarray | None = None, log=print) -> dict:
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
    x_all, y_all = _windows(dataset, users, model.cfg.max_len)
    best, best_state, bad, history = -1.0, None, 0, []
    t0 = time.time()
    bar = tqdm(range(cfg.stage1_epochs), desc="stage 1 (collaborative)", leave=False)
    for epoch in bar:
        model.train()
        perm = rng.permutation(len(users))
        total, count = 0.0, 0
        for s in range(0, len(perm), cfg.batch_size):
            idx = perm[s:s + cfg.batch_size]
            x = torch.from_numpy(x_all[idx])
            y = torch.from_numpy(y_all[idx])
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
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        row = {"epoch": epoch + 1, "loss": total / max(count, 1)}
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.stage1_epochs:
            row.update(evaluate_standard(model, dataset, "valid", val_users))
            score = row["ndcg@10"]
            if score > best:
                best, bad = score, 0
                best_state = copy.deepcopy({k: v for k, v in model.state_dict().items()
                                            if k.startswith(("item_emb", "backbone"))})
            else:
                bad += 1
        history.append(row)
        bar.set_postfix({k: round(v, 4) for k, v in row.items() if k != "epoch"})
        if bad >= cfg.patience:
            log(f"stage 1: early stop at epoch {epoch + 1} (best valid ndcg@10 {best:.4f})")
            break
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    log(f"stage 1: best valid ndcg@10 {best:.4f} in {time.time() - t0:.0f}s")
    return {"best_valid_ndcg@10": best, "epochs": len(history), "seconds": time.time() - t0, "history": history}
