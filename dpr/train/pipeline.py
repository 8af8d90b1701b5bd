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
from dpr.train.stage1 import check_stage1_config, train_stage1
from dpr.train.stage2 import train_stage2
from dpr.train.stage3 import check_stage3_config, train_stage3


# Model fields that only shape the steering modules (projection, Fusion, MoE): a run resuming from a
# checkpoint may change them (ablations reuse one stage-1 backbone); the backbone's fields may not change.
STEERING_FIELDS = ("fusion", "fusion_hidden", "moe", "experts_per_polarity", "top_k", "expert_hidden")


def _rebuild_steering(resume: Checkpoint, overrides: dict):
    """The resumed model with new steering fields: backbone + item table kept, steering modules fresh."""
    import dataclasses

    from dpr.train.stage3 import STEERED

    bad = sorted(set(overrides) - set(STEERING_FIELDS) - {"text_dim"})
    if bad:
        raise ValueError(f"cannot change {', '.join(bad)} when resuming (the trained backbone depends on them); "
                         f"only {', '.join(STEERING_FIELDS)} may change")
    cfg = dataclasses.replace(resume.model_config, **overrides).validate()
    model = DPRModel(cfg)
    kept = {k: v for k, v in resume.state_dict.items() if not k.startswith(STEERED)}
    model.load_state_dict(kept, strict=False)
    return cfg, model


def train(dataset: Dataset, model_cfg: ModelConfig, train_cfg: TrainConfig, text_encoder: TextEncoder | None,
          stages=(1, 2, 3), resume: Checkpoint | None = None, log=print, val_users: int = 1000,
          steering_overrides: dict | None = None) -> Checkpoint:
    """Run ``stages`` and return the checkpoint. ``text_encoder`` may be None when only stage 1 runs
    (collaborative training never reads text): the checkpoint then binds no encoder, and the run of
    stages 2-3 that resumes from it binds one (its ``dim`` must equal the model's ``text_dim``)."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if 1 in stages:
        check_stage1_config(train_cfg)      # fail before any work, not after hours of an earlier stage
    if 3 in stages:
        check_stage3_config(train_cfg)
        from dpr.train.auto import describe, resolve

        train_cfg, auto = resolve(train_cfg, dataset)
        if auto["chosen"]:
            log(describe(auto))
    rng = seed_everything(train_cfg.seed)
    if text_encoder is None and set(stages) - {1}:
        raise ValueError(f"stages {sorted(set(stages) - {1})} need a text encoder (only stage 1 runs without one)")
    if resume is not None:
        if resume.catalogue.ids != dataset.catalogue.ids:
            raise CheckpointError("the checkpoint was trained on a different item catalogue than this dataset")
        if (text_encoder is not None and resume.text_encoder.get("hash")
                and resume.text_encoder["hash"] != text_encoder.identity()["hash"]):
            raise CheckpointError("the checkpoint was trained with a different text encoder "
                                  f"({resume.text_encoder.get('source')}) than {text_encoder.source}")
        model_cfg = resume.model_config
        changed = {k: v for k, v in (steering_overrides or {}).items() if getattr(model_cfg, k, v) != v}
        if text_encoder is not None and model_cfg.text_dim != text_encoder.dim:
            if resume.text_encoder.get("hash") or set(resume.meta.get("stages_done", [])) - {1}:
                raise CheckpointError(f"the checkpoint's model expects {model_cfg.text_dim}-d text embeddings but "
                                      f"the text encoder {text_encoder.source} gives {text_encoder.dim}")
            changed["text_dim"] = text_encoder.dim      # stage-1-only checkpoint: no text weights trained yet
        meta = dict(resume.meta)
        if changed:
            model_cfg, model = _rebuild_steering(resume, changed)
            meta["stages_done"] = [s for s in meta.get("stages_done", []) if s == 1]
            log(f"resume: steering modules rebuilt with {changed} (backbone and item table kept)")
        else:
            model = resume.build_model()
    else:
        model_cfg.num_items = dataset.num_items
        model_cfg.num_tags = dataset.catalogue.num_tags
        if text_encoder is not None:
            model_cfg.text_dim = text_encoder.dim
        model = DPRModel(model_cfg)
        meta = {"dataset": dataset.stats(), "stages_done": [], "timings": {}}
    if 3 in stages:
        meta["auto"] = auto
    ctx = None
    if text_encoder is not None:
        bank = PromptBank(heldout=train_cfg.heldout_templates)
        t0 = time.time()
        ctx = build_context(text_encoder, dataset.catalogue, bank)
        log(f"prompt table: {len(ctx.table.texts)} prompts and {dataset.num_items} item texts encoded "
            f"in {time.time() - t0:.1f}s")
    titles = None
    if ctx is not None and train_cfg.title_prompt_share > 0 and set(stages) & {2, 3}:
        from dpr.train.title_prompts import TitlePrompts

        t0 = time.time()
        titles = TitlePrompts(text_encoder, dataset.catalogue)
        log(f"title prompts: {int((titles.count > 0).sum())} of {len(titles.count)} tags have titled items "
            f"(encoded in {time.time() - t0:.1f}s); share {train_cfg.title_prompt_share:g}")
    val = dataset.eval_users()[: val_users] if val_users else None
    results = meta.setdefault("stage_results", {})
    for stage in stages:
        if stage == 1:
            results["1"] = train_stage1(model, dataset, train_cfg, rng, val_users=None, log=log)
        elif stage == 2:
            results["2"] = train_stage2(model, dataset, train_cfg, rng, ctx, log=log, titles=titles)
        elif stage == 3:
            results["3"] = train_stage3(model, dataset, train_cfg, rng, ctx, val_users=val_users, log=log,
                                        titles=titles)
        else:
            raise ValueError(f"unknown stage {stage}; stages are 1, 2, 3")
        meta["stages_done"] = sorted(set(meta.get("stages_done", [])) | {stage})
    meta["valid_standard"] = evaluate_standard(model, dataset, "valid", val)
    model.eval()
    return Checkpoint(model_config=model_cfg, state_dict=model.state_dict(), catalogue=dataset.catalogue,
                      text_encoder=text_encoder.identity() if text_encoder is not None else dict(
                          resume.text_encoder if resume is not None else {}),
                      train_config=train_cfg, meta=meta)
