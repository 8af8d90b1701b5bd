"""Markdown tables of ``dpr-eval`` JSON files (docs/RESULTS.md, the README summary).

    python -m dpr.eval.results_md build/ml1m/sasrec.json build/ml1m/gru4rec.json [--summary]

Every task x method x metric per file; ``--ablation`` gives one row per file (variants of one backbone, the
first file the default) with the steering columns and a last row of the filters; ``--summary`` gives the short cross-backbone table (the targets
of the ML-1M issue: standard NDCG@10, positive NDCG@10 of dpr vs post_filter, negative violation@10 and
Recall@10). The paper's published figures are printed beside ours where it has one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METRICS = ("ndcg@10", "recall@10", "tag_precision@10", "violation@10")
# arXiv 2602.18929 (ML-1M): standard NDCG@10, negative Recall@10; positive is a relative gain over filters.
PAPER = {("standard", "ndcg@10"): 0.1838, ("negative", "recall@10"): 0.2076}


def _fmt(x) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "-"


def full_table(name: str, res: dict) -> str:
    out = [f"### {name}", ""]
    cases = res.get("cases", {})
    for task, methods in res.items():
        if task in ("cases", "meta") or not isinstance(methods, dict):
            continue
        present = [m for m in METRICS if any(m in v for v in methods.values())]
        out.append(f"**{task}** ({cases.get(task, '?')} cases)")
        out.append("")
        out.append("| method | " + " | ".join(present) + " |")
        out.append("|---|" + "---:|" * len(present))
        for method, vals in methods.items():
            out.append(f"| {method} | " + " | ".join(_fmt(vals.get(m)) for m in present) + " |")
        if any((task, m) in PAPER for m in present):
            out.append(f"| *paper* | " + " | ".join(_fmt(PAPER.get((task, m))) for m in present) + " |")
        out.append("")
    return "\n".join(out)


def summary_table(named: dict[str, dict]) -> str:
    rows = [
        ("standard NDCG@10 (paper 0.1838)", lambda r: r["standard"]["backbone"]["ndcg@10"]),
        ("positive NDCG@10: dpr", lambda r: r["positive"]["dpr"]["ndcg@10"]),
        ("positive NDCG@10: post_filter", lambda r: r["positive"]["post_filter"]["ndcg@10"]),
        ("positive: dpr / post_filter (paper 1.72)",
         lambda r: r["positive"]["dpr"]["ndcg@10"] / max(r["positive"]["post_filter"]["ndcg@10"], 1e-12)),
        ("positive NDCG@10: post_filter_k (top-10 filtered, no refill)",
         lambda r: r["positive"]["post_filter_k"]["ndcg@10"]),
        ("positive: dpr / post_filter_k",
         lambda r: r["positive"]["dpr"]["ndcg@10"] / max(r["positive"]["post_filter_k"]["ndcg@10"], 1e-12)),
        ("positive NDCG@10: dpr_hard_filter vs hard_filter",
         lambda r: f"{r['positive']['dpr_hard_filter']['ndcg@10']:.4f} vs {r['positive']['hard_filter']['ndcg@10']:.4f}"),
        ("positive tag_precision@10: dpr", lambda r: r["positive"]["dpr"]["tag_precision@10"]),
        ("negative violation@10: dpr (backbone)",
         lambda r: f"{r['negative']['dpr']['violation@10']:.4f} ({r['negative']['backbone']['violation@10']:.4f})"),
        ("negative Recall@10: dpr / backbone / hard_filter",
         lambda r: " / ".join(f"{r['negative'][m]['recall@10']:.4f}" for m in ("dpr", "backbone", "hard_filter"))),
        ("negative Recall@10: dpr_hard_filter", lambda r: r["negative"]["dpr_hard_filter"]["recall@10"]),
        ("compound NDCG@10: dpr vs hard_filter",
         lambda r: f"{r['compound']['dpr']['ndcg@10']:.4f} vs {r['compound']['hard_filter']['ndcg@10']:.4f}"),
        ("held-out wordings, positive NDCG@10: dpr", lambda r: r["positive_heldout"]["dpr"]["ndcg@10"]),
        ("held-out wordings, negative violation@10: dpr", lambda r: r["negative_heldout"]["dpr"]["violation@10"]),
    ]
    names = list(named)
    out = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for label, fn in rows:
        cells = []
        for n in names:
            try:
                v = fn(named[n])
            except (KeyError, TypeError, ZeroDivisionError):
                v = None
            cells.append(v if isinstance(v, str) else _fmt(v))
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


# (column header, task, method, metric) of the ablation table
ABLATION_COLUMNS = (
    ("positive NDCG@10 dpr", "positive", "dpr", "ndcg@10"),
    ("positive tag prec. dpr", "positive", "dpr", "tag_precision@10"),
    ("positive NDCG@10 dpr_hard_filter", "positive", "dpr_hard_filter", "ndcg@10"),
    ("negative violation@10 dpr", "negative", "dpr", "violation@10"),
    ("negative Recall@10 dpr", "negative", "dpr", "recall@10"),
    ("negative Recall@10 dpr_hard_filter", "negative", "dpr_hard_filter", "recall@10"),
    ("compound NDCG@10 dpr", "compound", "dpr", "ndcg@10"),
)
# what the filters score in the same column (all variants share the backbone, so any file has them)
ABLATION_FILTERS = {"positive NDCG@10 dpr": ("positive", "hard_filter", "ndcg@10"),
                    "negative violation@10 dpr": ("negative", "backbone", "violation@10"),
                    "negative Recall@10 dpr": ("negative", "hard_filter", "recall@10"),
                    "compound NDCG@10 dpr": ("compound", "hard_filter", "ndcg@10")}


def ablation_table(named: dict[str, dict]) -> str:
    def get(r, task, method, metric):
        try:
            return r[task][method][metric]
        except (KeyError, TypeError):
            return None

    out = ["| variant | " + " | ".join(c[0] for c in ABLATION_COLUMNS) + " |",
           "|---|" + "---:|" * len(ABLATION_COLUMNS)]
    for name, r in named.items():
        out.append(f"| {name} | " + " | ".join(_fmt(get(r, *c[1:])) for c in ABLATION_COLUMNS) + " |")
    first = next(iter(named.values()))
    cells = []
    for c in ABLATION_COLUMNS:
        f = ABLATION_FILTERS.get(c[0])
        cells.append(f"{f[1]} {_fmt(get(first, *f))}" if f else "")
    out.append("| *filters / backbone, same users* | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="dpr-eval --json outputs")
    p.add_argument("--summary", action="store_true", help="only the short cross-file summary")
    p.add_argument("--ablation", action="store_true", help="one row per file: variants of one backbone")
    args = p.parse_args(argv)
    named = {}
    for f in args.files:
        try:
            named[Path(f).stem] = json.loads(Path(f).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"results_md: error: cannot read {f}: {exc}", file=sys.stderr)
            return 2
    if args.ablation:
        print(ablation_table(named))
        return 0
    print(summary_table(named))
    if not args.summary:
        for n, r in named.items():
            print("\n" + full_table(n, r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
