"""Shared training utilities: seeding, batching of leave-one-out splits, standard-task validation."""

from __future__ import annotations

import random

import numpy as np
import torch
from tqdm.auto import tqdm

from dpr.data.dataset import Dataset, left_pad
from dpr.eval.metrics import ndcg_at_k, recall_at_k
from dpr.eval.ranking import topk_full


def step_bar(desc: str, epochs: int, steps_per_epoch: int):
    """A progress bar over every optimiser step of a stage (not over epochs: an ML-1M epoch takes a minute
    on 2 cores, and a bar that moves once a minute looks hung); the caller sets the epoch's figures as its
    postfix and closes it."""
    return tqdm(total=max(0, epochs * steps_per_epoch), desc=desc, unit="step", leave=False, mininterval=1.0,
                dynamic_ncols=True)


def seed_everything(seed: int) -> np.random.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def split_batch(dataset: Dataset, users: np.ndarray, split: str, max_len: int):
    """(histories (B, max_len) int64 tensor, targets (B,) numpy) for ``split`` of ``users``."""
    hist, tgt = [], []
    for u in users:
        h, t = dataset.split(int(u), split)
        hist.append(h)
        tgt.append(t)
    return torch.from_numpy(left_pad(hist, max_len)), np.asarray(tgt, dtype=np.int64)


@torch.no_grad()
def evaluate_standard(model, dataset: Dataset, split: str = "valid", users: np.ndarray | None = None,
                      k: int = 10, batch_size: int = 1024) -> dict:
    """Standard task (no prompt): NDCG@k / Recall@k with full ranking, history masked."""
    was_training = model.training
    model.eval()
    users = dataset.eval_users() if users is None else users
    ndcg, rec = [], []
    device = model.item_table.device
    for s in range(0, len(users), batch_size):
        hist, tgt = split_batch(dataset, users[s:s + batch_size], split, model.cfg.max_len)
        hist = hist.to(device)
        top = topk_full(model.user_vector(hist), model.item_table, k, histories=hist)
        ndcg.append(ndcg_at_k(top, tgt, k))
        rec.append(recall_at_k(top, tgt, k))
    model.train(was_training)
    return {f"ndcg@{k}": float(np.concatenate(ndcg).mean()), f"recall@{k}": float(np.concatenate(rec).mean())}
