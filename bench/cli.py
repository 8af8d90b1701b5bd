"""``dpr-bench [--model EXPORT_DIR] [--batch 512] [--backends auto|all|LIST] [--prompts all|unique,templates,none]
[--iters N] [--warmup N] [--json out.json] [--plot out.png] [--device cpu|cuda|auto] ...``

A thin CLI: the flags mirror :class:`dpr.bench.config.BenchConfig` field by field; the work is in
:func:`dpr.bench.runner.run`. Progress goes to stderr, the report (one table last) to stdout. Errors
print ``dpr-bench: error: ...`` (no traceback) and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from dpr.cli.args import add_dataclass_args, dataclass_from_args, run_cli

PROG = "dpr-bench"


def build_parser() -> argparse.ArgumentParser:
    from .config import BenchConfig

    p = argparse.ArgumentParser(prog=PROG, description="How fast the engine serves a DPR model here: every "
                                "backend end to end and per stage against the plain PyTorch pipeline, fused vs "
                                "portable gating, retrieval against the machine's ceilings.")
    add_dataclass_args(p, BenchConfig, title="benchmark")
    helps = {f.name: f.metadata.get("help") for f in dataclasses.fields(BenchConfig)}
    for action in p._actions:                       # add each field's own help to the generated flags
        if action.dest in helps and helps[action.dest]:
            action.help = f"{helps[action.dest]} ({action.help})" if action.help else helps[action.dest]
    return p


def main(argv: list[str] | None = None) -> int:
    from dpr.cli.common import quiet_transformers

    from .config import BenchConfig

    args = build_parser().parse_args(argv)

    def go() -> int:
        from .report import format_report, write_json, write_plot
        from .runner import run

        quiet_transformers()
        cfg = dataclass_from_args(BenchConfig, args)
        res = run(cfg)
        if cfg.json:
            write_json(res, cfg.json)
            print(f"dpr-bench: wrote {cfg.json}", file=sys.stderr)
        if cfg.plot:
            write_plot(res, cfg.plot)
            print(f"dpr-bench: wrote {cfg.plot}", file=sys.stderr)
        print(format_report(res), flush=True)
        return 0

    return run_cli(PROG, go)


if __name__ == "__main__":
    sys.exit(main())
