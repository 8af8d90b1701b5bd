"""float16 variants of the graphs: exported from a ``.half()`` model, parity recorded against fp32, not gated."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dpr.export.config import ExportConfig
from dpr.export.export_format import PROMPT_ENCODER, PROMPT_INPUTS, USER_ENCODER, USER_ENCODER_PORTABLE, USER_INPUTS
from dpr.export.onnx_graphs import (_add_gate_function, _fused_gate, _io_spec, _onnx_export, _ort_session,
                                    _portable_table)
from dpr.export.parity import _random_user_batch, _real_prompts, compare, merge
from dpr.export.trt_constraints import check_tensorrt_constraints
from dpr.export.trt_ops import check_tensorrt_ops, graph_ops


def _export_fp16(ck, te, folder: Path, graphs: dict, custom_lib, cfg: ExportConfig, rng, table, ex_args, ex_user_t,
                 batch, seq, dyn_user, dyn_axes_user, dyn_axes_pe) -> dict:
    """float16 copies of the graphs, exported from a ``.half()`` model (float16 weights, float inputs and
    outputs in float16). Recorded with their parity against the fp32 PyTorch model; never gated."""
    import torch

    from dpr.model import PromptEncoder
    from dpr.model.moe import moe_gate_reference

    info: dict[str, dict] = {}
    model32 = ck.build_model().eval()
    penc32 = PromptEncoder(te, model32.projection).eval()
    todo = [(PROMPT_ENCODER, None)]
    if USER_ENCODER_PORTABLE in graphs:
        todo.append((USER_ENCODER_PORTABLE, None))
    if USER_ENCODER in graphs:
        todo.append((USER_ENCODER, "fused"))
    for name, kind in todo:
        path = folder / f"{name}_fp16.onnx"
        entry: dict = {"file": path.name}
        try:
            if name == PROMPT_ENCODER:
                import copy

                te16 = copy.deepcopy(te)
                te16.model.half()
                proj16 = copy.deepcopy(model32.projection).half()
                mod = PromptEncoder(te16, proj16).eval()
                args = ex_args
                with torch.no_grad():
                    exporter, _, inferred = _onnx_export(mod, args, path, PROMPT_INPUTS, ["prompt_vector"],
                                               {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
                                               dyn_axes_pe, cfg.opset, None, cfg.verbose, allow_fallback=True)
            else:
                mod = ck.build_model().eval().half()
                args = (ex_user_t[0], ex_user_t[1].half(), ex_user_t[2].half(), ex_user_t[3])
                tbl = dict(_portable_table())
                if kind == "fused":
                    from dpr.kernels.onnx_translation import custom_translation_table

                    mod.moe.gate = _fused_gate()
                    tbl.update(custom_translation_table())
                else:
                    mod.moe.gate = moe_gate_reference
                with torch.no_grad():
                    exporter, _, inferred = _onnx_export(mod, args, path, USER_INPUTS, ["user_vector"], dyn_user, dyn_axes_user,
                                               cfg.opset, tbl, cfg.verbose, allow_fallback=(kind is None))
                if kind == "fused":
                    inferred = _add_gate_function(path)
            entry["exporter"] = exporter
            entry["inputs"] = _io_spec(inferred.graph.input)
            entry["outputs"] = _io_spec(inferred.graph.output)
            entry["ops"] = [f"{d}::{o}" if d else o for d, o in graph_ops(inferred)]
            entry["tensorrt_unsupported_ops"] = [f"{d}::{o}" if d else o for d, o in check_tensorrt_ops(inferred)]
            entry["tensorrt_constraints"] = check_tensorrt_constraints(inferred)
            # parity vs the fp32 PyTorch model
            sess = _ort_session(path, custom_lib if kind == "fused" else None)
            res = {}
            if name == PROMPT_ENCODER:
                pos, neg = _real_prompts(ck.catalogue)
                tk = te.tokenizer(pos + neg, padding=True, truncation=True, max_length=te.max_tokens,
                                  return_tensors="np")
                ids, mask = tk["input_ids"].astype(np.int64), tk["attention_mask"].astype(np.int64)
                with torch.no_grad():
                    ref = penc32(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
                got = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
                res["real_prompts"] = compare(got.astype(np.float32), ref, table[:, :ck.model_config.d])
            else:
                for b in cfg.parity_batches:
                    inp = _random_user_batch(rng, b, ck.model_config, False, 1.0)
                    with torch.no_grad():
                        ref = model32(*(torch.from_numpy(inp[k]) for k in USER_INPUTS)).numpy()
                    feed = {k: (inp[k].astype(np.float16) if k in ("p_pos", "p_neg") else inp[k]) for k in USER_INPUTS}
                    got = sess.run(None, feed)[0]
                    res[f"random_b{b}"] = compare(got.astype(np.float32), ref, table)
            res["all"] = merge(list(res.values()))
            entry["parity"] = res
        except Exception as exc:   # recorded, not gated
            entry = {"file": None, "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
            if path.exists():
                path.unlink()
        info[name] = entry
    return info

