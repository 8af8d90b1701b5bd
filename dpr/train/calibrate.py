"""After stage 3: how far each polarity's shift should go, chosen on the validation split.

The gate's weights sum to 1 over the selected experts, so scaling a polarity's expert outputs by ``s``
scales that polarity's shift by exactly ``s`` (the router reads z, not the outputs). The scale is folded
into the experts' last layer, so the exported graphs and every kernel are
unchanged. Positive and negative prompts pass through separate gates and experts, so the two scales are
chosen independently:

* positive: the scale with the best validation NDCG@10 + 0.1 * tag precision@10 on positive cases (the
  stage-3 selection score's positive part);
* negative: among the scales whose validation violation@10 is at most ``max_violation``, the one with the
  best NDCG@10; if none reaches it, the one with the lowest violation (ties to the better NDCG).

Never the test split.
"""

from __future__ import annotations

import numpy as np
import torch

from dpr.model.moe import POLARITY_NEGATIVE, POLARITY_POSITIVE

SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)
# With the tag channel, a second pass scales the shift of h alone (the channel kept): the channel already
# lifts or sinks the tag, and where the shift does not order the items inside it better than the backbone
# (Amazon Office: channel alone = the hard filter, the shift 0.2-2% below it; docs/RESULTS.md) validation
# can turn it down or off.
SHIFT_SCALES = (0.0, 0.5, 1.0)
# A larger shift must earn its place: the smallest shift scale whose validation score is within this
# fraction of the best is kept, the score averaged over the tasks the polarity serves (its own and compound).
# Where the shift carries no within-tag signal its grid is flat and the maximum is noise, and a negative shift
# that helps "no <tag>" can cost the compound task more (Amazon Office, docs/RESULTS.md).
SHIFT_MIN_GAIN = 0.01
# The shift-alone pass reads at most this many validation users (all of them on catalogues of the shared
# sizes): its choices are differences of a few percent, which 1,000 users cannot tell from noise.
CALIBRATION_USERS = 10_000


@torch.no_grad()
def scale_shift(model, polarity: int, s: float) -> None:
    """Multiply ``polarity``'s steering by ``s`` in place: its shift of h (its experts' last layer) and, with
    the tag channel, that polarity's channel strength (``tag_log_scale``), so the whole of it scales by ``s``."""
    moe = model.moe
    n = model.cfg.experts_per_polarity
    sl = slice(0, n) if polarity == POLARITY_POSITIVE else slice(n, 2 * n)
    moe.w2[sl] *= s
    moe.b2[sl] *= s
    if model.cfg.tag_channel:
        model.tag_log_scale[0 if polarity == POLARITY_POSITIVE else 1] += float(np.log(s))


def _pick_negative(rows: list[tuple[float, dict]], max_violation: float) -> float:
    ok = [(s, r) for s, r in rows if r["violation@10"] <= max_violation]
    if ok:
        return max(ok, key=lambda sr: (sr[1]["ndcg@10"], -sr[0]))[0]
    return min(rows, key=lambda sr: (sr[1]["violation@10"], -sr[1]["ndcg@10"]))[0]


@torch.no_grad()
def calibrate_shift_scales(model, catalogue, val_cases: dict, ctx, seed: int = 0, scales=SCALES,
                           max_violation: float = 0.05, shift_cases: dict | None = None) -> dict:
    """Choose and fold in each polarity's shift scale; returns what was measured and chosen. ``val_cases``
    (positive, negative) serve the first pass; ``shift_cases`` (positive, negative, compound: more users) the
    tag channel's second pass, where the choices are smaller than 1,000 users can tell apart; without them,
    ``val_cases``."""
    from dpr.eval.protocol import run_task

    if model.cfg.moe != "moe":
        return {"skipped": f"moe={model.cfg.moe!r}: one expert serves both polarities"}
    out: dict = {}
    for task, pol in (("positive", POLARITY_POSITIVE), ("negative", POLARITY_NEGATIVE)):
        cases = val_cases.get(task)
        if cases is None or not len(cases):
            continue
        rows, current = [], 1.0
        for s in scales:
            scale_shift(model, pol, s / current)
            current = s
            rows.append((s, run_task(model, catalogue, cases, ctx, seed=seed, methods=("dpr",))["dpr"]))
        best = _pick(task, rows, max_violation)
        scale_shift(model, pol, best / current)
        out[task] = {"scale": best, "grid": [{"scale": s, **{k: round(v, 4) for k, v in r.items()}} for s, r in rows]}
        out[task]["final"] = out[task]["grid"][[s for s, _ in rows].index(best)]
        if model.cfg.tag_channel:
            sc = shift_cases or val_cases
            out[task].update(_calibrate_shift_alone(model, pol, task, catalogue, sc.get(task, cases), ctx, seed,
                                                    max_violation, sc.get("compound")))
    return out


