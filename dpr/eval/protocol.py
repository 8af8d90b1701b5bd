"""The evaluation protocol of REFERENCE.md section 4 on the leave-one-out split.

Tasks: ``standard`` (no prompt), ``positive``, ``negative``, ``compound`` (a positive and a
negative prompt together), and the steering tasks again with held-out prompt wordings
(``positive_heldout``, ...). Methods: backbone, post_filter (top-100, filtered, first k),
post_filter_k (the top-k filtered in place, no refill), hard_filter, rerank, dpr, dpr_hard_filter. Full ranking over the whole catalogue, history items masked, vectorised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from dpr.data.cases import EvalCases, build_eval_cases
from dpr.data.dataset import Dataset
from dpr.data.prompts import PromptBank
from dpr.eval.metrics import ndcg_at_k, recall_at_k, tag_share_at_k
from dpr.eval.ranking import filter_candidates, topk_full
from dpr.model.moe import POLARITY_NEGATIVE, POLARITY_POSITIVE
from dpr.train.prompt_table import PromptTable

METHODS = ("backbone", "post_filter", "post_filter_k", "hard_filter", "rerank", "dpr", "dpr_hard_filter")
STEERING_TASKS = ("positive", "negative", "compound")
CANDIDATES = 100          # post_filter / rerank work on the backbone's top-100


@dataclass
class EvalContext:
    """What evaluation needs besides the model: prompt embeddings and item-text embeddings."""

    table: PromptTable
    train_wordings: dict[int, int]          # polarity -> number of training wordings (the rest held out)
    item_text: torch.Tensor                 # (N + 1, text_dim) L2-normalised, row 0 zeros


def item_texts(dataset_or_catalogue) -> list[str]:
    cat = getattr(dataset_or_catalogue, "catalogue", dataset_or_catalogue)
    return [f"{title} ({', '.join(tags)})" if tags else title for title, tags in zip(cat.titles, cat.tags)]


def build_context(text_encoder, catalogue, bank: PromptBank) -> EvalContext:
    templates = {pol: bank.train_templates(pol) + bank.heldout_templates(pol)
                 for pol in (POLARITY_POSITIVE, POLARITY_NEGATIVE)}
    table = PromptTable(text_encoder, templates, catalogue.tag_names, bank.render)
    emb = text_encoder.encode(item_texts(catalogue))
    item_text = torch.cat([torch.zeros(1, emb.shape[1]), emb])
    return EvalContext(table, {pol: len(bank.train_templates(pol)) for pol in templates}, item_text)


def _wordings(ctx: EvalContext, polarity: int, n: int, heldout: bool, rng) -> np.ndarray:
    n_train = ctx.train_wordings[polarity]
    n_all = ctx.table.num_wordings(polarity)
    lo, hi = (n_train, n_all) if heldout else (0, n_train)
    if hi <= lo:
        raise ValueError("no held-out wordings to evaluate (PromptBank(heldout=0))")
    return rng.integers(lo, hi, size=n)


@torch.no_grad()
def run_task(model, catalogue, cases: EvalCases, ctx: EvalContext, heldout: bool = False, k: int = 10,
             seed: int = 0, batch_size: int = 1024, methods=METHODS, negative_weight: float = 1.0) -> dict:
    """{method: {metric: value}} for one task's cases (``methods``: a subset of METHODS, e.g. ("dpr",) for
    the quick validation during training). ``negative_weight`` scales what the negative prompt adds to
    the steered user vector (``dpr`` and ``dpr_hard_filter``): 1 is DPR as trained, 0 steers by the
    positive prompt only (dpr.eval.hybrid sweeps it)."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")
    if not 0.0 <= negative_weight <= 1.0:
        raise ValueError(f"negative_weight must be in [0, 1], got {negative_weight}")
    model.eval()
    rng = np.random.default_rng(seed)
    tags = torch.from_numpy(catalogue.item_tags)                      # (N + 1, T)
    item_tags_np = catalogue.item_tags
    table = model.item_table
    hist_all = torch.from_numpy(cases.padded(model.cfg.max_len))
    n = len(cases)
    pos, neg = cases.pos_tag, cases.neg_tag
    has_pos, has_neg = pos >= 0, neg >= 0
    wp = _wordings(ctx, POLARITY_POSITIVE, n, heldout, rng) if has_pos.any() else np.zeros(n, np.int64)
    wn = _wordings(ctx, POLARITY_NEGATIVE, n, heldout, rng) if has_neg.any() else np.zeros(n, np.int64)
    per: dict[str, dict[str, list]] = {m: {} for m in METHODS if m in methods}

    def add(method, top, sl):
        if method not in per:
            return
        tgt = cases.targets[sl]
        row = per[method]
        row.setdefault(f"ndcg@{k}", []).append(ndcg_at_k(top, tgt, k))
        row.setdefault(f"recall@{k}", []).append(recall_at_k(top, tgt, k))
        if has_pos[sl].any():
            row.setdefault(f"tag_precision@{k}", []).append(tag_share_at_k(top, item_tags_np, np.maximum(pos[sl], 0), k))
        if has_neg[sl].any():
            row.setdefault(f"violation@{k}", []).append(tag_share_at_k(top, item_tags_np, np.maximum(neg[sl], 0), k))

    for s in range(0, n, batch_size):
        sl = slice(s, min(s + batch_size, n))
        hist = hist_all[sl]
        b = hist.shape[0]
        h = model.user_vector(hist)
        # allowed mask: carries the positive tag (if any) and lacks the negative tag (if any)
        allowed = torch.ones(b, table.shape[0], dtype=torch.bool)
        p_pos_rows, p_neg_rows = torch.from_numpy(has_pos[sl]), torch.from_numpy(has_neg[sl])
        if p_pos_rows.any():
            allowed &= torch.where(p_pos_rows[:, None], tags[:, np.maximum(pos[sl], 0)].t(), True)
        if p_neg_rows.any():
            allowed &= torch.where(p_neg_rows[:, None], ~tags[:, np.maximum(neg[sl], 0)].t(), True)
        allowed_np = allowed.numpy()

        if "backbone" in per:
            add("backbone", topk_full(h, table, k, hist), sl)
        if "post_filter" in per or "post_filter_k" in per or "rerank" in per:
            cand = topk_full(h, table, CANDIDATES, hist)
            keep = np.take_along_axis(allowed_np, np.maximum(cand, 0), axis=1) & (cand >= 0)
            if "post_filter" in per:
                add("post_filter", filter_candidates(cand, keep, k), sl)
            if "post_filter_k" in per:
                # the shown list filtered in place: the backbone's top-k minus the items the prompt rules
                # out, no refill (a shorter list); the weaker reading of "filter baseline"
                add("post_filter_k", filter_candidates(cand[:, :k], keep[:, :k], k), sl)
        if "hard_filter" in per:
            add("hard_filter", topk_full(h, table, k, hist, allowed=allowed), sl)

        t_pos = ctx.table.lookup(POLARITY_POSITIVE, wp[sl], np.where(has_pos[sl], pos[sl], -1))
        t_neg = ctx.table.lookup(POLARITY_NEGATIVE, wn[sl], np.where(has_neg[sl], neg[sl], -1))
        if "rerank" in per:
            # candidates re-scored by prompt-to-item-text similarity (negative prompts push away)
            cand_text = ctx.item_text[torch.from_numpy(np.maximum(cand, 0))]          # (B, C, text_dim)
            sim = (cand_text * t_pos[:, None]).sum(-1) - (cand_text * t_neg[:, None]).sum(-1)
            order = np.argsort(-sim.numpy(), axis=1, kind="stable")                    # ties keep backbone order
            reranked = np.take_along_axis(cand, order, axis=1)
            add("rerank", filter_candidates(reranked, reranked >= 0, k), sl)

        if "dpr" in per or "dpr_hard_filter" in per:
            presence = torch.stack([p_pos_rows, p_neg_rows], dim=1).to(torch.int64)
            pp, pn = model.project_prompt(t_pos), model.project_prompt(t_neg)
            h2 = model.steer(h, pp, pn, presence)
            if negative_weight != 1.0 and p_neg_rows.any():
                # the same request without its negative prompt, then part of the way back to h2
                base = model.steer(h, pp, pn, presence * torch.tensor([1, 0]))
                h2 = base + negative_weight * (h2 - base)
            add("dpr", topk_full(h2, table, k, hist), sl)
            if "dpr_hard_filter" in per:
                add("dpr_hard_filter", topk_full(h2, table, k, hist, allowed=allowed), sl)
    return {m: {metric: float(np.concatenate(v).mean()) for metric, v in row.items()} for m, row in per.items()}


