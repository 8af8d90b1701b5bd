"""Timing of the fused MoE gate on the CPU: ORT custom op vs the portable standard-ops ONNX subgraph
(moe_gate_reference exported by torch.onnx dynamo, opset 20) in ORT vs the torch reference.

``bench_fused_gate()`` returns a dict (the gating section of ``dpr-bench``: :mod:`dpr.bench.gating`);
``python -m dpr.bench.gate_timing`` prints it.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Callable

import numpy as np


def make_inputs(batch: int, d: int = 64, n: int = 4, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    E = 2 * n
    return {
        "z": rng.standard_normal((batch, d)).astype(dtype),
        "w_router": (rng.standard_normal((d, E)) / np.sqrt(d)).astype(dtype),
        "b_router": rng.standard_normal(E).astype(dtype),
        "expert_out": rng.standard_normal((batch, E, d)).astype(dtype),
        "polarity": rng.integers(0, 3, batch).astype(np.int64),
        "residual": rng.standard_normal((batch, d)).astype(dtype),
    }


def _time(fn: Callable[[], object], min_time: float, min_runs: int = 20) -> float:
    """Median wall time of one call in microseconds (after warm-up)."""
    for _ in range(5):
        fn()
    samples: list[float] = []
    t_end = time.perf_counter() + min_time
    while len(samples) < min_runs or time.perf_counter() < t_end:
        t0 = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t0) / 1e3)
        if len(samples) > 200_000:
            break
    return statistics.median(samples)


def portable_model_bytes(n: int = 4, k: int = 2, d: int = 64) -> bytes:
    """moe_gate_reference in standard ONNX ops (dynamo export, opset 20, dynamic batch)."""
    import torch

    from dpr.model.moe import moe_gate_reference

    class Portable(torch.nn.Module):
        def forward(self, z, w_router, b_router, expert_out, polarity, residual):
            return moe_gate_reference(z, w_router, b_router, expert_out, polarity, residual, n, k)

    x = make_inputs(8, d, n)
    args = tuple(torch.from_numpy(x[name]) for name in x)
    batch = torch.export.Dim("batch", min=1)
    dyn = {"z": {0: batch}, "w_router": None, "b_router": None, "expert_out": {0: batch},
           "polarity": {0: batch}, "residual": {0: batch}}
    from dpr.kernels.onnx_translation import portable_translation_table

    prog = torch.onnx.export(Portable(), args, dynamo=True, opset_version=20, external_data=False,
                             dynamic_shapes=dyn, verbose=False,
                             custom_translation_table=portable_translation_table())
    return prog.model_proto.SerializeToString()


def fused_model_bytes(n: int = 4, k: int = 2, dtype: str = "float32") -> bytes:
    """A one-node dpr::FusedMoEGate model (dynamic batch)."""
    from onnx import TensorProto, helper

    from dpr.kernels.op_spec import INPUTS, OP_DOMAIN, OP_DOMAIN_VERSION, OP_NAME

    elem = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.FLOAT
    ins = [helper.make_tensor_value_info(nm, TensorProto.INT64 if nm == "polarity" else elem, None) for nm in INPUTS]
    out = helper.make_tensor_value_info("out", elem, None)
    node = helper.make_node(OP_NAME, list(INPUTS), ["out"], domain=OP_DOMAIN, experts_per_polarity=n, top_k=k)
    graph = helper.make_graph([node], "fused_moe_gate", ins, [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20),
                                                    helper.make_opsetid(OP_DOMAIN, OP_DOMAIN_VERSION)])
    return model.SerializeToString()


def make_sessions(n: int = 4, k: int = 2, d: int = 64, threads: int = 0):
    """(fused ORT session or None, portable ORT session)."""
    import onnxruntime as ort

    from dpr.kernels.build import ort_library_path

    def opts():
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        return so

    portable = ort.InferenceSession(portable_model_bytes(n, k, d), opts(), providers=["CPUExecutionProvider"])
    lib = ort_library_path(cuda=False) or ort_library_path()
    fused = None
    if lib:
        so = opts()
        so.register_custom_ops_library(lib)
        fused = ort.InferenceSession(fused_model_bytes(n, k), so, providers=["CPUExecutionProvider"])
    return fused, portable


def bench_fused_gate(batches=(1, 64, 512, 4096), d: int = 64, n: int = 4, k: int = 2, min_time: float = 0.3,
                     threads: int = 0) -> dict:
    """Median microseconds per call for each batch: ``ort_fused``, ``ort_portable``, ``torch_reference``."""
    import torch

    from dpr.model.moe import moe_gate_reference

    fused, portable = make_sessions(n, k, d, threads)
    result: dict = {"config": {"d": d, "experts": f"{n}+{n}", "top_k": k, "dtype": "float32",
                               "torch_threads": torch.get_num_threads(), "fused_available": fused is not None},
                    "batches": {}}
    for b in batches:
        x = make_inputs(b, d, n, seed=b)
        tx = {key: torch.from_numpy(v) for key, v in x.items()}
        row: dict[str, float] = {}
        ref = moe_gate_reference(*tx.values(), n, k).numpy()
        port_names = [i.name for i in portable.get_inputs()]
        pfeed = {name: x[name] for name in port_names}
        row["ort_portable_us"] = _time(lambda: portable.run(None, pfeed), min_time)
        with torch.inference_mode():
            row["torch_reference_us"] = _time(lambda: moe_gate_reference(*tx.values(), n, k), min_time)
        if fused is not None:
            out = fused.run(None, x)[0]
            row["max_abs_err_fused"] = float(np.abs(out - ref).max())
            row["ort_fused_us"] = _time(lambda: fused.run(None, x), min_time)
            row["speedup_vs_portable"] = row["ort_portable_us"] / row["ort_fused_us"]
            row["speedup_vs_torch"] = row["torch_reference_us"] / row["ort_fused_us"]
        result["batches"][b] = row
    return result


def format_table(result: dict) -> str:
    lines = [f"fused MoE gate, CPU, {json.dumps(result['config'])}",
             f"{'batch':>6} {'ORT fused us':>13} {'ORT portable us':>16} {'torch ref us':>13} {'x portable':>11} {'x torch':>8}"]
    for b, r in result["batches"].items():
        lines.append(f"{b:>6} {r.get('ort_fused_us', float('nan')):>13.1f} {r['ort_portable_us']:>16.1f} "
                     f"{r['torch_reference_us']:>13.1f} {r.get('speedup_vs_portable', float('nan')):>11.1f} "
                     f"{r.get('speedup_vs_torch', float('nan')):>8.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_table(bench_fused_gate()))
