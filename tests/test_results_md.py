"""The markdown report of dpr-eval JSON (docs/RESULTS.md)."""

import json

from dpr.eval.results_md import main, summary_table


def _res(pos_dpr, pos_pf):
    m = lambda **kw: dict(kw)  # noqa: E731
    steer = {"backbone": m(**{"ndcg@10": 0.1, "recall@10": 0.2, "tag_precision@10": 0.3, "violation@10": 0.35}),
             "post_filter": m(**{"ndcg@10": pos_pf, "recall@10": 0.3, "tag_precision@10": 0.9, "violation@10": 0.0}),
             "post_filter_k": m(**{"ndcg@10": 0.25, "recall@10": 0.2, "tag_precision@10": 0.3, "violation@10": 0.0}),
             "hard_filter": m(**{"ndcg@10": 0.38, "recall@10": 0.58, "tag_precision@10": 1.0, "violation@10": 0.0}),
             "dpr": m(**{"ndcg@10": pos_dpr, "recall@10": 0.5, "tag_precision@10": 0.95, "violation@10": 0.02}),
             "dpr_hard_filter": m(**{"ndcg@10": 0.4, "recall@10": 0.6, "tag_precision@10": 1.0, "violation@10": 0.0})}
    return {"standard": {"backbone": {"ndcg@10": 0.18, "recall@10": 0.3}, "dpr": {"ndcg@10": 0.18, "recall@10": 0.3}},
            "positive": steer, "negative": steer, "compound": steer, "positive_heldout": steer,
            "negative_heldout": steer, "cases": {"standard": 10, "positive": 9}}


def test_summary_ratio_and_paper_row(tmp_path, capsys):
    t = summary_table({"a": _res(0.4, 0.2), "b": _res(0.3, 0.3)})
    ratio = [line for line in t.splitlines() if line.startswith("| positive: dpr / post_filter")][0]
    assert "| 2.0000 | 1.0000 |" in ratio
    ratio_k = [line for line in t.splitlines() if line.startswith("| positive: dpr / post_filter_k")][0]
    assert "| 1.6000 | 1.2000 |" in ratio_k
    f = tmp_path / "sasrec.json"
    f.write_text(json.dumps(_res(0.4, 0.2)))
    assert main([str(f)]) == 0
    out = capsys.readouterr().out
    assert "**positive** (9 cases)" in out and "| *paper* | 0.1838 |" in out
    assert main([str(tmp_path / "missing.json")]) == 2


def test_ablation_table_rows_and_filter_row(tmp_path, capsys):
    from dpr.eval.results_md import ablation_table

    t = ablation_table({"default": _res(0.4, 0.2), "no-moe": _res(0.35, 0.2)}).splitlines()
    assert t[0].startswith("| variant | positive NDCG@10 dpr |")
    assert t[2].startswith("| default | 0.4000 |") and t[3].startswith("| no-moe | 0.3500 |")
    assert "hard_filter 0.3800" in t[-1] and "backbone 0.3500" in t[-1]   # the filters' own scores
    a, b = tmp_path / "default.json", tmp_path / "no-moe.json"
    a.write_text(json.dumps(_res(0.4, 0.2)))
    b.write_text(json.dumps(_res(0.35, 0.2)))
    assert main([str(a), str(b), "--ablation"]) == 0
    out = capsys.readouterr().out
    assert "| no-moe | 0.3500 |" in out and "**positive**" not in out
