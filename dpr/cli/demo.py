"""`make demo`: train a small DPR model on the embedded synthetic dataset, evaluate it, export it,
benchmark the export and show prompted recommendations -- the whole path on a fresh machine."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from dpr.cli.args import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpr-demo", description=__doc__)
    p.add_argument("--out", default="build/demo")
    p.add_argument("--text-encoder", default=None)
    p.add_argument("--stage1-epochs", type=int, default=20)
    p.add_argument("--skip-bench", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("dpr-demo", lambda: _run(args))


def _step(title: str, cmd: list[str]) -> None:
    print(f"\n==> {title}\n    $ {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)


def _run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "ckpt.pt"
    py = sys.executable
    enc = ["--text-encoder", args.text_encoder] if args.text_encoder else []
    _step("train DPR on the synthetic dataset (3 stages)",
          [py, "-m", "dpr.cli.train", "--dataset", "synthetic", "--out", str(ckpt),
           "--stage1-epochs", str(args.stage1_epochs), *enc])
    _step("evaluate (test split, 500 users)",
          [py, "-m", "dpr.cli.eval", str(ckpt), "--dataset", "synthetic", "--max-users", "500",
           "--json", str(out / "eval.json"), *enc])
    export_dir = out / "export"
    try:
        import dpr.export.cli  # noqa: F401
        has_export = True
    except ImportError:
        has_export = False
    if has_export:
        _step("export to ONNX", [py, "-m", "dpr.export.cli", str(ckpt), "--out", str(export_dir), "--force", *enc])
    try:
        import dpr.bench.cli  # noqa: F401
        if has_export and not args.skip_bench:
            _step("benchmark the export", [py, "-m", "dpr.bench.cli", "--model", str(export_dir), "--batch", "512",
                                           "--iters", "5", "--warmup", "1", "--json", str(out / "bench.json")])
    except ImportError:
        pass
    print("\n==> prompted recommendations", flush=True)
    _show(ckpt, export_dir if has_export else None, args.text_encoder)
    return 0


def _show(ckpt_path: Path, export_dir: Path | None, text_encoder: str | None) -> None:
    """Recommendations for one user with no prompt, a positive, a negative and a compound prompt."""
    from dpr.cli.common import quiet_transformers

    quiet_transformers()
    try:
        from dpr.engine import Engine  # the engine, when the export exists
    except ImportError:
        Engine = None
    from dpr.checkpoint import load_checkpoint
    from dpr.data import load_dataset

    ck = load_checkpoint(ckpt_path)
    ds = load_dataset("synthetic")
    hist_idx = ds.sequences[0][-8:]
    history = [ck.catalogue.ids[i - 1] for i in hist_idx]
    tags = ck.catalogue.tag_names
    print("history:", "; ".join(ck.catalogue.titles[i - 1] for i in hist_idx[-5:]))
    requests = [(None, None), (f"I want to watch {tags[0]} movies", None), (None, f"no {tags[1]} please"),
                (f"show me more {tags[2]}", f"anything but {tags[3]}")]
    if Engine is not None and export_dir is not None and (export_dir / "manifest.json").is_file():
        engine = Engine.load(str(export_dir))
        for pos, neg in requests:
            rec = engine.recommend([history], prompts=[pos], negative_prompts=[neg], k=5)
            _print(pos, neg, rec.titles[0], [", ".join(t) for t in rec.tags[0]])
        return
    import torch
    from dpr.data.dataset import left_pad
    from dpr.eval.ranking import topk_full
    from dpr.model import TextEncoder

    model = ck.build_model()
    enc = TextEncoder.load(text_encoder or ck.text_encoder["source"])
    hist = torch.from_numpy(left_pad([hist_idx], model.cfg.max_len))
    for pos, neg in requests:
        t = enc.encode([pos or "", neg or ""])
        pres = torch.tensor([[pos is not None, neg is not None]], dtype=torch.int64)
        with torch.no_grad():
            h = model(hist, model.project_prompt(t[:1]), model.project_prompt(t[1:]), pres)
        top = topk_full(h, model.item_table, 5, hist)[0]
        _print(pos, neg, [ck.catalogue.titles[i - 1] for i in top], [", ".join(ck.catalogue.tags[i - 1]) for i in top])


def _print(pos, neg, titles, tags) -> None:
    print(f"\n  prompt: {pos!r}  negative: {neg!r}")
    for r, (title, tag) in enumerate(zip(titles, tags), 1):
        print(f"    {r}. {title}  [{tag}]")


if __name__ == "__main__":
    sys.exit(main())
