"""A fresh interpreter for one check (``import dpr_tests_child_process``; registered by conftest.py): for what a
process decides once, e.g. the kernels' instruction set read from ``DPR_TOPK_ISA``."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_child(code: str, env_extra: dict, timeout: float = 180) -> dict:
    """Run ``code`` in a fresh interpreter (-P, cwd tests/: never the repository root on sys.path) with
    ``env_extra`` added to the environment; its last stdout line is JSON, returned parsed."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-P", "-c", code], env=dict(os.environ, **env_extra), capture_output=True,
                          text=True, timeout=timeout, cwd=tests_dir)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])
