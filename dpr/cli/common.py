"""Pieces the training and evaluation CLIs share."""

from __future__ import annotations

import argparse
import os


def quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers always present in core deps
        pass


def add_dataset_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="synthetic",
                        help="synthetic | ml-1m | PATH to a folder (interactions.csv + items.csv)")
    parser.add_argument("--data-dir", default=None, help="folder of ml-1m (default: ../shared/data/ml-1m)")
    parser.add_argument("--synthetic-users", type=int, default=1000)
    parser.add_argument("--synthetic-items", type=int, default=2000)
    parser.add_argument("--synthetic-tags", type=int, default=12)
    parser.add_argument("--synthetic-seed", type=int, default=0)


def load_dataset_from_args(args):
    from dpr.data import load_dataset

    if args.dataset == "synthetic":
        return load_dataset("synthetic", num_users=args.synthetic_users, num_items=args.synthetic_items,
                            num_tags=args.synthetic_tags, seed=args.synthetic_seed)
    return load_dataset(args.dataset, data_dir=args.data_dir)
