"""The kernels' worker pool (kernels/thread_pool.h), which replaced OpenMP in the retrieval kernel so that idle
workers sleep instead of spinning into the engine's next stage: every part runs exactly once, on several threads;
a loop inside a part runs serially; concurrent callers each get all their parts; an exception reaches the caller
after every part ran; idle workers use no CPU; a forked child gets a working pool. The checks are C++
(tests/thread_pool_check.cc), compiled here with the compiler the kernels use."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
KERNELS = HERE.parent / "kernels"
CHECKS = ("each_index_once", "uses_several_threads", "nested_runs_serially", "concurrent_callers",
          "exception_is_rethrown", "idle_workers_sleep", "works_after_fork")


@pytest.fixture(scope="module")
def checker(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++) on PATH")
    exe = tmp_path_factory.mktemp("pool") / "thread_pool_check"
    proc = subprocess.run([cxx, "-O2", "-std=c++17", "-pthread", "-Wall", "-Wextra", "-Werror", f"-I{KERNELS}",
                           str(HERE / "thread_pool_check.cc"), "-o", str(exe)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return exe


def test_thread_pool_checks(checker):
    proc = subprocess.run([str(checker)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split() == [w for c in CHECKS for w in ("ok", c)]


def test_retrieval_kernel_has_no_openmp_loop():
    """The retrieval kernel's parallel loops go through the pool: an OpenMP region there would bring back the
    spinning workers (torch's libgomp is the one loaded, and its spin setting is torch's)."""
    src = (KERNELS / "score_topk_cpu.cc").read_text()
    assert "#pragma omp" not in src
    assert "dpr_pool::parallel_for" in src
