"""Export a DPR checkpoint to a self-describing ONNX folder that the engine loads without torch.

    from dpr.export import ExportConfig, export
    folder = export("ckpt.pt", ExportConfig(out="model-onnx"))

Folder contents (``manifest.json`` describes every file):

- ``prompt_encoder.onnx``: ``input_ids``, ``attention_mask`` (int64, batch x seq) -> ``prompt_vector``
  (batch x d): frozen text encoder, mean pooling, L2 norm and the trained projection in one graph;
  the tokenizer files beside it (``tokenizer.json``, ``tokenizer_config.json``, special tokens map).
- ``user_encoder.onnx`` (one ``dpr::FusedMoEGate`` node per gate, shipped with the op's portable body as
  a model-local function: the kernel where it is registered, the inlined body elsewhere), the one user
  graph for every runtime; ``user_encoder_portable.onnx`` (standard ONNX ops only) only with
  ``portable_graph=True`` or when there is no fused graph (``fused=False``, a model without a gate, no
  custom-op library): ``item_seq`` (batch x max_len int64, left-padded), ``p_pos``, ``p_neg`` (batch x d
  float32), ``presence`` (batch x 2 int64) -> ``user_vector`` (batch x retrieval_dim).
- ``item_embeddings.npy`` ((N+1) x d float32, row 0 padding), ``items.json``.
- ``model_state.safetensors`` (the DPR model's full state dict) and ``text_encoder/`` (the frozen
  encoder's own files): the torch backend, the reference, rebuilds the model from these alone; the
  ONNX graphs cannot serve for that (the exporter folds weights into anonymous constants).
  ``torch_weights=False`` (``--no-torch-weights``) leaves them out for an ONNX-only deployment.
- with ``int8``: ``prompt_encoder_int8.onnx``, per-channel, reduced-range (saturation-free on x86 without
  VNNI) dynamic int8, gated on its worst-row cosine to the fp32 graph over real prompts; the most
  sensitive MatMuls stay fp32 when it misses (``dpr.export.quantize``).
- with ``fp16``: ``*_fp16.onnx`` graphs (float16 weights and float inputs/outputs) and
  ``item_embeddings_fp16.npy``; their parity is recorded, not gated.

The folder is complete or absent: everything is written to a temporary sibling folder, verified
(onnx checker, shape inference, ONNX Runtime parity against PyTorch) and renamed at the end.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from dpr.errors import CheckpointError, DPRError
from dpr.export.config import ExportConfig, ExportError  # noqa: F401  (re-exported)
from dpr.export.export_format import (FORMAT_NAME, FORMAT_VERSION, INLINED_SUFFIX, PROMPT_ENCODER,  # noqa: F401
                                      PROMPT_INPUTS, TOKENIZER_FILES, USER_ENCODER, USER_ENCODER_PORTABLE,
                                      USER_INPUTS)
from dpr.export.fp16 import _export_fp16
from dpr.export.onnx_graphs import (_add_gate_function, _check_graph, _check_or_repair,  # noqa: F401
                                    _custom_ops, _dims, _fused_available, _fused_gate, _io_spec, _onnx_export,
                                    _portable_table, quiet_export)
from dpr.export.output_folder import _commit, _prepare_out
from dpr.export.parity import _parity, _random_user_batch
from dpr.export.quantize import INT8_GRAPH, build_int8_prompt_encoder
from dpr.export.trt_constraints import check_profile, check_tensorrt_constraints
from dpr.export.trt_ops import OPS_FILE, check_tensorrt_ops, graph_ops
from dpr.kernels import op_spec
from dpr.util import file_sha256

log = logging.getLogger("dpr.export")


def _log(msg: str) -> None:
    print(f"dpr-export: {msg}", file=sys.stderr)


# ---- helpers -----------------------------------------------------------------------------------

def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "onnx", "onnxscript", "onnxruntime", "transformers", "tokenizers", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            try:
                out[name] = md.version(name + "-gpu") if name == "onnxruntime" else None
            except md.PackageNotFoundError:
                out[name] = None
    import dpr

    out["dpr"] = dpr.__version__
    return out


# ---- text encoder ------------------------------------------------------------------------------

def _load_text_encoder(ck, override: str | None):
    from dpr.model.text_encoder import TextEncoder, encoder_hash

    ident = dict(ck.text_encoder or {})
    source = override or ident.get("source")
    if not source:
        raise ExportError("the checkpoint records no text encoder source; pass --text-encoder PATH")
    looks_local = override is not None or os.path.isabs(source) or source.startswith(".") or os.sep in source
    if looks_local and not Path(source).is_dir():
        raise ExportError(f"text encoder folder not found: {source} (the checkpoint was trained with "
                          f"{ident.get('source')!r}; pass --text-encoder PATH to a copy of it)")
    want = ident.get("hash") or ""
    got = encoder_hash(source)
    if want and got != want:
        raise ExportError(f"text encoder at {source} does not match the checkpoint's (sha256 of its files "
                          f"{got[:12] or 'unavailable'}... != recorded {want[:12]}...); pass --text-encoder "
                          "PATH to the encoder the checkpoint was trained with")
    max_tokens = int(ident.get("max_tokens") or 64)
    try:
        with quiet_export(False):
            te = TextEncoder.load(source, max_tokens=max_tokens)
    except DPRError as exc:
        raise ExportError(str(exc)) from None
    if int(ident.get("dim") or te.dim) != te.dim or te.dim != ck.model_config.text_dim:
        raise ExportError(f"text encoder {source} has dim {te.dim}; the checkpoint expects "
                          f"{ck.model_config.text_dim}")
    resolved = {"source": ident.get("source"), "loaded_from": str(source), "hash": want, "hash_verified": bool(want),
                "dim": te.dim, "max_tokens": max_tokens}
    return te, resolved


def _write_torch_weights(model, encoder_source: str, folder: Path) -> dict:
    """The model's state dict as safetensors and a copy of the frozen encoder's files (exactly the ones
    its identity hash covers, so the torch backend can verify the copy against the manifest)."""
    import torch
    from safetensors.torch import save_file

    from dpr.model.text_encoder import _WEIGHT_FILES

    state = {k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
             for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model_state.safetensors"), metadata={"format": "dpr-model-state"})
    src = Path(encoder_source)
    copied = []
    if src.is_dir():
        (folder / "text_encoder").mkdir()
        for name in _WEIGHT_FILES + TOKENIZER_FILES:
            if (src / name).is_file() and name not in copied:
                shutil.copyfile(src / name, folder / "text_encoder" / name)
                copied.append(name)
    return {"model_state": "model_state.safetensors", "tensors": len(state),
            "text_encoder": "text_encoder" if copied else None, "text_encoder_files": copied}


def _write_tokenizer(te, source: str, folder: Path) -> dict:
    """Copy the tokenizer files (saving a fast tokenizer when the source has no tokenizer.json) and
    describe what the engine must set up when it tokenises with ``tokenizers`` alone."""
    from tokenizers import Tokenizer

    src = Path(source)
    copied = []
    if src.is_dir() and (src / "tokenizer.json").is_file():
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, folder / name)
                copied.append(name)
    else:
        if not getattr(te.tokenizer, "is_fast", False):
            raise ExportError(f"the text encoder's tokenizer ({type(te.tokenizer).__name__}) has no fast "
                              "tokenizer.json; the engine needs one to tokenise without transformers")
        with tempfile.TemporaryDirectory() as td:
            te.tokenizer.save_pretrained(td)
            for name in TOKENIZER_FILES:
                if (Path(td) / name).is_file():
                    shutil.copyfile(Path(td) / name, folder / name)
                    copied.append(name)
    if "tokenizer.json" not in copied:
        raise ExportError("could not write tokenizer.json for the text encoder")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    hf = te.tokenizer
    pad_id = hf.pad_token_id if hf.pad_token_id is not None else 0
    pad_token = hf.pad_token if hf.pad_token is not None else tok.id_to_token(pad_id)
    return {
        "files": copied,
        "max_tokens": te.max_tokens,
        "pad_id": int(pad_id),
        "pad_token": pad_token,
        "padding_side": getattr(hf, "padding_side", "right"),
        "truncation_side": getattr(hf, "truncation_side", "right"),
        "tokenizer_json_has_padding": tok.padding is not None,
        "tokenizer_json_has_truncation": tok.truncation is not None,
        # what the engine does after Tokenizer.from_file(tokenizer.json):
        "setup": {
            "enable_truncation": {"max_length": te.max_tokens, "direction": getattr(hf, "truncation_side", "right")},
            "enable_padding": {"pad_id": int(pad_id), "pad_token": pad_token,
                               "direction": getattr(hf, "padding_side", "right")},
        },
        "needs_setup": True,
        "add_special_tokens": True,
    }


def make_engine_tokenizer(folder: str | os.PathLike, tok_info: dict | None = None):
    """A ``tokenizers.Tokenizer`` set up as the manifest says (what the engine does; used by tests)."""
    from tokenizers import Tokenizer

    folder = Path(folder)
    if tok_info is None:
        tok_info = json.loads((folder / "manifest.json").read_text())["tokenizer"]
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    s = tok_info["setup"]
    tok.enable_truncation(max_length=s["enable_truncation"]["max_length"],
                          direction=s["enable_truncation"]["direction"])
    tok.enable_padding(pad_id=s["enable_padding"]["pad_id"], pad_token=s["enable_padding"]["pad_token"],
                       direction=s["enable_padding"]["direction"])
    return tok


# ---- the export -----------------------------------------------------------------------------------


def export(ckpt_path: str | os.PathLike, config: ExportConfig | None = None) -> Path:
    """Export ``ckpt_path`` to a folder (see the module docstring); returns the folder. Raises ExportError
    (CheckpointError for an unreadable checkpoint); on any error no folder is left behind."""
    cfg = (config or ExportConfig()).validate()
    ckpt_path = Path(ckpt_path)
    from dpr.checkpoint import load_checkpoint

    ck = load_checkpoint(ckpt_path)                       # CheckpointError: missing/truncated/foreign/version
    out = Path(cfg.out) if cfg.out else ckpt_path.with_name(ckpt_path.stem + "-onnx")
    tmp = _prepare_out(out, cfg.force)
    try:
        _export_into(ck, ckpt_path, tmp, cfg)
        _commit(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (DPRError, KeyboardInterrupt, SystemExit)):
            raise
        if isinstance(exc, OSError):
            raise ExportError(f"cannot write the export to {out}: {exc}") from exc
        raise ExportError(f"export failed: {type(exc).__name__}: {exc}") from exc
    return out


def _export_into(ck, ckpt_path: Path, folder: Path, cfg: ExportConfig) -> None:
    import onnx
    import torch

    from dpr.model import PromptEncoder
    from dpr.model.moe import moe_gate_reference

    t_start = time.time()
    mcfg = ck.model_config
    try:
        model = ck.build_model()
    except (CheckpointError, ValueError, RuntimeError) as exc:
        raise ExportError(f"cannot build the model from {ckpt_path}: {exc}") from None
    model.eval()
    te, te_ident = _load_text_encoder(ck, cfg.text_encoder)
    max_tokens = te.max_tokens
    batch, seq = _dims(cfg.max_batch, max_tokens)
    opt = cfg.opt_batch or cfg.max_batch
    graphs: dict[str, dict] = {}
    inferred_models: dict = {}          # graph name -> its checked, shape-inferred ModelProto (from _onnx_export)
    skipped: dict[str, str] = {}
    table = model.retrieval_table.detach().float().numpy().copy()     # [E | tags] with the tag channel
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)

    # -- item table + catalogue
    np.save(folder / "item_embeddings.npy", table.astype(np.float32))
    (folder / "items.json").write_text(json.dumps(ck.catalogue.to_dict(), ensure_ascii=False), encoding="utf-8")
    torch_weights = _write_torch_weights(model, te_ident["loaded_from"], folder) if cfg.torch_weights else None

    # -- prompt encoder
    tok_info = _write_tokenizer(te, te_ident["loaded_from"], folder)
    penc = PromptEncoder(te, model.projection).eval()
    example = te.tokenizer(["show me more comedy films", "no horror"], padding=True, truncation=True,
                           max_length=max_tokens, return_tensors="pt")
    ex_args = (example["input_ids"], example["attention_mask"])
    pe_path = folder / f"{PROMPT_ENCODER}.onnx"
    dyn_axes_pe = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                   "prompt_vector": {0: "batch"}}
    with torch.no_grad():
        exporter, dyn_err, inferred_models[PROMPT_ENCODER] = _onnx_export(
            penc, ex_args, pe_path, PROMPT_INPUTS, ["prompt_vector"],
            {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
            dyn_axes_pe, cfg.opset, None, cfg.verbose, allow_fallback=True)
    graphs[PROMPT_ENCODER] = {"file": pe_path.name, "exporter": exporter, "dynamo_error": dyn_err,
                              "tensorrt_profile": {
                                  "input_ids": {"min": [1, 1], "opt": [opt, min(max_tokens, 32)],
                                                "max": [cfg.max_batch, max_tokens]},
                                  "attention_mask": {"min": [1, 1], "opt": [opt, min(max_tokens, 32)],
                                                     "max": [cfg.max_batch, max_tokens]}}}

    # -- user encoders
    dyn_user = {name: {0: batch} for name in USER_INPUTS}
    dyn_axes_user = {name: {0: "batch"} for name in USER_INPUTS + ("user_vector",)}
    # A padding-invariant backbone (SASRec) gets a dynamic history length, so the engine can run a batch of
    # short histories at its own longest length (Engine history_chunk_rows); recurrent ones keep max_len.
    history_trim = bool(getattr(model.backbone, "padding_invariant", False))
    if history_trim:
        dyn_user["item_seq"] = {0: batch, 1: torch.export.Dim("history", min=1, max=max(mcfg.max_len, 2))}
        dyn_axes_user["item_seq"] = {0: "batch", 1: "history"}
    ex_user = _random_user_batch(rng, 3, mcfg, full=False, p_scale=1.0)
    ex_user_t = tuple(torch.from_numpy(ex_user[k]) for k in USER_INPUTS)
    profile_user = {"item_seq": {"min": [1, 1 if history_trim else mcfg.max_len], "opt": [opt, mcfg.max_len],
                                 "max": [cfg.max_batch, mcfg.max_len]}}
    for name in ("p_pos", "p_neg"):
        profile_user[name] = {"min": [1, mcfg.d], "opt": [opt, mcfg.d], "max": [cfg.max_batch, mcfg.d]}
    profile_user["presence"] = {"min": [1, 2], "opt": [opt, 2], "max": [cfg.max_batch, 2]}

    custom_lib = ftable = None
    if cfg.fused and mcfg.moe != "moe":
        skipped[USER_ENCODER] = f"the model has moe={mcfg.moe!r}: no gate to fuse"
    elif cfg.fused:
        ftable, custom_lib, why = _fused_available()
        if custom_lib is None:
            skipped[USER_ENCODER] = why
    else:
        skipped[USER_ENCODER] = "not requested (--no-fused)"

    if custom_lib is not None and not cfg.portable_graph:
        skipped[USER_ENCODER_PORTABLE] = (f"not needed: the dpr::FusedMoEGate local function of {USER_ENCODER}.onnx "
                                          "is the portable gating (runtimes without the kernel inline it)")
    else:
        up_path = folder / f"{USER_ENCODER_PORTABLE}.onnx"
        with torch.no_grad():
            model.moe.gate = moe_gate_reference
            exporter, dyn_err, inferred_models[USER_ENCODER_PORTABLE] = _onnx_export(
                model, ex_user_t, up_path, USER_INPUTS, ["user_vector"], dyn_user, dyn_axes_user, cfg.opset,
                _portable_table(), cfg.verbose, allow_fallback=True)
        graphs[USER_ENCODER_PORTABLE] = {"file": up_path.name, "exporter": exporter, "dynamo_error": dyn_err,
                                         "tensorrt_profile": profile_user, "history_trim": history_trim}

    if custom_lib is not None:
        uf_path = folder / f"{USER_ENCODER}.onnx"
        fmodel = ck.build_model().eval()
        fmodel.moe.gate = _fused_gate()
        with torch.no_grad():
            table_all = dict(_portable_table())
            table_all.update(ftable)
            exporter, dyn_err, _ = _onnx_export(
                fmodel, ex_user_t, uf_path, USER_INPUTS, ["user_vector"], dyn_user, dyn_axes_user, cfg.opset,
                table_all, cfg.verbose, allow_fallback=False)
        inferred_models[USER_ENCODER] = _add_gate_function(uf_path)
        graphs[USER_ENCODER] = {"file": uf_path.name, "exporter": exporter, "dynamo_error": dyn_err,
                                "custom_op_library": Path(custom_lib).name, "tensorrt_profile": profile_user,
                                "history_trim": history_trim}

    # -- checks: onnx checker, shape inference, ops, IO description
    for name, g in graphs.items():
        inferred = inferred_models.pop(name)
        g["inputs"] = _io_spec(inferred.graph.input)
        g["outputs"] = _io_spec(inferred.graph.output)
        g["opset"] = {o.domain or "ai.onnx": int(o.version) for o in inferred.opset_import}
        g["ops"] = [f"{d}::{o}" if d else o for d, o in graph_ops(inferred)]
        g["custom_ops"] = _custom_ops(inferred)
        g["tensorrt_unsupported_ops"] = [f"{d}::{o}" if d else o for d, o in check_tensorrt_ops(inferred)]
        # the parser's per-op restrictions (TopK's K, constant axes, plugin attributes, opset) and the profile
        g["tensorrt_constraints"] = (check_tensorrt_constraints(inferred)
                                     + check_profile(g["inputs"], g["tensorrt_profile"]))
        if name == USER_ENCODER and not any(c["name"] == op_spec.OP_NAME for c in g["custom_ops"]):
            raise ExportError("the fused user encoder has no dpr::FusedMoEGate node (translation table not applied)")
        if name == USER_ENCODER_PORTABLE and g["custom_ops"]:
            raise ExportError(f"the portable user encoder contains custom ops: {g['custom_ops']}")

    # -- parity (fp32, gated)
    model.moe.gate = moe_gate_reference
    parity = _parity(model, penc, te, ck.catalogue, folder, graphs, custom_lib, cfg, rng, table)
    failures = []
    for name, par in parity.items():
        if name.endswith(INLINED_SUFFIX):
            graphs[name[:-len(INLINED_SUFFIX)]]["parity_without_kernel"] = par
        else:
            graphs[name]["parity"] = par
        worst = par["all"]
        if worst["max_abs"] > cfg.atol or worst["top10_overlap"] < cfg.min_overlap:
            failures.append(f"{name}: max abs error {worst['max_abs']:.3g} (limit {cfg.atol:g}), top-10 overlap "
                            f"{worst['top10_overlap']:.4f} (limit {cfg.min_overlap:g})")
    if failures:
        raise ExportError("parity check failed (ONNX Runtime vs PyTorch): " + "; ".join(failures))

    # -- int8 prompt encoder (gated on its worst-row cosine; see dpr.export.quantize)
    if cfg.int8:
        graphs[INT8_GRAPH] = build_int8_prompt_encoder(folder, graphs[PROMPT_ENCODER], te.tokenizer, max_tokens,
                                                       ck.catalogue, np.ascontiguousarray(table[:, :mcfg.d]),
                                                       cfg.int8_min_cosine)

    # -- fp16 (recorded, not gated)
    fp16_info = None
    if cfg.fp16:
        np.save(folder / "item_embeddings_fp16.npy", table.astype(np.float16))
        fp16_info = _export_fp16(ck, te, folder, graphs, custom_lib, cfg, rng, table, ex_args, ex_user_t,
                                 batch, seq, dyn_user, dyn_axes_user, dyn_axes_pe)

    # -- manifest
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            files[p.relative_to(folder).as_posix()] = {"sha256": file_sha256(p), "bytes": p.stat().st_size}
    import dataclasses

    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created_unix": int(time.time()),
        "export_seconds": round(time.time() - t_start, 2),
        "export_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "model_config": dataclasses.asdict(mcfg),
        "checkpoint": {"file": ckpt_path.name, "sha256": file_sha256(ckpt_path), "meta": _jsonable(ck.meta)},
        "text_encoder": te_ident,
        "tokenizer": tok_info,
        "opset": cfg.opset,
        "max_batch": cfg.max_batch,
        "tensorrt": {"profile": {"min": 1, "opt": opt, "max": cfg.max_batch},
                     "supported_ops_list": OPS_FILE.name,
                     "constraints_checked": "dpr.export.trt_constraints (per graph: tensorrt_constraints)",
                     "min_version": ".".join(map(str, op_spec.MIN_TENSORRT)),
                     "custom_op_plugins": [op_spec.TRT_PLUGIN_ID]},
        "custom_op": {"domain": op_spec.OP_DOMAIN, "name": op_spec.OP_NAME, "version": op_spec.OP_DOMAIN_VERSION,
                      "inputs": list(op_spec.INPUTS), "outputs": list(op_spec.OUTPUTS),
                      "attributes": {"experts_per_polarity": mcfg.experts_per_polarity, "top_k": mcfg.top_k},
                      "ort_library": "libdpr_ort_ops.so (dpr.kernels.build.ort_library_path())",
                      "tensorrt_node_attributes": dict(op_spec.TRT_NODE_ATTRS),
                      "local_function": f"{op_spec.TRT_PLUGIN_ID} (portable body; dpr.kernels.onnx_function)",
                      "used_by": [USER_ENCODER] if USER_ENCODER in graphs else []},
        "graphs": graphs,
        "skipped": skipped,
        "fp16": fp16_info,
        "torch_weights": torch_weights,
        "item_embeddings": {"file": "item_embeddings.npy", "dtype": "float32", "shape": list(table.shape),
                            "padding_row": 0, "fp16_file": "item_embeddings_fp16.npy" if cfg.fp16 else None},
        "items": {"file": "items.json", "num_items": ck.catalogue.num_items, "num_tags": ck.catalogue.num_tags},
        "versions": _versions(),
        "files": files,
    }
    (folder / "manifest.json").write_text(json.dumps(_jsonable(manifest), indent=2), encoding="utf-8")


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if np.isfinite(x) else str(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    return str(x)


