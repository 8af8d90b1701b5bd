"""The evaluation protocol of REFERENCE.md section 4 on the leave-one-out split.

Tasks: ``standard`` (no prompt), ``positive``, ``negative``, ``compound`` (a positive and a
negative prompt together), the steering tasks again with held-out prompt wordings
(``positive_heldout``, ...) and, given a set of natural wordings (:mod:`dpr.data.wordings`: requests that
never name their tag, "something to make me laugh"), with those (``positive_natural``, ...).
Methods: backbone, post_filter (top-100, filtered, first k),
post_filter_k (the top-k filtered in place, no refill), hard_filter, rerank, dpr, dpr_hard_filter. Full ranking over the whole catalogue, history items masked, vectorised.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from dpr.data.cases import EvalCases, build_eval_cases
from dpr.data.dataset import Dataset
from dpr.data.prompts import PromptBank
from dpr.data.wordings import NaturalWordings
from dpr.eval.metrics import ndcg_at_k, recall_at_k, tag_share_at_k
from dpr.eval.ranking import filter_candidates, topk_full
from dpr.model.moe import POLARITY_NEGATIVE, POLARITY_POSITIVE
from dpr.train.prompt_table import PromptTable

METHODS = ("backbone", "post_filter", "post_filter_k", "hard_filter", "rerank", "dpr", "dpr_hard_filter")
STEERING_TASKS = ("positive", "negative", "compound")
CANDIDATES = 100          # post_filter / rerank work on the backbone's top-100
HELDOUT, NATURAL = "heldout", "natural"  # task-name suffixes of the wording variants


class NaturalPromptTable:
    """Frozen embeddings of a natural wordings set over a catalogue's tags: every distinct wording encoded
    once. Kept apart from the training :class:`PromptTable` (nothing in training builds one)."""

    def __init__(self, text_encoder, wordings: NaturalWordings, tag_names: list[str]):
        self.tag_names = list(tag_names)
        self.texts: list[str] = []
        index: dict[str, int] = {}
        self._flat, self._start, self._count = {}, {}, {}
        for pol, name in ((POLARITY_POSITIVE, "positive"), (POLARITY_NEGATIVE, "negative")):
            flat, start, count = [], [], []
            for tag in self.tag_names:
                ws = wordings.wordings(name, tag)
                start.append(len(flat))
                count.append(len(ws))
                for w in ws:
                    if w not in index:
                        index[w] = len(self.texts)
                        self.texts.append(w)
                    flat.append(index[w])
            self._flat[pol] = np.asarray(flat, dtype=np.int64)
            self._start[pol] = np.asarray(start, dtype=np.int64)
            self._count[pol] = np.asarray(count, dtype=np.int64)
        self.embeddings = text_encoder.encode(self.texts) if self.texts else torch.zeros(0, text_encoder.dim)

    def num_wordings(self, polarity: int, tag: int) -> int:
        return int(self._count[polarity][tag])

    def covered(self, polarity: int, tags: np.ndarray) -> np.ndarray:
        """Per row: True when it needs no prompt of this polarity (tag < 0) or its tag has wordings."""
        tags = np.asarray(tags, dtype=np.int64)
        return (tags < 0) | (self._count[polarity][np.maximum(tags, 0)] > 0)

    def draw(self, polarity: int, tags: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One wording per row, uniform over the tag's wordings: text indices, -1 where tag < 0."""
        tags = np.asarray(tags, dtype=np.int64)
        if not self.covered(polarity, tags).all():
            raise ValueError("some cases' tags have no natural wordings; filter them first "
                             "(NaturalPromptTable.covered)")
        u = rng.random(len(tags))
        t = np.maximum(tags, 0)
        cnt = self._count[polarity][t]
        pick = self._start[polarity][t] + np.minimum((u * cnt).astype(np.int64), np.maximum(cnt - 1, 0))
        rows = np.full(len(tags), -1, dtype=np.int64)
        ok = tags >= 0
        rows[ok] = self._flat[polarity][pick[ok]]
        return rows

    def lookup(self, rows: np.ndarray) -> torch.Tensor:
        """(B, text_dim) embeddings of text indices; rows < 0 get zeros (no prompt)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = torch.zeros(len(rows), self.embeddings.shape[1])
        ok = rows >= 0
        if ok.any():
            out[torch.from_numpy(ok)] = self.embeddings[torch.from_numpy(rows[ok])]
        return out


@dataclass
class EvalContext:
    """What evaluation needs besides the model: prompt embeddings and item-text embeddings."""

    table: PromptTable
    train_wordings: dict[int, int]          # polarity -> number of training wordings (the rest held out)
    item_text: torch.Tensor                 # (N + 1, text_dim) L2-normalised, row 0 zeros
    text_encoder: object = field(default=None, repr=False)      # to embed natural wordings on demand
    natural_tables: dict = field(default_factory=dict, repr=False)  # (fingerprint, tags) -> NaturalPromptTable

    def natural_table(self, wordings: NaturalWordings, tag_names) -> NaturalPromptTable:
        """The embedded natural wordings over ``tag_names``, encoded on first use and cached here."""
        key = (wordings.fingerprint, tuple(tag_names))
        if key not in self.natural_tables:
            if self.text_encoder is None:
                raise ValueError("this evaluation context has no text encoder to embed natural wordings; "
                                 "build it with build_context(text_encoder, ...)")
            self.natural_tables[key] = NaturalPromptTable(self.text_encoder, wordings, list(tag_names))
        return self.natural_tables[key]


def item_texts(dataset_or_catalogue) -> list[str]:
    cat = getattr(dataset_or_catalogue, "catalogue", dataset_or_catalogue)
    return [f"{title} ({', '.join(tags)})" if tags else title for title, tags in zip(cat.titles, cat.tags)]


def build_context(text_encoder, catalogue, bank: PromptBank, wordings: NaturalWordings | None = None) -> EvalContext:
    """Prompt table (training and held-out templates) and item-text embeddings; ``wordings``: natural
    wordings to embed now too (else on first use by :func:`run_task`)."""
    templates = {pol: bank.train_templates(pol) + bank.heldout_templates(pol)
                 for pol in (POLARITY_POSITIVE, POLARITY_NEGATIVE)}
    table = PromptTable(text_encoder, templates, catalogue.tag_names, bank.render)
    emb = text_encoder.encode(item_texts(catalogue))
    item_text = torch.cat([torch.zeros(1, emb.shape[1]), emb])
    ctx = EvalContext(table, {pol: len(bank.train_templates(pol)) for pol in templates}, item_text,
                      text_encoder=text_encoder)
    if wordings is not None:
        ctx.natural_table(wordings, catalogue.tag_names)
    return ctx


def natural_coverage(cases: EvalCases, nat: NaturalPromptTable) -> np.ndarray:
    """Per case: whether its tags (positive and/or negative) have natural wordings."""
    return nat.covered(POLARITY_POSITIVE, cases.pos_tag) & nat.covered(POLARITY_NEGATIVE, cases.neg_tag)


def _wordings(ctx: EvalContext, polarity: int, n: int, heldout: bool, rng) -> np.ndarray:
    n_train = ctx.train_wordings[polarity]
    n_all = ctx.table.num_wordings(polarity)
    lo, hi = (n_train, n_all) if heldout else (0, n_train)
    if hi <= lo:
        raise ValueError("no held-out wordings to evaluate (PromptBank(heldout=0))")
    return rng.integers(lo, hi, size=n)


@torch.no_grad()
def run_task(model, catalogue, cases: EvalCases, ctx: EvalContext, heldout: bool = False, k: int = 10,
             seed: int = 0, batch_size: int = 1024, methods=METHODS, negative_weight: float = 1.0,
             wordings: NaturalWordings | None = None) -> dict:
    """{method: {metric: value}} for one task's cases (``methods``: a subset of METHODS, e.g. ("dpr",) for
    the quick validation during training). ``negative_weight`` scales what the negative prompt adds to
    the steered user vector (``dpr`` and ``dpr_hard_filter``): 1 is DPR as trained, 0 steers by the
    positive prompt only (dpr.eval.hybrid sweeps it).

    Prompts: a training template per case (seeded), a held-out one with ``heldout``, or with ``wordings``
    one of the case's tag's natural wordings (seeded; embedded once per context, see
    :meth:`EvalContext.natural_table`). Cases whose tag has no natural wordings are left out (count them
    with :func:`natural_coverage`); {} when none is left."""
    if wordings is not None and heldout:
        raise ValueError("heldout and wordings exclude each other: held-out templates or natural wordings")
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")
    if not 0.0 <= negative_weight <= 1.0:
        raise ValueError(f"negative_weight must be in [0, 1], got {negative_weight}")
    nat = ctx.natural_table(wordings, catalogue.tag_names) if wordings is not None else None
    if nat is not None:
        keep = natural_coverage(cases, nat)
        if not keep.all():
            cases = cases.subset(np.flatnonzero(keep))
        if not len(cases):
            return {}
    model.eval()
    rng = np.random.default_rng(seed)
    tags = torch.from_numpy(catalogue.item_tags)                      # (N + 1, T)
    item_tags_np = catalogue.item_tags
    table = model.retrieval_table        # with the tag channel: [E | tags]
    hist_all = torch.from_numpy(cases.padded(model.cfg.max_len))
    n = len(cases)
    pos, neg = cases.pos_tag, cases.neg_tag
    has_pos, has_neg = pos >= 0, neg >= 0
    if nat is not None:         # text indices into the natural table, -1 where the case has no such prompt
        wp = nat.draw(POLARITY_POSITIVE, np.where(has_pos, pos, -1), rng) if has_pos.any() else np.full(n, -1)
        wn = nat.draw(POLARITY_NEGATIVE, np.where(has_neg, neg, -1), rng) if has_neg.any() else np.full(n, -1)
    else:
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
        h_d = model.user_vector(hist)
        h = model.lift(h_d)              # the unsteered vector in the retrieval space
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

        if nat is not None:
            t_pos, t_neg = nat.lookup(wp[sl]), nat.lookup(wn[sl])
        else:
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
            h2 = model.retrieval_vector(h_d, pp, pn, presence)
            if negative_weight != 1.0 and p_neg_rows.any():
                # the same request without its negative prompt, then part of the way back to h2
                base = model.retrieval_vector(h_d, pp, pn, presence * torch.tensor([1, 0]))
                h2 = base + negative_weight * (h2 - base)
            add("dpr", topk_full(h2, table, k, hist), sl)
            if "dpr_hard_filter" in per:
                add("dpr_hard_filter", topk_full(h2, table, k, hist, allowed=allowed), sl)
    return {m: {metric: float(np.concatenate(v).mean()) for metric, v in row.items()} for m, row in per.items()}


@torch.no_grad()
def evaluate(model, dataset: Dataset, ctx: EvalContext, split: str = "test",
             tasks=("standard", "positive", "negative", "compound"), heldout: bool = True, k: int = 10,
             seed: int = 0, max_users: int = 0, window: int = 10, progress: bool = True,
             wordings: NaturalWordings | None = None) -> dict:
    """Run the protocol; returns ``{task: {method: {metric: value}}}`` plus ``"cases"`` counts.

    ``heldout``: the steering tasks again with the held-out templates (``<task>_heldout``). ``wordings``:
    the steering tasks again with natural wordings (``<task>_natural``, the same cases and metrics); the
    cases whose tag has no natural wordings are skipped and counted in ``cases["<task>_natural_skipped"]``.
    """
    from dpr.train.common import evaluate_standard

    model.eval()
    users = dataset.eval_users()
    if max_users:
        users = users[:max_users]
    results: dict = {}
    counts: dict[str, int] = {}
    todo = [(t, "") for t in tasks] + [(t, HELDOUT) for t in tasks if heldout and t in STEERING_TASKS]
    if wordings is not None:
        todo += [(t, NATURAL) for t in tasks if t in STEERING_TASKS]
    built: dict[str, EvalCases] = {}
    for task, variant in tqdm(todo, desc=f"dpr-eval ({split})", disable=not progress, leave=False):
        name = f"{task}_{variant}" if variant else task
        if task == "standard":
            std = evaluate_standard(model, dataset, split, users, k)
            results[name] = {"backbone": std, "dpr": dict(std)}   # no prompt: DPR *is* the backbone
            counts[name] = int(len(users))
            continue
        if task not in STEERING_TASKS:
            raise ValueError(f"unknown task {task!r}; known: standard, {', '.join(STEERING_TASKS)}")
        if task not in built:
            built[task] = build_eval_cases(dataset, split=split, task=task, seed=seed, max_users=max_users,
                                           window=window)
        cases = built[task]
        if variant == NATURAL:
            keep = natural_coverage(cases, ctx.natural_table(wordings, dataset.catalogue.tag_names))
            counts[f"{name}_skipped"] = int((~keep).sum())
            cases = cases.subset(np.flatnonzero(keep))
        counts[name] = len(cases)
        if len(cases):
            results[name] = run_task(model, dataset.catalogue, cases, ctx, heldout=variant == HELDOUT, k=k,
                                     seed=seed, wordings=wordings if variant == NATURAL else None)
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
        skipped = results.get("cases", {}).get(f"{task}_skipped", 0)
        present = [m for m in metrics_order if any(m in v for v in methods.values())]
        note = f", {skipped} skipped: no natural wordings for their tag" if skipped else ""
        lines.append(f"\n{task} ({n} cases{note})")
        lines.append(f"  {'method':<18}" + "".join(f"{m:>18}" for m in present))
        for method, vals in methods.items():
            lines.append(f"  {method:<18}" + "".join(f"{vals[m]:>18.4f}" if m in vals else f"{'-':>18}"
                                                      for m in present))
    return "\n".join(lines)