def _pick(task: str, rows: list[tuple[float, dict]], max_violation: float) -> float:
    if task == "positive":
        return max(rows, key=lambda sr: (_task_score(task, sr[1], max_violation), -abs(sr[0] - 1)))[0]
    return _pick_negative(rows, max_violation)


def _task_score(task: str, r: dict, max_violation: float) -> float:
    if task == "positive":
        return r["ndcg@10"] + 0.1 * r["tag_precision@10"]
    # negative and compound: NDCG, provided the negative prompt's tag stays out
    return r["ndcg@10"] if r.get("violation@10", 0.0) <= max_violation else -float("inf")


def _pick_smallest_shift(task: str, rows: list[tuple[float, dict]], max_violation: float) -> float:
    """The smallest shift scale within SHIFT_MIN_GAIN of the best score; when no scale keeps the violation
    bound (negative), the one :func:`_pick_negative` takes."""
    scores = [(s, _task_score(task, r, max_violation)) for s, r in rows]
    top = max(v for _, v in scores)
    if top == -float("inf"):
        return _pick_negative(rows, max_violation)
    return min(s for s, v in scores if v >= top - SHIFT_MIN_GAIN * abs(top))


def _pick_shift_for_tasks(tasks: list[tuple[str, list[tuple[float, dict]]]], max_violation: float) -> float:
    """The shift scale for a polarity from every task it serves (its own, and compound, where both prompts
    act): each task's score relative to the shift turned off, averaged; the smallest scale within
    SHIFT_MIN_GAIN of the best average. Falls back to the own task alone when the shift turned off breaks
    the violation bound or scores nothing (no reference to be relative to)."""
    own_task, own_rows = tasks[0]
    rel = {}
    for task, rows in tasks:
        base = _task_score(task, rows[0][1], max_violation)
        if rows[0][0] != 0.0 or not base > 0 or base == float("inf"):
            return _pick_smallest_shift(own_task, own_rows, max_violation)
        for sc, r in rows:
            rel.setdefault(sc, []).append(_task_score(task, r, max_violation) / base)
    avg = {sc: sum(v) / len(v) for sc, v in rel.items()}
    top = max(avg.values())
    return min(sc for sc, v in avg.items() if v >= top - SHIFT_MIN_GAIN)


@torch.no_grad()
def _calibrate_shift_alone(model, polarity, task, catalogue, cases, ctx, seed, max_violation,
                           compound_cases=None) -> dict:
    """The second pass (tag channel only): the shift of h scaled by each of SHIFT_SCALES, the channel kept,
    judged on the polarity's own task and on compound (both prompts at once), when its cases are given."""
    from dpr.eval.protocol import run_task

    moe, n = model.moe, model.cfg.experts_per_polarity
    sl = slice(0, n) if polarity == POLARITY_POSITIVE else slice(n, 2 * n)
    w2, b2 = moe.w2[sl].clone(), moe.b2[sl].clone()
    rows, comp = [], []
    for s in SHIFT_SCALES:
        moe.w2[sl], moe.b2[sl] = w2 * s, b2 * s
        rows.append((s, run_task(model, catalogue, cases, ctx, seed=seed, methods=("dpr",))["dpr"]))
        if compound_cases is not None and len(compound_cases):
            comp.append((s, run_task(model, catalogue, compound_cases, ctx, seed=seed, methods=("dpr",))["dpr"]))
    tasks = [(task, rows)] + ([("compound", comp)] if comp else [])
    best = _pick_shift_for_tasks(tasks, max_violation)
    moe.w2[sl], moe.b2[sl] = w2 * best, b2 * best
    grid = [{"shift_scale": s, **{k: round(v, 4) for k, v in r.items()}} for s, r in rows]
    out = {"shift_scale": best, "shift_grid": grid, "final": grid[[s for s, _ in rows].index(best)]}
    if comp:
        out["shift_grid_compound"] = [{"shift_scale": s, **{k: round(v, 4) for k, v in r.items()}} for s, r in comp]
    return out
