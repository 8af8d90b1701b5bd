"""``dpr-recommend EXPORT_DIR --history 1,2,3 [--prompt ...] [--negative ...] [-k 10] [--backend ...] [--json]``

A result shorter than ``k`` (the history and the hard filter leave fewer eligible items) ends with a
``note:`` line saying why; with ``--json``, ``count`` and ``short_reason`` say the same."""

from __future__ import annotations

import argparse
import json
import sys

from dpr.cli.args import run_cli

PROG = "dpr-recommend"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Recommend items from a dpr-export folder.")
    p.add_argument("export_dir", help="folder written by dpr-export")
    p.add_argument("--history", required=True, help="comma-separated original item ids, oldest first")
    p.add_argument("--prompt", default=None, help="positive prompt (what to see more of)")
    p.add_argument("--negative", default=None, help="negative prompt (what to avoid)")
    p.add_argument("-k", type=int, default=10, help="number of items (default 10)")
    p.add_argument("--backend", default="auto", help="auto | onnxruntime | torch | tensorrt")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--retriever", default="auto", help="auto | onnxruntime | torch | faiss")
    p.add_argument("--include-tags", default=None, help="comma-separated: only items with one of these tags")
    p.add_argument("--exclude-tags", default=None, help="comma-separated: no items with any of these tags")
    p.add_argument("--keep-history", action="store_true", help="allow items already in the history")
    p.add_argument("--unknown-items", choices=("error", "ignore"), default="error")
    p.add_argument("--checkpoint", default=None, help="torch backend: the checkpoint the export came from")
    p.add_argument("--no-fused", action="store_true", help="onnxruntime: use the portable user encoder")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="print the backend choice and timings")
    return p


def _split(s):
    return [x.strip() for x in s.split(",") if x.strip()] if s else []


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def go() -> int:
        from dpr.engine import Engine

        opts = {}
        if args.checkpoint:
            opts["checkpoint"] = args.checkpoint
        if args.no_fused:
            opts["fused"] = False
        engine = Engine.load(args.export_dir, backend=args.backend, device=args.device, retriever=args.retriever,
                             unknown_items=args.unknown_items, backend_options=opts)
        flt = None
        if args.include_tags or args.exclude_tags:
            flt = {"include_tags": _split(args.include_tags), "exclude_tags": _split(args.exclude_tags)}
        timings: dict = {}
        recs = engine.recommend([_split(args.history)], prompts=[args.prompt], negative_prompts=[args.negative],
                                k=args.k, exclude_history=not args.keep_history, hard_filter=flt, timings=timings)
        rec = recs[0]
        if args.json:
            out = {"backend": engine.backend_name, "choice_reason": engine.choice_reason, **rec.to_dict()}
            if args.verbose:
                out["timings_s"] = timings
            print(json.dumps(out, ensure_ascii=False, indent=2))
        else:
            if args.verbose:
                print(f"# {engine.choice_reason}", file=sys.stderr)
            for i, (t, g, s, a) in enumerate(zip(rec.titles, rec.tags, rec.scores, rec.item_ids), start=1):
                print(f"{i:3d}. {t} [{', '.join(g)}]  score={s:.4f}  (id {a})")
            if not len(rec):
                print("(no eligible items)")
            if rec.short:
                print(f"note: {rec.count} of the {rec.k} items asked for: {rec.short_reason}")
        return 0

    return run_cli(PROG, go)


if __name__ == "__main__":
    sys.exit(main())
