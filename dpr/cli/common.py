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


def load_for_evaluation(args):
    """``(checkpoint, dataset, model, context)`` for the evaluation CLIs: the checkpoint, the dataset of
    ``add_dataset_args`` (refused when its catalogue is not the checkpoint's), the model and the
    evaluation context (prompt and item-text embeddings from the checkpoint's text encoder, or
    ``args.text_encoder``)."""
    from dpr.checkpoint import load_checkpoint
    from dpr.data.prompts import PromptBank
    from dpr.errors import DataError
    from dpr.eval.protocol import build_context
    from dpr.model import TextEncoder

    ckpt = load_checkpoint(args.checkpoint)
    dataset = load_dataset_from_args(args)
    if dataset.catalogue.ids != ckpt.catalogue.ids:
        raise DataError(f"dataset {args.dataset!r} has a different item catalogue than the checkpoint "
                        f"({dataset.num_items} vs {ckpt.catalogue.num_items} items)")
    encoder = TextEncoder.load(args.text_encoder or ckpt.text_encoder["source"])
    ctx = build_context(encoder, ckpt.catalogue, PromptBank(heldout=ckpt.train_config.heldout_templates))
    return ckpt, dataset, ckpt.build_model(), ctx
