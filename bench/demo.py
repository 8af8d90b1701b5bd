"""`make demo` (``python -m dpr.bench.demo``): train a small DPR model on the embedded synthetic dataset,
evaluate it, export it, benchmark the export at the demo's size and show prompted recommendations -- the whole
path on a fresh machine in a few minutes. The full benchmark stays one command away (printed at the end).

It lives with the benchmark, the top of the stack: it drives the core (``dpr``: training, evaluation), the
exporter, the benchmark and the engine, so the core package never imports the applications built on it."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from dpr.cli.args import run_cli
from dpr.cli.common import quiet_transformers
from dpr.engine import Engine, load_export


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


def python_command() -> list[str]:
    """This interpreter, never with the working directory on sys.path (-P, Python >= 3.11): the demo runs
    from the repository root, whose folders must not stand in for installed modules (docs/ARCHITECTURE.md)."""
    return [sys.executable, "-P"] if sys.version_info >= (3, 11) else [sys.executable]


def _step(title: str, cmd: list[str], times: dict) -> None:
    print(f"\n==> {title}\n    $ {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    times[title] = time.perf_counter() - t0


def _run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt, export_dir = out / "ckpt.pt", out / "export"
    py = python_command()
    enc = ["--text-encoder", args.text_encoder] if args.text_encoder else []
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    _step("train DPR on the synthetic dataset (3 stages)",
          [*py, "-m", "dpr.cli.train", "--dataset", "synthetic", "--out", str(ckpt),
           "--stage1-epochs", str(args.stage1_epochs), *enc], times)
    _step("evaluate (test split, 500 users)",
          [*py, "-m", "dpr.cli.eval", str(ckpt), "--dataset", "synthetic", "--max-users", "500",
           "--json", str(out / "eval.json"), *enc], times)
    _step("export to ONNX", [*py, "-m", "dpr.export.cli", str(ckpt), "--out", str(export_dir), "--force", *enc],
          times)
    if not args.skip_bench:
        # sized to the demo: its own catalogue, a short timing loop; `dpr-bench --batch 512` is the full run
        n_items = int(load_export(export_dir).item_embeddings().shape[0])
        _step("benchmark the export (sized to the demo)",
              [*py, "-m", "dpr.bench.cli", "--model", str(export_dir), "--batch", "256", "--iters", "3",
               "--warmup", "1", "--retrieval-items", str(n_items), "--ceiling-size", "1024",
               "--gate-min-time", "0.1", "--no-progress", "--json", str(out / "bench.json")], times)
    print("\n==> prompted recommendations", flush=True)
    t1 = time.perf_counter()
    _show(ckpt, export_dir)
    times["recommend"] = time.perf_counter() - t1
    print(f"\n==> done in {time.perf_counter() - t0:.0f} s: "
          + ", ".join(f"{k.split(' (')[0]} {v:.0f} s" for k, v in times.items()))
    print(f"    full benchmark: dpr-bench --model {export_dir} --batch 512")
    return 0


def _show(ckpt_path: Path, export_dir: Path) -> None:
    """Recommendations for one user with no prompt, a positive, a negative and a compound prompt, with the
    ids a reader needs for the next command and the tags to judge the steering by."""
    quiet_transformers()
    from dpr.checkpoint import load_checkpoint
    from dpr.data import load_dataset

    cat = load_checkpoint(ckpt_path).catalogue
    hist_idx = load_dataset("synthetic").sequences[0][-8:]
    history = [cat.ids[i - 1] for i in hist_idx]
    tags = cat.tag_names
    print("history of user u1 (oldest first):")
    for i in hist_idx:
        print(f"    {cat.ids[i - 1]:<6} {cat.titles[i - 1]}  [{', '.join(cat.tags[i - 1])}]")
    requests = [(None, None), (f"I want to watch {tags[0]} movies", None), (None, f"no {tags[1]} please"),
                (f"show me more {tags[2]}", f"anything but {tags[3]}")]
    with Engine.load(str(export_dir)) as engine:
        for pos, neg in requests:
            rec = engine.recommend([history], prompts=[pos], negative_prompts=[neg], k=5)[0]
            print(f"\n  prompt: {pos!r}  negative: {neg!r}")
            for r, (item_id, title, item_tags) in enumerate(zip(rec.item_ids, rec.titles, rec.tags), 1):
                print(f"    {r}. {item_id:<6} {title}  [{', '.join(item_tags)}]")
    cmd = ["dpr-recommend", str(export_dir), "--history", ",".join(history), "--prompt", f"more {tags[4]}",
           "--negative", f"no {tags[0]}"]
    print(f"\n  try your own (item ids are strings such as {history[0]!r}):\n    {shlex.join(cmd)}")


if __name__ == "__main__":
    sys.exit(main())
