"""The three-stage training pipeline: collaborative -> alignment -> steering.

Each stage can run alone, resuming from a checkpoint (``stages=(3,)`` with ``resume=ckpt``)."""

from __future__ import annotations

import dataclasses
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
STEERING_FIELDS = ("fusion", "fusion_hidden", "moe", "experts_per_polarity", "top_k", "expert_hidden", "tag_channel")


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
    kept = {k: v for k, v in resume.state_dict.items() if not k.startswith(STEERED) and k in model.state_dict()}
    model.load_state_dict(kept, strict=False)
    model.set_item_tags(resume.catalogue.item_tags)
    return cfg, model


# (pos_lambda, pos_keep_lambda) candidates when either is -1: none (the stage-3 loss before the positive terms,
# which the synthetic data's validation prefers) and the pair the Amazon Office ablation chose (docs/RESULTS.md)
POSITIVE_TERM_CANDIDATES = ((0.0, 0.0), (1.0, 3.0))


def _stand_ins(ctx, text_encoder, dataset, train_cfg, stages, meta, log):
    """The stand-in prompts of stages 2-3 (dpr.train.word_prompts.StandIns): item titles and vocabulary words
    of each tag, each with its share (``-1``: chosen here, recorded in ``meta["auto"]`` and printed)."""
    from dpr.train.word_prompts import StandIns

    if ctx is None or not set(stages) & {2, 3}:
        return StandIns([]), train_cfg
    chosen = meta.setdefault("auto", {"chosen": {}}).setdefault("chosen", {})
    titles = None
    if train_cfg.title_prompt_share != 0 or train_cfg.word_prompt_share != 0:
        from dpr.train.title_prompts import TitlePrompts, auto_share

        t0 = time.time()
        titles = TitlePrompts(text_encoder, dataset.catalogue)
        if train_cfg.title_prompt_share < 0:
            share, why = auto_share(titles, ctx, dataset.catalogue)
            train_cfg = dataclasses.replace(train_cfg, title_prompt_share=share)
            chosen["title_prompt_share"] = {"value": share, "reason": why}
            log(f"auto: title_prompt_share = {share:g} ({why})")
        log(f"title prompts: {int((titles.count > 0).sum())} of {len(titles.count)} tags have titled items "
            f"(encoded in {time.time() - t0:.1f}s); share {train_cfg.title_prompt_share:g}")
    words = None
    if train_cfg.word_prompt_share != 0:
        from dpr.train.word_prompts import AUTO_SHARE, WordPrompts

        t0 = time.time()
        words = WordPrompts(text_encoder, ctx, dataset.catalogue.num_tags, titles=titles)
        covered = int((words.count > 0).sum())
        if train_cfg.word_prompt_share < 0:
            share = AUTO_SHARE if covered * 2 >= len(words.count) else 0.0
            why = (f"words found for {covered} of {len(words.count)} tags "
                   f"({'at least' if share else 'fewer than'} half)")
            train_cfg = dataclasses.replace(train_cfg, word_prompt_share=share)
            chosen["word_prompt_share"] = {"value": share, "reason": why}
            log(f"auto: word_prompt_share = {share:g} ({why})")
        log(f"word prompts: {words.summary(dataset.catalogue.tag_names)} in {time.time() - t0:.1f}s; "
            f"share {train_cfg.word_prompt_share:g}")
        meta["word_prompts"] = {dataset.catalogue.tag_names[t]: words.words[t][:20] for t in range(len(words.words))}
    return StandIns([(titles, train_cfg.title_prompt_share), (words, train_cfg.word_prompt_share)]), train_cfg


