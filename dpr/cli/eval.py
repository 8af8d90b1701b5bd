"""dpr-eval: the evaluation protocol (standard / positive / negative / compound steering, with
held-out prompt wordings and natural wordings that never name the tag) on the test split; prints a table
and optionally writes JSON."""

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
    p.add_argument("--wordings", default="auto", metavar="FILE|auto|none",
                   help="natural wordings (JSON, see dpr.data.wordings) for the *_natural tasks; 'auto' "
                        "(default): configs/wordings/<dataset>.json when it exists (ml-1m.json, or the "
                        "dataset folder's name), else none; 'none': skip them")
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
    wordings = _load_wordings(args, dataset.catalogue.tag_names)
    results = evaluate(model, dataset, ctx, split=args.split, tasks=tuple(args.tasks.split(",")),
                       heldout=not args.no_heldout, seed=args.seed, max_users=args.max_users,
                       window=ckpt.train_config.recent_window, wordings=wordings)
    print(format_table(results))
    print(f"\n({time.time() - t0:.1f}s)", file=sys.stderr)
    if args.json:
        payload = dict(results)
        payload["meta"] = {"dataset": dataset.stats(), "split": args.split, "checkpoint": args.checkpoint,
                           "model_config": to_dict(ckpt.model_config), "train_config": to_dict(ckpt.train_config),
                           "text_encoder": ckpt.text_encoder, "seconds": time.time() - t0}
        if wordings is not None:
            payload["meta"]["wordings"] = {"source": wordings.source, "fingerprint": wordings.fingerprint,
                                           "coverage": wordings.coverage(dataset.catalogue.tag_names)}
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=2)
    return 0


def _load_wordings(args, tag_names):
    """The natural wordings ``--wordings`` asks for (validated against the catalogue's tags), or None."""
    from dpr.data.wordings import find_wordings, load_wordings, wordings_name

    spec = (args.wordings or "none").strip()
    if spec.lower() in ("none", "off", "no"):
        return None
    if spec.lower() == "auto":
        path = find_wordings(args.dataset, args.data_dir)
        if path is None:
            name = wordings_name(args.dataset, args.data_dir)
            if name:
                print(f"dpr-eval: no natural wordings for {name!r} (configs/wordings/{name}.json not found); "
                      "the *_natural tasks are skipped", file=sys.stderr)
            return None
    else:
        path = spec
    wordings = load_wordings(path, tag_names)
    cov = wordings.coverage(tag_names)
    print(f"dpr-eval: natural wordings {path}: positive for {cov['positive']['tags']}/{cov['positive']['of']} "
          f"tags, negative for {cov['negative']['tags']}/{cov['negative']['of']}", file=sys.stderr)
    return wordings


if __name__ == "__main__":
    sys.exit(main())
