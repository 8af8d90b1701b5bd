"""Stage 2, alignment: backbone, item table and text encoder frozen; the projection P learns to map a
prompt about tag t to a vector that scores the items carrying t highly (multi-positive softmax over
the catalogue), for prompts of both polarities (a negative prompt still *names* its tag; the
polarity is handled by Fusion and the MoE in stage 3).

With the tag channel, the channel's head G learns here too (with P): the prompt's tag as a 0/1 target per
tag (binary cross-entropy over all tags), so stage 3 starts from a channel that already points at the tag the
prompt means, for names and (with title prompts) for item titles alike."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from dpr.config import TrainConfig
from dpr.data.dataset import Dataset
from dpr.model.moe import POLARITY_NEGATIVE, POLARITY_POSITIVE
from dpr.train.common import step_bar


def alignment_loss(p: torch.Tensor, item_table: torch.Tensor, positives: torch.Tensor, tau: float) -> torch.Tensor:
    """-log(softmax mass on the positive items); ``positives`` (B, N + 1) bool, column 0 is padding."""
    logits = (p @ item_table.t()) / tau
    logits[:, 0] = float("-inf")
    pos_logits = logits.masked_fill(~positives, float("-inf"))
    return (torch.logsumexp(logits, dim=1) - torch.logsumexp(pos_logits, dim=1)).mean()


def tag_head_loss(logits: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the tag head's (B, T) logits against each row's tag (one 1 per row), summed
    over tags and averaged over rows (a mean over tags would shrink the one positive's gradient by 1/T)."""
    target = torch.zeros_like(logits).scatter_(1, tags.view(-1, 1).long(), 1.0)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / logits.shape[0]


def train_stage2(model, dataset: Dataset, cfg: TrainConfig, rng: np.random.Generator, ctx,
                 log=print, stand_ins=None) -> dict:
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(model.projection.parameters())
    if model.cfg.tag_channel:
        params += list(model.tag_head.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.stage2_lr)
    table = ctx.table     # only the training wordings (indices < ctx.train_wordings[pol]) are used
    item_tags = torch.from_numpy(dataset.catalogue.item_tags)           # (N + 1, T)
    usable = np.flatnonzero(item_tags.sum(0).numpy() > 0)
    items = model.item_table.detach()
    t0, history = time.time(), []
    bar = step_bar("stage 2 (alignment)", cfg.stage2_epochs, cfg.stage2_steps_per_epoch)
    for epoch in range(cfg.stage2_epochs):
        total = 0.0
        for _ in range(cfg.stage2_steps_per_epoch):
            tags = rng.choice(usable, size=cfg.batch_size)
            pol = POLARITY_POSITIVE if rng.random() < 0.5 else POLARITY_NEGATIVE
            words = rng.integers(ctx.train_wordings[pol], size=cfg.batch_size)
            emb = table.lookup(pol, words, tags)
            if stand_ins:
                emb = stand_ins.mix(emb, tags, rng)
            p = model.project_prompt(emb)
            loss = alignment_loss(p, items, item_tags[:, tags].t(), cfg.align_temperature)
            if model.cfg.tag_channel:
                loss = loss + tag_head_loss(model.tag_head(p), torch.from_numpy(tags))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            bar.update(1)
        row = {"epoch": epoch + 1, "loss": total / cfg.stage2_steps_per_epoch}
        history.append(row)
        bar.set_postfix(epoch=epoch + 1, loss=round(row["loss"], 4))
    bar.close()
    log(f"stage 2: alignment loss {history[-1]['loss'] if history else float('nan'):.4f} in {time.time() - t0:.0f}s")
    return {"epochs": len(history), "seconds": time.time() - t0, "history": history}
