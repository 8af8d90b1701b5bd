"""dpr-train: run the three training stages and write a checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
import time

from dpr.cli.args import add_dataclass_args, dataclass_from_args, run_cli
from dpr.cli.common import add_dataset_args, load_dataset_from_args, quiet_transformers
from dpr.config import ModelConfig, TrainConfig, from_dict


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpr-train", description=__doc__)
    add_dataset_args(p)
    p.add_argument("--text-encoder", default=None,
                   help="Hugging Face encoder name or folder (default: the [encoder] extra's all-MiniLM-L6-v2; "
                        "not needed when only stage 1 runs)")
    p.add_argument("--out", required=True, help="checkpoint path to write (e.g. ckpt.pt)")
    p.add_argument("--stages", default="1,2,3", help="comma-separated stages to run (default 1,2,3)")
    p.add_argument("--resume", default=None, help="checkpoint to continue from (e.g. to run stage 3 alone)")
    p.add_argument("--config", default=None, help="JSON file with {'model': {...}, 'train': {...}} fields")
    p.add_argument("--val-users", type=int, default=1000, help="validation users for steering model selection")
    add_dataclass_args(p, ModelConfig, skip=("num_items", "num_tags", "text_dim", "tag_channel"),
                       title="model")      # tag_channel: --tag-channel sets TrainConfig's (1 / 0 / -1 auto)
    add_dataclass_args(p, TrainConfig, title="training")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("dpr-train", lambda: _run(args))


def _run(args) -> int:
    quiet_transformers()
    from dpr.checkpoint import load_checkpoint, save_checkpoint
    from dpr.model import TextEncoder
    from dpr.train.pipeline import train

    model_cfg, train_cfg = ModelConfig(), TrainConfig()
    if args.config:
        with open(args.config) as fh:
            cfg = json.load(fh)
        model_cfg = from_dict(ModelConfig, cfg.get("model", {}))
        train_cfg = from_dict(TrainConfig, cfg.get("train", {}))
    model_cfg = dataclass_from_args(ModelConfig, args, model_cfg)
    train_cfg = dataclass_from_args(TrainConfig, args, train_cfg)
    stages = tuple(int(s) for s in args.stages.split(",") if s.strip())
    t0 = time.time()
    dataset = load_dataset_from_args(args)
    print(f"dataset: {dataset.stats()}", file=sys.stderr)
    resume = load_checkpoint(args.resume) if args.resume else None
    source = args.text_encoder or (resume.text_encoder.get("source") if resume else None)
    # Stage 1 alone never reads text, so it runs where no encoder is installed (e.g. a GPU box).
    encoder = TextEncoder.load(source) if (set(stages) - {1} or args.text_encoder) else None
    overrides = None
    if resume is not None:
        # Model flags given with --resume: steering fields rebuild the steering modules (ablations on one
        # backbone); backbone fields must match the checkpoint.
        given = {f: getattr(args, f) for f in ModelConfig.__dataclass_fields__
                 if f != "tag_channel" and getattr(args, f, None) is not None}
        from dpr.train.pipeline import STEERING_FIELDS

        clash = {k: v for k, v in given.items() if k not in STEERING_FIELDS and getattr(resume.model_config, k) != v}
        if clash:
            raise ValueError(f"--resume: {', '.join('--' + k.replace('_', '-') for k in clash)} differ from the "
                             f"checkpoint's model; only {', '.join(STEERING_FIELDS)} may change when resuming")
        overrides = {k: v for k, v in given.items() if k in STEERING_FIELDS}
    ckpt = train(dataset, model_cfg, train_cfg, encoder, stages=stages, resume=resume,
                 log=lambda m: print(m, file=sys.stderr), val_users=args.val_users, steering_overrides=overrides)
    ckpt.meta["train_seconds"] = ckpt.meta.get("train_seconds", 0.0) + time.time() - t0
    path = save_checkpoint(ckpt, args.out)
    print(f"wrote {path} (stages {list(stages)}, {time.time() - t0:.0f}s; "
          f"valid standard {ckpt.meta.get('valid_standard')})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
