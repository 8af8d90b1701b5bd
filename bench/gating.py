"""Fused vs portable gating: the MoE gating step alone (``dpr.bench.gate_timing.bench_fused_gate``: the ONNX
Runtime ``dpr::FusedMoEGate`` custom op against the same math in standard ONNX ops) at batch 1, 64,
``--batch`` and 4096, with the model's own d / experts / top-k, on the CPU.

The whole user encoder with each graph is measured by the runner (``measure.time_user_encoder``): on the
CPU the gate is a small part of it, so that ratio is close to 1 (REFERENCE.md section 8).
"""

from __future__ import annotations

import sys

from dpr.errors import DPRError


def gating_section(export, batch: int, min_time: float) -> dict:
    """``{"batches": {b: {...us...}}, "config": ..., "ratio_at_batch": portable/fused or None, "error"?}``"""
    mc = export.model_config
    if mc.get("moe", "moe") != "moe":
        return {"skipped": f"the model has moe={mc.get('moe')!r}: no gate to fuse", "ratio_at_batch": None}
    try:
        from dpr.export.exporter import quiet_export
        from .gate_timing import bench_fused_gate

        batches = tuple(sorted({1, 64, int(batch), 4096}))
        print(f"dpr-bench: gating step, fused vs portable, batches {batches}", file=sys.stderr, flush=True)
        with quiet_export():
            res = bench_fused_gate(batches=batches, d=int(mc["d"]), n=int(mc["experts_per_polarity"]),
                                   k=int(mc["top_k"]), min_time=min_time)
    except (DPRError, ImportError, OSError, RuntimeError) as exc:
        return {"skipped": f"{type(exc).__name__}: {exc}", "ratio_at_batch": None}
    rows = {int(b): r for b, r in res["batches"].items()}
    ratio = rows.get(int(batch), {}).get("speedup_vs_portable")
    out = {"config": res["config"], "batches": rows, "ratio_at_batch": ratio, "device": "cpu (ONNX Runtime)"}
    if not res["config"].get("fused_available"):
        out["skipped"] = "the ORT custom-op library is not built (python -m dpr.kernels.build): no fused timing"
    return out