def _stage3_choosing_positive_terms(model, dataset, cfg, rng, ctx, val_users, log, stand_ins, meta):
    """Stage 3 once per candidate pair of positive-term weights, each from the same starting state; the
    run with the best validation steering score is kept (never the test split) and recorded."""
    import copy

    from dpr.train.stage3 import STEERED

    start = copy.deepcopy({k: v for k, v in model.state_dict().items() if k.startswith(STEERED)})
    best = None
    tried = []
    for pos_lambda, pos_keep in POSITIVE_TERM_CANDIDATES:
        model.load_state_dict(start, strict=False)
        c = dataclasses.replace(cfg, pos_lambda=pos_lambda, pos_keep_lambda=pos_keep)
        log(f"stage 3 with pos_lambda={pos_lambda:g}, pos_keep_lambda={pos_keep:g}")
        res = train_stage3(model, dataset, c, rng, ctx, val_users=val_users, log=log, stand_ins=stand_ins)
        score = res.get("calibrated_score", res["best_valid_score"])
        tried.append({"pos_lambda": pos_lambda, "pos_keep_lambda": pos_keep, "valid_score": score})
        if best is None or score > best[0]:
            best = (score, c, res, copy.deepcopy({k: v for k, v in model.state_dict().items()
                                                  if k.startswith(STEERED)}))
    score, chosen, res, state = best
    model.load_state_dict(state, strict=False)
    scores = ", ".join(f"({t['pos_lambda']:g}, {t['pos_keep_lambda']:g}): {t['valid_score']:.4f}" for t in tried)
    why = f"the best validation steering score of {scores}"
    meta.setdefault("auto", {"chosen": {}}).setdefault("chosen", {})["pos_lambda, pos_keep_lambda"] = {
        "value": [chosen.pos_lambda, chosen.pos_keep_lambda], "reason": why}
    log(f"auto: pos_lambda, pos_keep_lambda = {chosen.pos_lambda:g}, {chosen.pos_keep_lambda:g} ({why})")
    res["tried"] = tried
    return chosen, res


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
        check_stage3_config(train_cfg, allow_auto=True)
        from dpr.train.auto import describe, resolve

        train_cfg, auto = resolve(train_cfg, dataset)
        if auto["chosen"]:
            log(describe(auto))
    from dpr.train.auto import resolve_tag_channel

    tag_channel, tag_why = resolve_tag_channel(train_cfg, dataset.catalogue.num_tags)
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
        changed = {k: v for k, v in (steering_overrides or {}).items()
                   if k != "tag_channel" and getattr(model_cfg, k, v) != v}   # the channel follows train_cfg
        if set(stages) & {2, 3} and bool(model_cfg.tag_channel) != tag_channel and "tag_channel" not in changed:
            changed["tag_channel"] = tag_channel
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
        model_cfg.tag_channel = tag_channel
        if text_encoder is not None:
            model_cfg.text_dim = text_encoder.dim
        model = DPRModel(model_cfg)
        model.set_item_tags(dataset.catalogue.item_tags)
        meta = {"dataset": dataset.stats(), "stages_done": [], "timings": {}}
    if 3 in stages:
        meta["auto"] = auto
    if train_cfg.tag_channel == -1 and set(stages) & {2, 3}:
        meta.setdefault("auto", {"chosen": {}}).setdefault("chosen", {})["tag_channel"] = {
            "value": int(model_cfg.tag_channel), "reason": tag_why}
        log(f"auto: tag_channel = {int(model_cfg.tag_channel)} ({tag_why})")
    ctx = None
    if text_encoder is not None:
        bank = PromptBank(heldout=train_cfg.heldout_templates)
        t0 = time.time()
        ctx = build_context(text_encoder, dataset.catalogue, bank)
        log(f"prompt table: {len(ctx.table.texts)} prompts and {dataset.num_items} item texts encoded "
            f"in {time.time() - t0:.1f}s")
    stand_ins, train_cfg = _stand_ins(ctx, text_encoder, dataset, train_cfg, stages, meta, log)
    val = dataset.eval_users()[: val_users] if val_users else None
    results = meta.setdefault("stage_results", {})
    for stage in stages:
        if stage == 1:
            results["1"] = train_stage1(model, dataset, train_cfg, rng, val_users=None, log=log)
        elif stage == 2:
            results["2"] = train_stage2(model, dataset, train_cfg, rng, ctx, log=log, stand_ins=stand_ins)
        elif stage == 3:
            if train_cfg.pos_lambda < 0 or train_cfg.pos_keep_lambda < 0:
                train_cfg, results["3"] = _stage3_choosing_positive_terms(model, dataset, train_cfg, rng, ctx,
                                                                          val_users, log, stand_ins, meta)
            else:
                results["3"] = train_stage3(model, dataset, train_cfg, rng, ctx, val_users=val_users, log=log,
                                            stand_ins=stand_ins)
        else:
            raise ValueError(f"unknown stage {stage}; stages are 1, 2, 3")
        meta["stages_done"] = sorted(set(meta.get("stages_done", [])) | {stage})
    meta["valid_standard"] = evaluate_standard(model, dataset, "valid", val)
    model.eval()
    return Checkpoint(model_config=model_cfg, state_dict=model.state_dict(), catalogue=dataset.catalogue,
                      text_encoder=text_encoder.identity() if text_encoder is not None else dict(
                          resume.text_encoder if resume is not None else {}),
                      train_config=train_cfg, meta=meta)
