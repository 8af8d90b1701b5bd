"""dpr as a native Triton backend: ``libtriton_dpr.so`` (``triton_backend.cc``) runs inside tritonserver, and
:class:`NativeModel` is the Python it calls, once per batch.

Why: Triton's Python backend moves every request and response between tritonserver and a one-thread stub
process as Python objects; on 2 cores that stub bounded single-request calls (docs/LOAD_TEST.md). Here C++
reads the requests of a batch into one column per input name, :meth:`NativeModel.execute` turns them into
each request's tensors, answers them through :class:`~dpr.serve.triton_model.TritonModelCore` (the same core
as the Python backend), and returns the answers as columns that C++ writes into the responses.

The library embeds the Python that built it (its ``libpython``; ``program_name`` = that interpreter, so a venv's
site-packages are found; ``$DPR_TRITON_PYTHON`` overrides it at run time). Build it with the interpreter the
server will import dpr from: ``python -m dpr.serve.triton_native build [--out DIR]``. It needs g++ and that
Python's headers and shared library (Debian: ``python3.11-dev``).

The columns (``triton_backend.cc`` documents the same):

* in: ``names`` (the input names seen in the batch), ``data`` (per name, every request's raw tensor bytes one
  after the other) and ``meta`` (int64 [n, m, 6] per request and name: Triton datatype code, 0 when the request
  lacks the input; dims; d0; d1; byte start; byte stop). BYTES inputs were checked in C++ to hold d0 x d1
  elements.
* out: ``(errors, spans, widths, kmax, ids, id_offsets, scores, counts)``: errors, a list of n (``None`` or
  ``(Triton error code, message)``); ``spans`` int64 [n, 2] each answered request's rows; ``widths`` int64 [n]
  its columns; the [B, kmax] tables: ``ids`` in Triton's BYTES wire form with ``id_offsets`` int64 [B*kmax + 1]
  (each element's start), ``scores`` float32, and ``counts`` int32 [B].
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

from dpr.errors import InputError

from .columns import one_k_part, run_parts
from .render import tables
from .tensors import DEFAULT_K, PAD_SCORE, STACKABLE, parts_from_tensors
from .bytes_wire import deserialize_bytes, serialize_bytes
from .triton_model import Refusal, TritonModelCore, model_parameters

HERE = Path(__file__).resolve().parent
SOURCES = ("triton_backend.cc", "triton_backend_api.h")
LIBRARY = "libtriton_dpr.so"

BYTES = 13                      # TRITONSERVER_TYPE_BYTES
DTYPES = {1: np.bool_, 2: np.uint8, 3: np.uint16, 4: np.uint32, 5: np.uint64, 6: np.int8, 7: np.int16, 8: np.int32,
          9: np.int64, 10: np.float16, 11: np.float32, 12: np.float64}
ERROR_CODES = {"INTERNAL": 1, "INVALID_ARG": 3}     # TRITONSERVER_Error_Code


def request_tensors(names: tuple, data: tuple, meta: bytes) -> list:
    """The batch's columns as each request's named numpy tensors (as the Python backend's ``as_numpy`` gives
    them), or a Refusal for a request whose tensor cannot be read."""
    m = len(names)
    table = np.frombuffer(meta, np.int64).reshape(-1, m, 6).tolist() if m else []
    out = []
    for row in table:
        t: dict | Refusal = {}
        for name, buf, (dt, dims, d0, d1, a, z) in zip(names, data, row):
            if dt == 0:
                continue
            shape = (d0, d1) if dims == 2 else (d0,)
            if dt == BYTES:
                arr = deserialize_bytes(buf[a:z])
            elif dt in DTYPES:
                dtype = np.dtype(DTYPES[dt])
                if (z - a) != d0 * (d1 if dims == 2 else 1) * dtype.itemsize:
                    t = Refusal(f"input '{name}' holds {z - a} bytes for shape {list(shape)} of {dtype.name}")
                    break
                arr = np.frombuffer(buf, dtype, count=(z - a) // dtype.itemsize, offset=a)
            else:
                t = Refusal(f"input '{name}' has Triton datatype code {dt}, which dpr does not read")
                break
            t[name] = arr.reshape(shape)
        out.append(t)
    return out


class NativeModel:
    """One model instance for ``libtriton_dpr.so``: ``config_json`` is Triton's JSON form of ``config.pbtxt``,
    ``version_dir`` the model's version folder (``export_dir`` may be relative to it); ``instance``, Triton's
    instance name, is part of the C++ call and not needed here."""

    def __init__(self, config_json: str, version_dir: str, instance: str = ""):
        self.core = TritonModelCore(model_parameters(json.loads(config_json)), version_dir)
        tables(self.core.engine).wire_table()       # built at load (~0.1 s per 100,000 ids), not in a first batch

    def execute(self, names: tuple, data: tuple, meta: bytes) -> tuple:
        """Answer a batch (module docstring): as one stacked batch straight from the columns where every request
        is plain, else request by request through the core, so that an error names its own request's row."""
        got = self._execute_stacked(names, data, meta)
        return got if got is not None else self.pack(self.core.answer(request_tensors(names, data, meta)))

    def _execute_stacked(self, names: tuple, data: tuple, meta: bytes) -> tuple | None:
        """The batch as one engine batch built from the columns with no per-request Python (the stub-free
        counterpart of ``tensors.stack_requests``): the history ids mapped to catalogue indices and compacted from
        Triton's bytes in one native call (``IdIndex.lookup_wire_rows``), an optional input a request omits given
        its default in that request's rows, the answers' ids gathered in wire form by index. None, with nothing
        answered, when a request is not plain (another input, an unexpected shape or datatype, an id not in the
        catalogue, padding between two ids) or anything is refused or fails."""
        m = len(names)
        col = {name: j for j, name in enumerate(names)}
        if not m or "history" not in col or not col.keys() <= STACKABLE:
            return None
        tab = np.frombuffer(meta, np.int64).reshape(-1, m, 6)
        h = tab[:, col["history"]]
        if (h[:, 0] != BYTES).any() or (h[:, 1] != 2).any() or (h[:, 2] < 1).any():
            return None
        d0 = h[:, 2]
        n, b = len(h), int(d0.sum())
        core = self.core
        index = getattr(core.engine, "_id_index", None)
        # the ids straight from Triton's bytes to catalogue indices, compacted per row: no Python strings
        hist = index.lookup_wire_rows(data[col["history"]], np.repeat(h[:, 3], d0)) if index is not None else None
        if hist is None or hist.problem is not None:     # an unknown id or a hole: the per-request path names it
            return None
        batch = {}
        for name, j in col.items():
            if name != "history" and (c := self._stacked_column(name, tab[:, j], data[j], d0, b)) is None:
                return None
            elif name != "history":
                batch[name] = c
        got = self._uniform_part(batch, hist)
        if got is None:
            try:
                got = parts_from_tensors(batch, core.cfg, None, history=(hist.flat, hist.lens.tolist()))
            except InputError:
                return None
        elif not got:
            return None
        results = run_parts(core.engine, [part for part, _ in got])
        if any(isinstance(r, BaseException) for r in results):
            return None
        kmax = max(part.k for part, _ in got)
        ix = np.zeros((b, kmax), np.int64)                  # catalogue index 0: the empty id of a short row
        scores = np.full((b, kmax), PAD_SCORE, np.float32)
        counts = np.zeros(b, np.int32)
        ks = np.zeros(b, np.int64)
        for (part, rows), res in zip(got, results):
            kk = res.indices.shape[1]
            ix[rows, :kk] = res.indices
            scores[rows, :kk] = np.where(np.isfinite(res.scores), res.scores, PAD_SCORE)
            counts[rows] = res.counts
            ks[rows] = part.k
        first = np.cumsum(d0) - d0                          # each request's first row
        spans = np.stack([first, first + d0], axis=1)
        ids, offsets = tables(core.engine).wire_table().gather(ix)
        # each request as many columns as its own largest k (what it would have got alone)
        return ([None] * n, spans.tobytes(), np.maximum.reduceat(ks, first).tobytes(), kmax, ids, offsets.tobytes(),
                scores.tobytes(), counts.tobytes())

    def _uniform_part(self, batch: dict, hist) -> list | bool | None:
        """The stacked batch as one Part when every row has the same k and exclude_history (the common case), with
        every service limit checked on the columns (``body_columns.read`` does the same for ``/recommend``): ``[(Part,
        all rows)]``; False when a row crosses a limit or its prompt is not UTF-8 (the per-request path words the
        refusal); None when k or exclude_history differ between rows (``parts_from_tensors`` splits them)."""
        k = batch.get("k")
        ex = batch.get("exclude_history")
        if (k is not None and (k != k[0, 0]).any()) or (ex is not None and (ex != ex[0, 0]).any()):
            return None
        prompts, negatives = (batch[n].ravel().tolist() if n in batch else None for n in ("prompt", "negative_prompt"))
        part = one_k_part(hist.flat, hist.lens, int(k[0, 0]) if k is not None else DEFAULT_K,
                          bool(ex[0, 0]) if ex is not None else True, prompts, negatives, self.core.cfg)
        return [(part, slice(None))] if part is not None else False

    @staticmethod
    def _stacked_column(name: str, t: np.ndarray, raw: bytes, d0: np.ndarray, b: int) -> np.ndarray | None:
        """An optional [rows, 1] input over the whole batch (its default where a request omits it), or None where
        a request's shape or datatype is not the plain one."""
        present = t[:, 0] != 0
        p = t[present]
        if (p[:, 1] != 2).any() or (p[:, 3] != 1).any() or (p[:, 2] != d0[present]).any():
            return None
        dts = set(p[:, 0].tolist())
        if name in ("prompt", "negative_prompt"):
            if dts - {BYTES}:
                return None
            vals, out = deserialize_bytes(raw), np.full((b, 1), b"", dtype=object)
        elif name == "k":
            if len(dts) > 1 or not all(np.issubdtype(DTYPES.get(d, np.float32), np.integer) for d in dts):
                return None
            vals = np.frombuffer(raw, DTYPES[dts.pop()]) if dts else np.zeros(0, np.int64)
            out = np.full((b, 1), DEFAULT_K, dtype=np.int64)
        else:                                               # exclude_history
            if dts - {1}:
                return None
            vals, out = np.frombuffer(raw, np.bool_), np.ones((b, 1), dtype=np.bool_)
        rows = np.repeat(present, d0)
        if len(vals) != int(rows.sum()):
            return None
        out[rows, 0] = vals
        return out

    def pack(self, answers: list) -> tuple:
        """The core's answers (output tensors or Refusals, one per request) as the columns C++ writes responses
        from (module docstring)."""
        n = len(answers)
        errors: list = [None] * n
        spans = np.zeros((n, 2), np.int64)
        widths = np.zeros(n, np.int64)
        good = []
        for i, a in enumerate(answers):
            if isinstance(a, Refusal):
                errors[i] = (ERROR_CODES.get(a.code, ERROR_CODES["INTERNAL"]), a.message)
            else:
                good.append((i, a))
        kmax = max((a["item_ids"].shape[1] for _, a in good), default=0)
        b = sum(a["counts"].shape[0] for _, a in good)
        ids = np.full((b, kmax), b"", dtype=object)
        scores = np.full((b, kmax), PAD_SCORE, dtype=np.float32)
        counts = np.zeros(b, dtype=np.int32)
        r = 0
        for i, a in good:
            rows, kw = a["item_ids"].shape
            ids[r:r + rows, :kw] = a["item_ids"]
            scores[r:r + rows, :kw] = a["scores"]
            counts[r:r + rows] = a["counts"].reshape(-1)
            spans[i] = (r, r + rows)
            widths[i] = kw
            r += rows
        return self._columns(errors, spans, widths, ids, scores, counts)

    @staticmethod
    def _columns(errors, spans, widths, ids, scores, counts) -> tuple:
        flat = ids.ravel().tolist()
        offsets = np.zeros(len(flat) + 1, np.int64)
        np.cumsum(np.fromiter(map(len, flat), np.int64, len(flat)) + 4, out=offsets[1:])   # 4: the length prefix
        return (errors, np.ascontiguousarray(spans, np.int64).tobytes(), np.asarray(widths, np.int64).tobytes(),
                int(ids.shape[1]), serialize_bytes(flat), offsets.tobytes(),
                np.ascontiguousarray(scores, np.float32).tobytes(), np.asarray(counts, np.int32).tobytes())

    def close(self) -> None:
        self.core.close()


