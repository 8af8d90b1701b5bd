"""Build the fused MoE gate's native artifacts: what this machine can build, cached by source hash.

Targets (file names inside the cache):

=================  ==========================  =====================================================
name               file                        needs
=================  ==========================  =====================================================
``cpu_lib``        ``libdpr_kernels.so``       g++ (always): the CPU twin's C ABI, loaded by ctypes
``topk_lib``       ``libdpr_score_topk.so``    g++ (always): fused score + top-k retrieval (CPU), ctypes
``ids_lib``        ``libdpr_id_index.so``      g++ (always): item-id index, /recommend body parser, v2 JSON reader, history padding, HTTP answer renderer, Triton BYTES splitter and gather (CPU)
``ort_lib``        ``libdpr_ort_ops.so``       g++ + ONNX Runtime headers: custom op, CPU EP
``cuda_lib``       ``libdpr_kernels_cuda.so``  nvcc: the CUDA launchers (sm_80, sm_90 SASS + PTX)
``ort_cuda_lib``   ``libdpr_ort_ops_cuda.so``  nvcc + ORT headers: custom op, CPU and CUDA EPs
``ptx_sm80``       ``fused_moe_gate.sm80.ptx`` nvcc: PTX for the TensorRT plugin (compute_80)
``ptx_sm90``       ``fused_moe_gate.sm90.ptx`` nvcc: PTX for the TensorRT plugin (compute_90)
``torch_ops``      ``libdpr_torch_ops.so``     g++ + torch's headers: ``dpr::moe_gate`` CPU (the twin)
``torch_ops_cuda`` ``libdpr_torch_ops_cuda.so`` nvcc + a CUDA build of torch: ``dpr::moe_gate`` CUDA
=================  ==========================  =====================================================

The torch operator libraries are built against the torch installed beside this package (its version and
C++ ABI are part of the cache key) and loaded with ``torch.ops.load_library`` (dpr.kernels.moe_gate_op).

ORT headers come from ``$ORT_INCLUDE_DIR``, else a previous fetch in the cache, else
``fetch_ort_headers.sh`` (Debian trixie's ``libonnxruntime-dev``, downloaded into the cache).
Every nvcc build of SASS runs ``-Xptxas -v`` and fails on any register spill.

The cache is ``$DPR_KERNEL_CACHE`` (default ``~/.cache/dpr/kernels``); each artifact lives in
``<name>-<hash>/`` where the hash covers the sources, the command line and the compiler version.

CLI: ``python -m dpr.kernels.build [--force] [--quiet] [--no-fetch]``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

KERNEL_DIR = Path(__file__).resolve().parent
HEADERS = ["fused_moe_gate.h", "fused_moe_gate_api.h", "cpu_isa.h"]
CUDA_ARCHS = (80, 90)

FILES = {
    "cpu_lib": "libdpr_kernels.so",
    "topk_lib": "libdpr_score_topk.so",
    "ids_lib": "libdpr_id_index.so",
    "ort_lib": "libdpr_ort_ops.so",
    "cuda_lib": "libdpr_kernels_cuda.so",
    "ort_cuda_lib": "libdpr_ort_ops_cuda.so",
    "ptx_sm80": "fused_moe_gate.sm80.ptx",
    "ptx_sm90": "fused_moe_gate.sm90.ptx",
    "torch_ops": "libdpr_torch_ops.so",
    "torch_ops_cuda": "libdpr_torch_ops_cuda.so",
}

CXXFLAGS = ["-O3", "-std=c++17", "-fPIC", "-fopenmp", "-Wall", "-Wextra"]
NVCCFLAGS = ["-O3", "-std=c++17", "-Xptxas", "-v"]
GENCODE = [f for a in CUDA_ARCHS for f in ("-gencode", f"arch=compute_{a},code=sm_{a}")] + [
    "-gencode", f"arch=compute_{CUDA_ARCHS[-1]},code=compute_{CUDA_ARCHS[-1]}"]

_SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


class KernelBuildError(RuntimeError):
    """A compiler failed, or the CUDA kernel spills registers."""


@dataclass
class BuildResult:
    """What :func:`build` produced: artifact paths, what came from the cache, what was skipped and why."""

    cache_dir: Path
    built: dict[str, Path] = field(default_factory=dict)      # name -> path (fresh or cached)
    cached: list[str] = field(default_factory=list)            # names taken from the cache
    skipped: dict[str, str] = field(default_factory=dict)      # name -> reason
    failed: dict[str, str] = field(default_factory=dict)       # name -> compiler error
    ptxas: dict[str, str] = field(default_factory=dict)        # name -> ptxas -v summary

    def path(self, name: str) -> Path | None:
        return self.built.get(name)

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        lines = [f"dpr kernels (cache: {self.cache_dir})"]
        for name in FILES:
            if name in self.built:
                how = "cached" if name in self.cached else "built"
                lines.append(f"  {how:7s} {name:13s} {self.built[name]}")
                if name in self.ptxas:
                    lines.append(f"          {'':13s} {self.ptxas[name]}")
            elif name in self.failed:
                lines.append(f"  FAILED  {name:13s} {self.failed[name].strip().splitlines()[-1] if self.failed[name].strip() else ''}")
            elif name in self.skipped:
                lines.append(f"  skipped {name:13s} {self.skipped[name]}")
        return "\n".join(lines)


def cache_dir() -> Path:
    return Path(os.environ.get("DPR_KERNEL_CACHE") or Path.home() / ".cache" / "dpr" / "kernels")


def find_nvcc() -> str | None:
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc"):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return None


def find_cxx() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


@functools.lru_cache(maxsize=None)
def _version(tool: str) -> str:
    try:
        return subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def _ort_header_ok(path: Path) -> bool:
    return (path / "onnxruntime_lite_custom_op.h").is_file() and (path / "onnxruntime_cxx_api.h").is_file()


def find_ort_include(fetch: bool = False, verbose: bool = False) -> tuple[Path | None, str]:
    """ONNX Runtime's C/C++ header folder, or (None, why not). ``fetch`` may run fetch_ort_headers.sh."""
    env = os.environ.get("ORT_INCLUDE_DIR")
    if env:
        p = Path(env)
        if _ort_header_ok(p):
            return p, "ORT_INCLUDE_DIR"
        return None, f"ORT_INCLUDE_DIR={env} has no onnxruntime_lite_custom_op.h"
    dest = cache_dir() / "ortdev"
    inc = dest / "root" / "usr" / "include" / "onnxruntime"
    if _ort_header_ok(inc):
        return inc, "cache"
    if not fetch:
        return None, "no ONNX Runtime headers (set ORT_INCLUDE_DIR or run kernels/fetch_ort_headers.sh)"
    script = KERNEL_DIR / "fetch_ort_headers.sh"
    if verbose:
        print(f"[dpr.kernels] fetching ONNX Runtime headers into {dest} ...", file=sys.stderr)
    try:
        proc = subprocess.run(["sh", str(script), str(dest)], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"fetch_ort_headers.sh failed: {exc}"
    if proc.returncode != 0 or not _ort_header_ok(inc):
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return None, f"fetch_ort_headers.sh failed ({tail}); set ORT_INCLUDE_DIR"
    return inc, "fetched"


def _digest(sources: list[Path], commands: list[list[str]], tools: list[str]) -> str:
    h = hashlib.sha256()
    for s in sources:
        h.update(s.name.encode())
        h.update(s.read_bytes())
    for cmd in commands:
        h.update(("\0".join(cmd)).encode())
    for t in tools:
        h.update(_version(t).encode())
    return h.hexdigest()[:16]


def _check_spills(name: str, log: str) -> str:
    spills = [(int(a), int(b)) for a, b in _SPILL_RE.findall(log)]
    if any(a or b for a, b in spills):
        raise KernelBuildError(f"{name}: register spills reported by ptxas:\n{log}")
    regs = sorted({int(r) for r in re.findall(r"Used (\d+) registers", log)})
    return f"ptxas: {len(spills)} kernels x archs, 0 spills, registers {regs}"


class _Target:
    def __init__(self, name: str, sources: list[str], tools: list[str],
                 commands: Callable[[Path, Path], list[list[str]]], spill_check: bool = False):
        self.name, self.tools, self.commands, self.spill_check = name, tools, commands, spill_check
        self.sources = [KERNEL_DIR / s for s in sources + HEADERS]

    def key(self) -> str:
        placeholder = self.commands(Path("/TMP"), Path("/OUT"))
        return _digest(self.sources, placeholder, self.tools)

    def out_path(self) -> Path:
        return cache_dir() / f"{self.name}-{self.key()}" / FILES[self.name]


@functools.lru_cache(maxsize=None)
def torch_build_info() -> tuple[dict | None, str]:
    """(torch's include/library folders, C++ ABI, version and CUDA version; or None and why not)."""
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # noqa: BLE001 - a broken torch install is a reason, not a crash
        return None, f"torch is not importable ({type(exc).__name__}: {exc})"
    return {"include": list(cpp_extension.include_paths()), "lib": list(cpp_extension.library_paths()),
            "abi": int(bool(torch._C._GLIBCXX_USE_CXX11_ABI)), "version": torch.__version__,
            "cuda": torch.version.cuda}, "torch"


def _torch_flags(info: dict) -> tuple[list[str], list[str]]:
    """(compile flags, link flags) of a torch operator library; the version define keys the cache."""
    cflags = [f"-I{p}" for p in info["include"]] + [f"-D_GLIBCXX_USE_CXX11_ABI={info['abi']}",
                                                   f"-DDPR_TORCH_VERSION=\"{info['version']}\""]
    lflags = [f for p in info["lib"] for f in (f"-L{p}", f"-Wl,-rpath,{p}")] + ["-lc10", "-ltorch_cpu", "-ltorch"]
    return cflags, lflags


def _targets(cxx: str | None, nvcc: str | None, ort_inc: Path | None) -> dict[str, _Target]:
    k = str(KERNEL_DIR)
    t: dict[str, _Target] = {}
    tinfo, _ = torch_build_info()
    if cxx and tinfo:
        tcf, tlf = _torch_flags(tinfo)
        # torch's headers need C++17 at least; -w: their own warnings are not ours to fix
        t["torch_ops"] = _Target("torch_ops", ["moe_gate_torch.cc", "moe_gate_torch.h", "fused_moe_gate_cpu.cc"],
                                 [cxx], lambda tmp, out: [
            [cxx, "-O3", "-std=c++17", "-fPIC", "-fopenmp", "-w", "-shared", f"-I{k}", *tcf,
             f"{k}/moe_gate_torch.cc", f"{k}/fused_moe_gate_cpu.cc", *tlf, "-o", str(out)]])
        if nvcc and tinfo["cuda"]:
            t["torch_ops_cuda"] = _Target(
                "torch_ops_cuda", ["moe_gate_torch_cuda.cc", "moe_gate_torch.h", "fused_moe_gate.cu"], [nvcc, cxx],
                lambda tmp, out: [
                    # c10/cuda's headers include the CUDA runtime's: nvcc's own include folder
                    [cxx, "-O3", "-std=c++17", "-fPIC", "-w", "-c", f"-I{k}", *tcf,
                     f"-I{Path(nvcc).resolve().parent.parent / 'include'}", f"{k}/moe_gate_torch_cuda.cc",
                     "-o", str(tmp / "op.o")],
                    [nvcc, *NVCCFLAGS, *GENCODE, "-Xcompiler", "-fPIC", "-c", "-DDPR_STANDALONE_CUDA_LIB", f"-I{k}",
                     f"{k}/fused_moe_gate.cu", "-o", str(tmp / "cuda.o")],
                    [nvcc, "-shared", str(tmp / "op.o"), str(tmp / "cuda.o"), *tlf, "-lc10_cuda", "-ltorch_cuda",
                     "-o", str(out)]],
                spill_check=True)
    if cxx:
        t["cpu_lib"] = _Target("cpu_lib", ["fused_moe_gate_cpu.cc"], [cxx], lambda tmp, out: [
            [cxx, *CXXFLAGS, "-shared", f"-I{k}", f"{k}/fused_moe_gate_cpu.cc", "-o", str(out)]])
        # baseline x86-64 code; the AVX-512 and AVX2 tiles are compiled per function and picked at run time
        t["topk_lib"] = _Target("topk_lib", ["score_topk_cpu.cc", "score_topk.h", "score_topk_api.h",
                                             "thread_pool.h"], [cxx],
                                lambda tmp, out: [[cxx, *CXXFLAGS, "-shared", f"-I{k}", f"{k}/score_topk_cpu.cc",
                                                   "-o", str(out)]])
        # the engine's host-side batch helpers: the item-id index and the history padding
        t["ids_lib"] = _Target("ids_lib", ["id_index_cpu.cc", "id_index_api.h", "id_index_impl.h",
                                           "recommend_parse_cpu.cc", "recommend_parse_api.h", "history_pad_cpu.cc",
                                           "history_pad_api.h", "json_render_cpu.cc", "json_render_api.h",
                                           "bytes_tensor_cpu.cc", "bytes_tensor_api.h", "json_lex.h",
                                           "v2_json_parse_cpu.cc", "v2_json_parse_api.h"], [cxx],
                               # inline members hidden: the shared JSON lexer's (json_lex.h) calls are direct, not
                               # through the PLT as an exported weak symbol's would be; the C ABI stays exported
                               lambda tmp, out: [[cxx, *CXXFLAGS, "-shared", "-fvisibility-inlines-hidden", f"-I{k}",
                                                  f"{k}/id_index_cpu.cc",
                                                  f"{k}/recommend_parse_cpu.cc", f"{k}/history_pad_cpu.cc",
                                                  f"{k}/json_render_cpu.cc", f"{k}/bytes_tensor_cpu.cc",
                                                  f"{k}/v2_json_parse_cpu.cc", "-o", str(out)]])
        if ort_inc:
            t["ort_lib"] = _Target("ort_lib", ["ort_custom_op.cc", "fused_moe_gate_cpu.cc"], [cxx], lambda tmp, out: [
                [cxx, *CXXFLAGS, "-shared", "-fvisibility=hidden", f"-I{k}", f"-I{ort_inc}",
                 f"{k}/ort_custom_op.cc", f"{k}/fused_moe_gate_cpu.cc", "-o", str(out)]])
    if nvcc:
        t["cuda_lib"] = _Target("cuda_lib", ["fused_moe_gate.cu"], [nvcc], lambda tmp, out: [
            [nvcc, *NVCCFLAGS, *GENCODE, "-Xcompiler", "-fPIC", "-shared", "-cudart", "static",
             "-DDPR_STANDALONE_CUDA_LIB", f"-I{k}", f"{k}/fused_moe_gate.cu", "-o", str(out)]], spill_check=True)
        for arch in CUDA_ARCHS:
            t[f"ptx_sm{arch}"] = _Target(f"ptx_sm{arch}", ["fused_moe_gate.cu"], [nvcc], lambda tmp, out, a=arch: [
                [nvcc, "-O3", "-std=c++17", "-ptx", f"-arch=compute_{a}", f"-I{k}", f"{k}/fused_moe_gate.cu",
                 "-o", str(out)]])
        if cxx and ort_inc:
            t["ort_cuda_lib"] = _Target(
                "ort_cuda_lib", ["ort_custom_op.cc", "fused_moe_gate_cpu.cc", "fused_moe_gate.cu"], [nvcc, cxx],
                lambda tmp, out: [
                    [cxx, *CXXFLAGS, "-c", "-fvisibility=hidden", "-DDPR_WITH_CUDA", f"-I{k}", f"-I{ort_inc}",
                     f"{k}/ort_custom_op.cc", "-o", str(tmp / "ort_custom_op.o")],
                    [cxx, *CXXFLAGS, "-c", "-fvisibility=hidden", f"-I{k}", f"{k}/fused_moe_gate_cpu.cc",
                     "-o", str(tmp / "cpu.o")],
                    [nvcc, *NVCCFLAGS, *GENCODE, "-Xcompiler", "-fPIC,-fvisibility=hidden", "-c", f"-I{k}",
                     f"{k}/fused_moe_gate.cu", "-o", str(tmp / "cuda.o")],
                    [nvcc, "-shared", "-cudart", "static", str(tmp / "ort_custom_op.o"), str(tmp / "cpu.o"),
                     str(tmp / "cuda.o"), "-lgomp", "-o", str(out)]],
                spill_check=True)
    return t


def _run_target(t: _Target, force: bool, verbose: bool, res: BuildResult) -> None:
    out = t.out_path()
    if out.is_file() and not force:
        res.built[t.name] = out
        res.cached.append(t.name)
        return
    out.parent.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent.parent, prefix=f".{t.name}-") as tmpd:
        tmp = Path(tmpd)
        tmp_out = tmp / FILES[t.name]
        log = ""
        for cmd in t.commands(tmp, tmp_out):
            if verbose:
                print("[dpr.kernels] " + " ".join(cmd), file=sys.stderr)
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            log += proc.stdout + proc.stderr
            if proc.returncode != 0:
                raise KernelBuildError(f"{t.name}: command failed ({proc.returncode}): {' '.join(cmd)}\n{log}")
        if t.spill_check:
            res.ptxas[t.name] = _check_spills(t.name, log)
        out.parent.mkdir(parents=True, exist_ok=True)
        (out.parent / "build.log").write_text(log)
        os.replace(tmp_out, out)
    res.built[t.name] = out


