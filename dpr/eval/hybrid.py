"""How much of the negative prompt's steering to keep when an exact filter already enforces it.

``dpr_hard_filter`` steers by both prompts and then removes the items the request rules out. For a
negative prompt the filter alone removes every forbidden item, so what the steering still does is
reorder the allowed ones. This sweeps ``negative_weight`` (the share of the negative prompt's shift,
``h' = h + d_pos + w * d_neg``) over the tasks with a negative prompt, on the validation split to
choose and the test split to report, beside the hard filter::

    python -m dpr.eval.hybrid build/ml1m/sasrec.pt --dataset ml-1m --data-dir ../shared/data/ml-1m
"""

from __future__ import annotations

import argparse
import sys

TASKS = ("negative", "compound")
WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


def negative_weight_sweep(model, dataset, ctx, weights=WEIGHTS, splits=("valid", "test"), tasks=TASKS,
                          k: int = 10, seed: int = 0, max_users: int = 0, window: int = 10) -> dict:
    """``{split: {task: {"hard_filter": metrics, "weights": {w: dpr_hard_filter metrics}}}}``; the cases and
    prompt wordings are the ones ``evaluate`` draws, so weight 1 reproduces its ``dpr_hard_filter``."""
    from dpr.data.cases import build_eval_cases
    from dpr.eval.protocol import run_task

    out: dict = {}
    for split in splits:
        for task in tasks:
            cases = build_eval_cases(dataset, split=split, task=task, seed=seed, max_users=max_users, window=window)
            if not len(cases):
                continue
            row = {"cases": len(cases), "weights": {}}
            for i, w in enumerate(weights):     # the filter rides along with the first weight's pass
                got = run_task(model, dataset.catalogue, cases, ctx, k=k, seed=seed, negative_weight=float(w),
                               methods=("dpr_hard_filter", "hard_filter") if i == 0 else ("dpr_hard_filter",))
                row["weights"][float(w)] = got["dpr_hard_filter"]
                row.setdefault("hard_filter", got.get("hard_filter"))
            out.setdefault(split, {})[task] = row
    return out


def format_sweep(sweep: dict, k: int = 10) -> str:
    """One markdown table: a row per weight, NDCG and recall per split x task, the filter last."""
    cols = [(s, t) for s in sweep for t in sweep[s]]
    head = "| negative weight | " + " | ".join(f"{t} {s}: NDCG@{k} / Recall@{k}" for s, t in cols) + " |"
    lines = [head, "|---|" + "---:|" * len(cols)]
    weights = sorted({w for s, t in cols for w in sweep[s][t]["weights"]})
    for w in weights:
        cells = []
        for s, t in cols:
            m = sweep[s][t]["weights"].get(w)
            cells.append(f"{m[f'ndcg@{k}']:.4f} / {m[f'recall@{k}']:.4f}" if m else "-")
        lines.append(f"| dpr_hard_filter, w = {w:g} | " + " | ".join(cells) + " |")
    lines.append("| hard_filter | " + " | ".join(
        f"{sweep[s][t]['hard_filter'][f'ndcg@{k}']:.4f} / {sweep[s][t]['hard_filter'][f'recall@{k}']:.4f}"
        for s, t in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from dpr.cli.args import run_cli
    from dpr.cli.common import add_dataset_args

    p = argparse.ArgumentParser(prog="python -m dpr.eval.hybrid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    add_dataset_args(p)
    p.add_argument("--weights", default=",".join(f"{w:g}" for w in WEIGHTS))
    p.add_argument("--max-users", type=int, default=0)
    p.add_argument("--text-encoder", default=None)
    args = p.parse_args(argv)
    return run_cli("dpr.eval.hybrid", lambda: _run(args))


def _run(args) -> int:
    from dpr.cli.common import load_for_evaluation, quiet_transformers
    from dpr.errors import DataError

    quiet_transformers()
    try:
        weights = [float(w) for w in args.weights.split(",") if w.strip()]
    except ValueError:
        raise DataError(f"--weights must be numbers separated by commas, got {args.weights!r}") from None
    if not weights or any(not 0.0 <= w <= 1.0 for w in weights):
        raise DataError(f"--weights must be one or more numbers in [0, 1], got {args.weights!r}")
    ckpt, dataset, model, ctx = load_for_evaluation(args)
    sweep = negative_weight_sweep(model, dataset, ctx, weights, max_users=args.max_users,
                                  window=ckpt.train_config.recent_window)
    print(format_sweep(sweep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