# ---- building the library ------------------------------------------------------------------------------------------

def python_build_info() -> tuple[dict | None, str]:
    """(this interpreter's include folder, library folder, libpython soname and executable; or None and why not)."""
    inc = Path(sysconfig.get_paths()["include"])
    ver = sysconfig.get_config_var("LDVERSION") or f"{sys.version_info[0]}.{sys.version_info[1]}"
    soname = sysconfig.get_config_var("INSTSONAME") or f"libpython{ver}.so.1.0"
    if not soname.endswith(".so") and ".so." not in soname:
        soname = f"libpython{ver}.so.1.0"           # a static build names its .a here; its shared twin is this
    libdirs = [d for d in (sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LIBPL")) if d]
    libdir = next((d for d in libdirs if (Path(d) / soname).exists()), None)
    if not (inc / "Python.h").is_file():
        return None, f"no Python.h in {inc} (Debian: apt-get install python{ver}-dev)"
    if libdir is None:
        return None, f"no {soname} in {libdirs} (this Python has no shared library to embed)"
    return {"include": str(inc), "libdir": libdir, "soname": soname, "ldversion": ver,
            "executable": sys.executable}, ""


def _command(info: dict, cxx: str, src: Path, out: Path) -> list[str]:
    return [cxx, "-O2", "-std=c++17", "-fPIC", "-shared", "-fvisibility=hidden", "-Wall", "-Wextra",
            f"-I{info['include']}", f'-DDPR_PYTHON_SONAME="{info["soname"]}"',
            f'-DDPR_PYTHON_EXECUTABLE="{info["executable"]}"', str(src), "-o", str(out),
            f"-L{info['libdir']}", f"-lpython{info['ldversion']}", f"-Wl,-rpath,{info['libdir']}",
            "-Wl,-z,nodelete"]     # never unloaded: the embedded interpreter and its threads outlive a model


def build(force: bool = False, quiet: bool = True) -> Path:
    """``libtriton_dpr.so`` for this interpreter, built once into the kernel cache (keyed by the sources, the
    command line and the compiler). Raises ``RuntimeError`` naming what is missing or the compiler's error."""
    from dpr.kernels.build import _digest, cache_dir, find_cxx

    info, why = python_build_info()
    if info is None:
        raise RuntimeError(f"cannot build the dpr Triton backend: {why}")
    cxx = find_cxx()
    if cxx is None:
        raise RuntimeError("cannot build the dpr Triton backend: no C++ compiler (g++)")
    sources = [HERE / s for s in SOURCES]
    key = _digest(sources, [_command(info, cxx, Path("/SRC"), Path("/OUT"))], [cxx])
    out = cache_dir() / f"triton_backend-{key}" / LIBRARY
    if out.is_file() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / LIBRARY
        proc = subprocess.run(_command(info, cxx, sources[0], tmp_out), capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"building the dpr Triton backend failed:\n{proc.stderr[-4000:]}")
        os.replace(tmp_out, out)            # atomic: a concurrent build never leaves half a library behind
    if not quiet:
        print(f"built {out}", file=sys.stderr)
    return out


def build_for(python=None) -> Path:
    """:func:`build` by ``python`` (the interpreter tritonserver will import dpr from; default: this one), in a
    subprocess when it is another one. Raises ``RuntimeError`` naming what failed."""
    if python is None or Path(python).absolute() == Path(sys.executable).absolute():
        return build()
    try:
        proc = subprocess.run([str(python), "-P", "-m", "dpr.serve.triton_native", "build"], capture_output=True,
                              text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"cannot build the dpr Triton backend with {python}: {exc}") from None
    if proc.returncode != 0:
        tail = proc.stderr.strip().removeprefix("error: ") or f"exit code {proc.returncode}"
        raise RuntimeError(f"{tail} (built with {python})")
    return Path(proc.stdout.strip().splitlines()[-1])


def install(model_dir, library: Path) -> Path:
    """Put ``library`` (``build_for``'s) in a model's folder as ``libtriton_dpr.so``, where Triton looks for a
    model's backend first."""
    dst = Path(model_dir) / LIBRARY
    shutil.copy2(library, dst)
    return dst


def main(argv=None) -> int:
    """``python -m dpr.serve.triton_native build [--out DIR] [--force]``: build the backend for this Python
    (and copy it into DIR, a model folder)."""
    p = argparse.ArgumentParser(prog="python -m dpr.serve.triton_native")
    p.add_argument("command", choices=["build"])
    p.add_argument("--out", help="copy the library into this folder (a Triton model's folder)")
    p.add_argument("--force", action="store_true", help="rebuild even if the cache has it")
    a = p.parse_args(argv)
    try:
        lib = build(force=a.force)
        if a.out:
            Path(a.out).mkdir(parents=True, exist_ok=True)
            lib = install(a.out, lib)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(lib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
