"""The three-stage training pipeline: collaborative -> alignment -> steering.

Each stage can run alone, resuming from a checkpoint (``stages=(3,)`` with ``resume=ckpt``)."""

from __future__ import annotations

import time

import torch

from dpr.checkpoint import Checkpoint
from dpr.config import ModelConfig, TrainConfig
from dpr.data.dataset import Dataset
from dpr.data.prompts import PromptBank
from dpr.errors import CheckpointError
from dpr.eval.protocol import build_context
from dpr.model import DPRModel, TextEncoder
from dpr.train.common import evaluate_standard, seed_everything
from dpr.train.stage1 import train_stage1
from dpr.train.stage2 import train_stage2
from dpr.train.stage3 import train_stage3


def train(dataset: Dataset, model_cfg: ModelConfig, train_cfg: TrainConfig, text_encoder: TextEncoder,
          stages=(1, 2, 3), resume: Checkpoint | None = None, log=print, val_users: int = 1000) -> Checkpoint:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rng = seed_everything(train_cfg.seed)
    if resume is not None:
        if resume.catalogue.ids != dataset.catalogue.ids:
            raise CheckpointError("the checkpoint was trained on a different item catalogue than this dataset")
        if resume.text_encoder.get("hash") and resume.text_encoder["hash"] != text_encoder.identity()["hash"]:
            raise CheckpointError("the checkpoint was trained with a different text encoder "
                                  f"({resume.text_encoder.get('source')}) than {text_encoder.source}")
        model_cfg = resume.model_config
        model = resume.build_model()
        meta = dict(resume.meta)
    else:
        model_cfg.num_items = dataset.num_items
        model_cfg.num_tags = dataset.catalogue.num_tags
        model_cfg.text_dim = text_encoder.dim
        model = DPRModel(model_cfg)
        meta = {"dataset": dataset.stats(), "stages_done": [], "timings": {}}
    bank = PromptBank(heldout=train_cfg.heldout_templates)
    t0 = time.time()
    ctx = build_context(text_encoder, dataset.catalogue, bank)
    log(f"prompt table: {len(ctx.table.texts)} prompts and {dataset.num_items} item texts encoded "
        f"in {time.time() - t0:.1f}s")
    val = dataset.eval_users()[: val_users] if val_users else None
    results = meta.setdefault("stage_results", {})
    for stage in stages:
        if stage == 1:
            results["1"] = train_stage1(model, dataset, train_cfg, rng, val_users=None, log=log)
        elif stage == 2:
            results["2"] = train_stage2(model, dataset, train_cfg, rng, ctx, log=log)
        elif stage == 3:
            results["3"] = train_stage3(model, dataset, train_cfg, rng, ctx, val_users=val_users, log=log)
        else:
            raise ValueError(f"unknown stage {stage}; stages are 1, 2, 3")
        meta["stages_done"] = sorted(set(meta.get("stages_done", [])) | {stage})
    meta["valid_standard"] = evaluate_standard(model, dataset, "valid", val)
    model.eval()
    return Checkpoint(model_config=model_cfg, state_dict=model.state_dict(), catalogue=dataset.catalogue,
                      text_encoder=text_encoder.identity(), train_config=train_cfg, meta=meta)
