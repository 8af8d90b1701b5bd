"""What a newcomer does on a fresh clone, in the repository root: Python started there by hand (the root on
sys.path, no -P), the README's examples run as written. The top-level folders engine/, export/, kernels/
and bench/ are dpr.engine, ... and must never stand in for installed modules of the same name (a
transformers release imports the PyPI package ``kernels``; our folder used to shadow it)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("engine", "export", "kernels", "bench", "serve")


def _as_a_user(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -c code`` started in the repository root the way a user would: the root on sys.path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_a_python_started_in_the_root_has_the_root_on_sys_path():
    """The premise of the tests below (if this changes, they prove nothing)."""
    proc = _as_a_user("import sys, json; print(json.dumps(sys.path))")
    assert proc.returncode == 0, proc.stderr
    assert "" in json.loads(proc.stdout) or str(REPO) in json.loads(proc.stdout)


@pytest.mark.parametrize("name", FOLDERS)
def test_a_bare_import_never_gets_the_repository_folder(name):
    code = (f"import json\n"
            f"try:\n    import {name} as m\n    out = {{'file': getattr(m, '__file__', None)}}\n"
            f"except ModuleNotFoundError as e:\n    out = {{'missing': str(e)}}\n"
            f"print(json.dumps(out))\n")
    proc = _as_a_user(code)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if "missing" in out:
        assert f"dpr.{name}" in out["missing"]          # the error says what the folder is
    else:                                               # an installed module of that name: it, not the folder
        assert out["file"] and not Path(out["file"]).resolve().is_relative_to(REPO / name), out


def test_the_installed_kernels_package_wins_when_there_is_one():
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("kernels")
    except PackageNotFoundError:
        pytest.skip("the PyPI package 'kernels' is not installed here")
    proc = _as_a_user("import kernels; print(kernels.__file__)")
    assert proc.returncode == 0, proc.stderr
    assert "site-packages" in proc.stdout and str(REPO / "kernels") not in proc.stdout


def test_the_text_encoder_loads_through_transformers_from_the_root(tiny_encoder_dir):
    proc = _as_a_user(f"from dpr.model import TextEncoder\n"
                      f"e = TextEncoder.load({str(tiny_encoder_dir)!r})\n"
                      f"print(tuple(e.encode(['something funny']).shape))\n")
    assert proc.returncode == 0, proc.stderr
    assert "(1, " in proc.stdout


def test_the_torch_backend_loads_from_the_root(export_dir):
    proc = _as_a_user(f"from dpr.engine import Engine\n"
                      f"e = Engine.load({str(export_dir)!r}, backend='torch')\n"
                      f"r = e.recommend([['i12', 'i7', 'i93']], prompts=['something funny'], k=5)\n"
                      f"print(e.backend_name, r[0].count)\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["torch", "5"]


def test_the_project_keeps_the_root_off_sys_path_in_what_it_starts(pytestconfig):
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^export PYTHONSAFEPATH\s*:?=\s*1", makefile, re.M)
    assert pytestconfig.getoption("importmode") == "importlib"
    demo = (REPO / "bench" / "demo.py").read_text()
    assert '"-P"' in demo
    # every shell script that starts Python (they cd to the root first) keeps the root off sys.path too
    scripts = [p for p in REPO.glob("*/*.sh") if re.search(r"python|\$PY", p.read_text())]
    assert scripts
    for p in scripts:
        assert re.search(r"^export PYTHONSAFEPATH=1\b", p.read_text(), re.M), p


def _readme_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def test_the_readme_library_example_runs_as_written(export_dir):
    blocks = [b for b in _readme_blocks("python") if "build/demo/export" in b]
    assert blocks, "the README lost its library example"
    for code in blocks:
        proc = _as_a_user(code.replace("build/demo/export", str(export_dir)))
        assert proc.returncode == 0, proc.stderr
        assert "i" in proc.stdout


def test_the_readme_command_line_examples_run_as_written(export_dir):
    lines = [ln.split("#")[0].strip() for b in _readme_blocks("sh") for ln in b.splitlines()]
    runs = [ln for ln in lines if re.match(r"^(\.venv/bin/)?dpr-recommend build/demo/export ", ln)]
    assert runs, "the README lost its dpr-recommend example"
    bindir = Path(sys.executable).parent
    for ln in runs:
        argv = shlex.split(ln.replace("build/demo/export", str(export_dir)))
        argv[0] = str(bindir / "dpr-recommend")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
        proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert re.search(r"\bi\d+\b", proc.stdout), proc.stdout
    # the usage line shows ids the demo's catalogue has (strings i1..i2000), not bare numbers
    usage = [ln for ln in lines if ln.startswith("dpr-recommend EXPORT_DIR")]
    assert usage and all(re.search(r"--history i\d+(,i\d+)*", u) for u in usage)


# the Python launches that mean to start as a user would (the root on sys.path: what these tests check) or that
# keep the root off by other means; every other launch in the project must pass -P itself, so that it holds
# whoever starts the project (make exports PYTHONSAFEPATH, a bare `pytest` or a user's shell may not)
_LAUNCH = re.compile(r"\[\s*(sys\.executable|str\(TRITON_PY\)|str\(triton_python\(\)\)|cfg\.triton_python)\s*,\s*([^\]\n]*)")
_LAUNCH_EXEMPT = {
    ("tests/test_fresh_clone.py", "_as_a_user"),              # deliberately the root on sys.path
    ("tests/test_serve_http.py", "test_bare_name_serve_is_never_the_folder"),  # the same, for serve/
    ("tests/test_moe_gate_op.py", "PYTHONSAFEPATH"),           # env PYTHONSAFEPATH=1 and cwd outside the repo
    ("bench/demo.py", "sys.version_info"),                     # -P where the interpreter has it (3.11+)
}


def test_every_python_the_project_launches_keeps_the_root_off_sys_path():
    files = [p for d in FOLDERS + ("dpr", "tests", "scripts") for p in (REPO / d).rglob("*.py")]
    bad = []
    for p in files:
        text = p.read_text()
        rel = str(p.relative_to(REPO))
        for m in _LAUNCH.finditer(text):
            if m.group(2).startswith('"-P"'):
                continue
            near = text[max(0, m.start() - 1500):m.end() + 300]
            if any(rel == f and key in near for f, key in _LAUNCH_EXEMPT):
                continue
            bad.append(f"{rel}: {text[m.start():m.end()]}")
    assert not bad, "Python launched without -P (the root on sys.path when the cwd is the root):\n" + "\n".join(bad)
