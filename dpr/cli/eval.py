"""dpr-eval: the evaluation protocol (standard / positive / negative / compound steering, with
held-out prompt wordings) on the test split; prints a table and optionally writes JSON."""

from __future__ import annotations

import argparse
import json
import sys
import time

from dpr.cli.args import run_cli
from dpr.cli.common import add_dataset_args, quiet_transformers


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpr-eval", description=__doc__)
    p.add_argument("checkpoint")
    add_dataset_args(p)
    p.add_argument("--split", default="test", choices=("test", "valid"))
    p.add_argument("--tasks", default="standard,positive,negative,compound")
    p.add_argument("--no-heldout", action="store_true", help="skip the held-out prompt wordings")
    p.add_argument("--max-users", type=int, default=0, help="evaluate the first N users only (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-encoder", default=None, help="override the checkpoint's text encoder location")
    p.add_argument("--json", default=None, help="write the results as JSON here")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("dpr-eval", lambda: _run(args))


def _run(args) -> int:
    quiet_transformers()
    from dpr.cli.common import load_for_evaluation
    from dpr.config import to_dict
    from dpr.eval.protocol import evaluate, format_table

    t0 = time.time()
    ckpt, dataset, model, ctx = load_for_evaluation(args)
    results = evaluate(model, dataset, ctx, split=args.split, tasks=tuple(args.tasks.split(",")),
                       heldout=not args.no_heldout, seed=args.seed, max_users=args.max_users,
                       window=ckpt.train_config.recent_window)
    print(format_table(results))
    print(f"\n({time.time() - t0:.1f}s)", file=sys.stderr)
    if args.json:
        payload = dict(results)
        payload["meta"] = {"dataset": dataset.stats(), "split": args.split, "checkpoint": args.checkpoint,
                           "model_config": to_dict(ckpt.model_config), "train_config": to_dict(ckpt.train_config),
                           "text_encoder": ckpt.text_encoder, "seconds": time.time() - t0}
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