@torch.no_grad()
def evaluate(model, dataset: Dataset, ctx: EvalContext, split: str = "test",
             tasks=("standard", "positive", "negative", "compound"), heldout: bool = True, k: int = 10,
             seed: int = 0, max_users: int = 0, window: int = 10, progress: bool = True) -> dict:
    """Run the protocol; returns ``{task: {method: {metric: value}}}`` plus ``"cases"`` counts."""
    from dpr.train.common import evaluate_standard

    model.eval()
    users = dataset.eval_users()
    if max_users:
        users = users[:max_users]
    results: dict = {}
    counts: dict[str, int] = {}
    todo = [(t, False) for t in tasks] + [(t, True) for t in tasks if heldout and t in STEERING_TASKS]
    for task, held in tqdm(todo, desc=f"dpr-eval ({split})", disable=not progress, leave=False):
        name = f"{task}_heldout" if held else task
        if task == "standard":
            std = evaluate_standard(model, dataset, split, users, k)
            results[name] = {"backbone": std, "dpr": dict(std)}   # no prompt: DPR *is* the backbone
            counts[name] = int(len(users))
            continue
        if task not in STEERING_TASKS:
            raise ValueError(f"unknown task {task!r}; known: standard, {', '.join(STEERING_TASKS)}")
        cases = build_eval_cases(dataset, split=split, task=task, seed=seed, max_users=max_users, window=window)
        counts[name] = len(cases)
        if len(cases):
            results[name] = run_task(model, dataset.catalogue, cases, ctx, heldout=held, k=k, seed=seed)
    results["cases"] = counts
    return results


def format_table(results: dict) -> str:
    """A readable task x method x metric table."""
    lines = []
    metrics_order = ["ndcg@10", "recall@10", "tag_precision@10", "violation@10"]
    for task, methods in results.items():
        if not isinstance(methods, dict) or task in ("cases", "meta"):
            continue
        n = results.get("cases", {}).get(task, "")
        present = [m for m in metrics_order if any(m in v for v in methods.values())]
        lines.append(f"\n{task} ({n} cases)")
        lines.append(f"  {'method':<18}" + "".join(f"{m:>18}" for m in present))
        for method, vals in methods.items():
            lines.append(f"  {method:<18}" + "".join(f"{vals[m]:>18.4f}" if m in vals else f"{'-':>18}"
                                                      for m in present))
    return "\n".join(lines)
