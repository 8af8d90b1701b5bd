"""``dpr-export ckpt.pt [--out DIR] [--opset N] [--fp16] [--max-batch 512] [--no-fused] ...``

A thin CLI over :func:`dpr.export.exporter.export`; its flags mirror :class:`ExportConfig`. Errors print
``dpr-export: error: ...`` to stderr (no traceback) and exit with status 1 (2 for bad usage).
"""

from __future__ import annotations

import argparse
import os
import sys

from dpr.errors import DPRError


def build_parser() -> argparse.ArgumentParser:
    from dpr.export.exporter import ExportConfig

    d = ExportConfig()
    p = argparse.ArgumentParser(prog="dpr-export", description="Export a DPR checkpoint to an ONNX folder "
                                "(prompt encoder, user encoder with the fused gate and its portable body as a "
                                "local function, item table, manifest).")
    p.add_argument("checkpoint", help="checkpoint file written by dpr training (.pt)")
    p.add_argument("--out", default=None, help="output folder (default: <checkpoint stem>-onnx beside it)")
    p.add_argument("--opset", type=int, default=d.opset, help=f"ONNX opset (default {d.opset})")
    p.add_argument("--fp16", action="store_true", help="also write float16 graphs and item table (parity recorded)")
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help=f"TensorRT optimisation profile max batch (default {d.max_batch})")
    p.add_argument("--opt-batch", type=int, default=d.opt_batch, help="TensorRT profile opt batch (default: max)")
    p.add_argument("--no-fused", dest="fused", action="store_false",
                   help="write only the portable user encoder (no dpr::FusedMoEGate custom node)")
    p.add_argument("--portable-graph", action=argparse.BooleanOptionalAction, default=d.portable_graph,
                   help="also write user_encoder_portable.onnx beside the fused graph (default: no; the fused "
                        "graph's local function is the portable gating, which a runtime without the kernel "
                        "inlines: one user graph for every runtime)")
    p.add_argument("--no-torch-weights", dest="torch_weights", action="store_false",
                   help="leave out model_state.safetensors and text_encoder/ (ONNX-only deployment; "
                        "the torch backend then needs --checkpoint)")
    p.add_argument("--int8", action="store_true",
                   help="also write prompt_encoder_int8.onnx (per-channel dynamic int8; its worst-row cosine "
                        "to fp32 on real prompts is recorded and gated)")
    p.add_argument("--int8-min-cosine", type=float, default=d.int8_min_cosine,
                   help=f"int8 gate: worst-row cosine to fp32 (default {d.int8_min_cosine:g})")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty output folder")
    p.add_argument("--text-encoder", default=None,
                   help="path of the checkpoint's text encoder when it moved (its hash is still verified)")
    p.add_argument("--atol", type=float, default=d.atol, help=f"fp32 parity gate, max abs error (default {d.atol:g})")
    p.add_argument("--min-overlap", type=float, default=d.min_overlap,
                   help=f"fp32 parity gate, top-10 overlap (default {d.min_overlap:g})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--verbose", action="store_true", help="show the torch exporter's output")
    p.add_argument("--triton-repo", default=None, metavar="DIR",
                   help="also write a Triton model repository in DIR (config.pbtxt + the model's code, the "
                        "export copied in; dpr.serve.triton_repo)")
    p.add_argument("--triton-backend", default="python", choices=["python", "native", "auto"],
                   help="the repository's backend: python (Triton's Python backend, portable to NVIDIA's "
                        "container; default), native (libtriton_dpr.so built for this Python) or auto")
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        from dpr.export.exporter import ExportConfig, export

        cfg = ExportConfig(out=args.out, opset=args.opset, fp16=args.fp16, max_batch=args.max_batch,
                           opt_batch=args.opt_batch, fused=args.fused, portable_graph=args.portable_graph,
                           force=args.force, torch_weights=args.torch_weights,
                           text_encoder=args.text_encoder, atol=args.atol, min_overlap=args.min_overlap,
                           int8=args.int8, int8_min_cosine=args.int8_min_cosine,
                           seed=args.seed, verbose=args.verbose)
        if args.triton_repo:
            from dpr.serve.triton_repo import check_target

            check_target(args.triton_repo)          # before the export, not after it
        out = export(args.checkpoint, cfg)
        if args.triton_repo:
            from dpr.serve.triton_repo import write_repository

            repo_model = write_repository(args.triton_repo, out, backend=args.triton_backend)
    except DPRError as exc:
        print(f"dpr-export: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dpr-export: error: interrupted (nothing written)", file=sys.stderr)
        return 130
    import json

    man = json.loads((out / "manifest.json").read_text())
    print(f"dpr-export: wrote {out}")
    for name, g in man["graphs"].items():
        par = g.get("parity", {}).get("all", {})
        print(f"  {g['file']:<30} exporter={g['exporter']:<11} max_abs={par.get('max_abs', float('nan')):.2e} "
              f"top10_overlap={par.get('top10_overlap', float('nan')):.4f}")
    for name, why in man["skipped"].items():
        print(f"  {name}: skipped ({why})")
    if args.triton_repo:
        print(f"dpr-export: wrote the Triton model repository {args.triton_repo} (model {repo_model.name!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