def build(force: bool = False, verbose: bool = True, fetch_headers: bool = True,
          only: list[str] | None = None) -> BuildResult:
    """Build every artifact this machine can build (see the module docstring); cached unless ``force``.

    Never raises for a missing tool (the target is reported in ``skipped``); compiler errors and register
    spills are reported in ``failed`` (``result.ok`` is False).
    """
    res = BuildResult(cache_dir=cache_dir())
    cxx, nvcc = find_cxx(), find_nvcc()
    ort_inc, why = find_ort_include(fetch=fetch_headers, verbose=verbose)
    targets = _targets(cxx, nvcc, ort_inc)
    reasons = {
        "cpu_lib": "no C++ compiler (g++)",
        "topk_lib": "no C++ compiler (g++)",
        "ids_lib": "no C++ compiler (g++)",
        "ort_lib": "no C++ compiler (g++)" if not cxx else why,
        "cuda_lib": "nvcc not found (set NVCC or put nvcc on PATH)",
        "ptx_sm80": "nvcc not found", "ptx_sm90": "nvcc not found",
        "ort_cuda_lib": "nvcc not found" if not nvcc else ("no C++ compiler" if not cxx else why),
        "torch_ops": "no C++ compiler (g++)" if not cxx else torch_build_info()[1],
        "torch_ops_cuda": ("nvcc not found" if not nvcc else "no C++ compiler" if not cxx
                           else torch_build_info()[1] if torch_build_info()[0] is None
                           else "torch is a CPU build (no CUDA runtime to link the operator against)"),
    }
    for name in FILES:
        if only is not None and name not in only:
            continue
        if name not in targets:
            res.skipped[name] = reasons[name]
            continue
        try:
            _run_target(targets[name], force, verbose, res)
        except (KernelBuildError, OSError, subprocess.SubprocessError) as exc:
            res.failed[name] = str(exc)
    capi = sys.modules.get("dpr.kernels.capi")
    if capi is not None:   # let ctypes bindings pick up what was just built
        capi.reset()
    if verbose:
        print(res.summary(), file=sys.stderr)
    return res


