"""CLI flags generated from config dataclasses, so every flag mirrors a config field
(``ModelConfig.d`` -> ``--d``, ``TrainConfig.stage1_epochs`` -> ``--stage1-epochs``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Callable


def add_dataclass_args(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (),
                       title: str | None = None) -> None:
    group = parser.add_argument_group(title or cls.__name__)
    defaults = cls()
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        kind = type(default)
        if kind is bool:
            group.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction)
        else:
            group.add_argument(flag, dest=f.name, type=kind, default=None, metavar=kind.__name__.upper(),
                               help=f"default: {default}")


def dataclass_from_args(cls, args: argparse.Namespace, base=None):
    """``base`` (or the defaults) overridden by every flag the user gave."""
    obj = base if base is not None else cls()
    changes = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
               if getattr(args, f.name, None) is not None}
    return dataclasses.replace(obj, **changes)


def run_cli(prog: str, fn: Callable[[], int]) -> int:
    """Run ``fn``; expected errors (bad input) print one clear line and exit 2, never a traceback."""
    from dpr.errors import DPRError

    try:
        return fn() or 0
    except (DPRError, ValueError, FileNotFoundError, PermissionError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
