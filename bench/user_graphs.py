"""One user graph for every runtime, measured: the fused user encoder served without its kernel against the
separate portable graph, on the same inputs (docs/ARCHITECTURE.md, "One user graph for every runtime").

    dpr-export CKPT --portable-graph --out DIR        # an export that has both graphs, for the comparison
    python -m dpr.bench.user_graphs DIR [--reps 31]

Four ONNX Runtime sessions on one thread each: the portable graph (the reference), the fused graph without
the custom-op library (ONNX Runtime inlines the ``dpr::FusedMoEGate`` local function), the fused graph
inlined beforehand by ``onnx.inliner`` (what the TensorRT backend falls back to) and, when the library is
built, the fused graph with the kernel. Prints each one's largest difference to the reference at batch 1,
7 and 512, its median time per call at batch 64 and 512 (interleaved runs), and the TensorRT op checks of
the inlined graph.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from dpr.engine.backends.tensorrt_backend import inlined_gate
from dpr.errors import DPRError, require
from dpr.export.trt_constraints import check_tensorrt_constraints
from dpr.export.trt_ops import check_tensorrt_ops

__all__ = ["compare_user_graphs", "main"]


def _session(ort, model, lib: str | None = None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    if lib:
        so.register_custom_ops_library(str(lib))
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so,
                                providers=["CPUExecutionProvider"])


def _feed(rng, b: int, n_items: int, d: int, max_len: int) -> dict:
    seq = rng.integers(1, n_items + 1, (b, max_len)).astype(np.int64)
    for i in range(b):
        seq[i, : rng.integers(0, max_len)] = 0                       # left padding, as the engine sends
    p = rng.standard_normal((2, b, d)).astype(np.float32)
    p /= np.linalg.norm(p, axis=2, keepdims=True)
    presence = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], np.int64)[np.arange(b) % 4]
    return {"item_seq": seq, "p_pos": p[0], "p_neg": p[1], "presence": presence}


def compare_user_graphs(export_dir: str | Path, reps: int = 31, seed: int = 0) -> dict:
    """The comparison as a dict: ``max_abs`` per graph and batch, ``ms`` per graph and batch, TensorRT checks."""
    ort = require("onnxruntime", "the user-graph comparison")
    onnx = require("onnx", "the user-graph comparison")
    folder = Path(export_dir)
    man = json.loads((folder / "manifest.json").read_text())
    fused, portable = folder / "user_encoder.onnx", folder / "user_encoder_portable.onnx"
    if not (fused.is_file() and portable.is_file()):
        raise DPRError(f"{folder} needs both user_encoder.onnx and user_encoder_portable.onnx "
                       "(export it with dpr-export --portable-graph)")
    from dpr.kernels.build import ort_library_path

    inlined = inlined_gate(fused.read_bytes())
    sessions = {"portable graph": _session(ort, portable), "fused graph, ONNX Runtime inlines": _session(ort, fused),
                "fused graph, onnx.inliner": _session(ort, inlined)}
    lib = ort_library_path(cuda=False)
    if lib:
        sessions["fused graph + kernel"] = _session(ort, fused, lib)
    mc = man["model_config"]
    rng = np.random.default_rng(seed)
    shape = (man["items"]["num_items"], mc["d"], mc["max_len"])
    out: dict = {"max_abs": {}, "ms": {}}
    for b in (1, 7, 512):
        f = _feed(rng, b, *shape)
        ref = sessions["portable graph"].run(None, f)[0]
        out["max_abs"][b] = {k: float(np.abs(s.run(None, f)[0] - ref).max()) for k, s in sessions.items()}
    for b in (64, 512):
        f = _feed(rng, b, *shape)
        times: dict = {k: [] for k in sessions}
        for s in sessions.values():
            s.run(None, f)
        for _ in range(reps):                    # interleaved: a shared machine's load hits every graph alike
            for k, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, f)
                times[k].append(time.perf_counter() - t0)
        out["ms"][b] = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    model = onnx.load_from_string(inlined)
    out["inlined_tensorrt_unsupported_ops"] = check_tensorrt_ops(model)
    out["inlined_tensorrt_constraints"] = check_tensorrt_constraints(model)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dpr.bench.user_graphs", description=__doc__.split("\n\n")[0])
    p.add_argument("export", help="a dpr-export folder written with --portable-graph")
    p.add_argument("--reps", type=int, default=31, help="timed calls per graph and batch (default 31)")
    a = p.parse_args(argv)
    if a.reps < 1:
        p.error(f"--reps must be >= 1, got {a.reps}")
    try:
        res = compare_user_graphs(a.export, a.reps)
    except DPRError as exc:
        print(f"dpr.bench.user_graphs: error: {exc}", file=sys.stderr)
        return 2
    for b, row in res["max_abs"].items():
        print(f"batch {b}: max |x - portable graph|: " + ", ".join(f"{k} {v:.2e}" for k, v in row.items()))
    for b, row in res["ms"].items():
        print(f"batch {b}, 1 thread, median of {a.reps} (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()))
    print(f"inlined graph: TensorRT unsupported ops {res['inlined_tensorrt_unsupported_ops']}, "
          f"parser constraints {res['inlined_tensorrt_constraints']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