def artifact_path(name: str) -> Path | None:
    """Path of an already-built artifact for the current sources and tools, or None (nothing is built)."""
    cxx, nvcc = find_cxx(), find_nvcc()
    ort_inc, _ = find_ort_include(fetch=False)
    t = _targets(cxx, nvcc, ort_inc).get(name)
    if t is None:
        return None
    p = t.out_path()
    return p if p.is_file() else None


def ort_library_path(cuda: bool | None = None) -> str | None:
    """The ONNX Runtime custom-op library to pass to ``SessionOptions.register_custom_ops_library``.

    ``cuda=True`` wants the CPU+CUDA EP build, ``False`` the CPU-only build, ``None`` the CUDA build
    when it exists, else the CPU build. ``$DPR_ORT_OPS_LIB`` overrides. None when nothing is built.
    """
    env = os.environ.get("DPR_ORT_OPS_LIB")
    if env:
        return env if Path(env).is_file() else None
    order = {True: ["ort_cuda_lib"], False: ["ort_lib"], None: ["ort_cuda_lib", "ort_lib"]}[cuda]
    for name in order:
        p = artifact_path(name)
        if p is not None:
            return str(p)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dpr.kernels.build", description=__doc__.split("\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild even when cached")
    ap.add_argument("--quiet", action="store_true", help="print only the summary")
    ap.add_argument("--no-fetch", action="store_true", help="never download ONNX Runtime headers")
    args = ap.parse_args(argv)
    res = build(force=args.force, verbose=not args.quiet, fetch_headers=not args.no_fetch)
    if args.quiet:
        print(res.summary())
    for name, err in res.failed.items():
        print(f"\n--- {name} failed ---\n{err}", file=sys.stderr)
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
