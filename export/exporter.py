"""Export a DPR checkpoint to a self-describing ONNX folder that the engine loads without torch.

    from dpr.export import ExportConfig, export
    folder = export("ckpt.pt", ExportConfig(out="model-onnx"))

Folder contents (``manifest.json`` describes every file):

- ``prompt_encoder.onnx``: ``input_ids``, ``attention_mask`` (int64, batch x seq) -> ``prompt_vector``
  (batch x d): frozen text encoder, mean pooling, L2 norm and the trained projection in one graph;
  the tokenizer files beside it (``tokenizer.json``, ``tokenizer_config.json``, special tokens map).
- ``user_encoder.onnx`` (one ``dpr::FusedMoEGate`` node per gate; needs the custom-op library) and
  ``user_encoder_portable.onnx`` (standard ONNX ops only): ``item_seq`` (batch x max_len int64,
  left-padded), ``p_pos``, ``p_neg`` (batch x d float32), ``presence`` (batch x 2 int64) ->
  ``user_vector`` (batch x d).
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

import contextlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dpr.errors import CheckpointError, DPRError

log = logging.getLogger("dpr.export")

FORMAT_NAME = "dpr-onnx-export"
FORMAT_VERSION = 1

PROMPT_ENCODER = "prompt_encoder"
USER_ENCODER = "user_encoder"                   # fused
USER_ENCODER_PORTABLE = "user_encoder_portable"
USER_INPUTS = ("item_seq", "p_pos", "p_neg", "presence")
PROMPT_INPUTS = ("input_ids", "attention_mask")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class ExportError(DPRError):
    """The export failed (bad input, unwritable output, an exporter failure or a parity failure)."""


@dataclass
class ExportConfig:
    out: str | None = None            # output folder; default: "<ckpt stem>-onnx" beside the checkpoint
    opset: int = 20
    fp16: bool = False                # also write float16 graphs + item table (parity recorded, not gated)
    max_batch: int = 512              # TensorRT optimisation profile max (min is 1)
    opt_batch: int = 0                # TensorRT profile opt (0: max_batch)
    fused: bool = True                # also write user_encoder.onnx with the dpr::FusedMoEGate node
    torch_weights: bool = True        # also write model_state.safetensors + text_encoder/ (torch backend)
    int8: bool = False                # also write prompt_encoder_int8.onnx (per-channel 7-bit dynamic int8; gated)
    int8_min_cosine: float = 0.98     # int8 gate: worst-row cosine to the fp32 graph on real prompts
    force: bool = False               # replace an existing non-empty output folder
    text_encoder: str | None = None   # override the checkpoint's text encoder path (hash still verified)
    atol: float = 1e-4                # fp32 parity gate: max abs error
    min_overlap: float = 0.99         # fp32 parity gate: top-10 overlap of retrieval over the item table
    parity_batches: tuple = (1, 7, 512)
    seed: int = 0
    verbose: bool = False             # show the torch exporter's own output

    def validate(self) -> "ExportConfig":
        if self.opset < 18:
            raise ExportError(f"--opset must be >= 18 (LayerNormalization/Gelu/TopK as exported), got {self.opset}")
        if self.max_batch < 1:
            raise ExportError(f"--max-batch must be >= 1, got {self.max_batch}")
        if self.opt_batch < 0 or self.opt_batch > self.max_batch:
            raise ExportError(f"--opt-batch must be in 0..max_batch={self.max_batch}, got {self.opt_batch}")
        if self.atol < 0 or not 0 <= self.min_overlap <= 1:
            raise ExportError("atol must be >= 0 and min_overlap in [0, 1]")
        if not -1 <= self.int8_min_cosine <= 1:
            raise ExportError(f"--int8-min-cosine must be in [-1, 1], got {self.int8_min_cosine}")
        if not self.parity_batches or min(self.parity_batches) < 1:
            raise ExportError("parity_batches must be positive batch sizes")
        return self


def _log(msg: str) -> None:
    print(f"dpr-export: {msg}", file=sys.stderr)


# ---- output folder: complete or absent ------------------------------------------------------------

def _prepare_out(out: Path, force: bool) -> Path:
    """Check ``out`` can be (re)placed and create the temporary sibling folder; return the temp folder."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"output folder {out} exists and is not empty (pass --force to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise ExportError(f"cannot write the output folder {out}: {exc.strerror or exc}") from None
    if not os.access(tmp, os.W_OK):
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"cannot write the output folder {out}: permission denied")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)                     # mkdtemp makes 0700; a normal folder is wanted
    return tmp


def _commit(tmp: Path, out: Path) -> None:
    """Move the finished temporary folder to ``out`` (replacing an old one: rename aside, rename in, delete)."""
    old = None
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            old.rmdir()
            os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- helpers -----------------------------------------------------------------------------------

@contextlib.contextmanager
def quiet_export(verbose: bool = False):
    """Silence torch.onnx's logging, warnings and prints (unless ``verbose``); also used by dpr-bench."""
    if verbose:
        yield
        return
    buf_out, buf_err = io.StringIO(), io.StringIO()
    import logging

    lg = logging.getLogger("torch.onnx")
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
            warnings.simplefilter("ignore")
            yield
    finally:
        lg.setLevel(level)


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


def _sha256(path: Path) -> str:
    from dpr.checkpoint import file_sha256

    return file_sha256(path)


_ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 9: "bool", 11: "float64"}


def _io_spec(values) -> list[dict]:
    spec = []
    for v in values:
        tt = v.type.tensor_type
        shape = [d.dim_param if d.HasField("dim_param") else (int(d.dim_value) if d.HasField("dim_value") else None)
                 for d in tt.shape.dim]
        spec.append({"name": v.name, "dtype": _ONNX_DTYPES.get(tt.elem_type, str(tt.elem_type)), "shape": shape,
                     "dynamic_axes": {str(i): s for i, s in enumerate(shape) if isinstance(s, str) or s is None}})
    return spec


def _check_graph(path: Path) -> "onnx.ModelProto":  # noqa: F821
    import onnx

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as exc:
        raise ExportError(f"{path.name} fails the ONNX checker / shape inference: {type(exc).__name__}: {exc}") from None
    return inferred


def _check_or_repair(path: Path) -> "onnx.ModelProto":  # noqa: F821
    """Check a freshly exported graph (returns what ``_check_graph`` returns); when only its recorded
    intermediate shapes (value_info) contradict ONNX shape inference, drop them and check again (seen with
    torch 2.11's dynamo exporter + onnx 1.23: "Inferred shape and existing shape differ in dimension 0:
    (384) vs (64)"). Raises ExportError when the graph is still invalid, so the caller can fall back to the
    legacy exporter."""
    import onnx

    try:
        return _check_graph(path)
    except ExportError as first:
        model = onnx.load(str(path))
        if not len(model.graph.value_info):
            raise
        del model.graph.value_info[:]
        onnx.save(model, str(path))
        try:
            inferred = _check_graph(path)
        except ExportError:
            raise first from None
        log.warning("dpr-export: %s: dropped exporter shape annotations that contradict shape inference (%s)",
                    path.name, str(first)[:200])
        return inferred


def _custom_ops(model) -> list[dict]:
    ops = []
    seen = set()
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx") and (n.domain, n.op_type) not in seen:
            seen.add((n.domain, n.op_type))
            version = next((o.version for o in model.opset_import if o.domain == n.domain), None)
            attrs = {a.name: ("int" if a.type == a.INT else str(a.type)) for a in n.attribute}
            values = {a.name: int(a.i) for a in n.attribute if a.type == a.INT}
            ops.append({"domain": n.domain, "name": n.op_type, "version": version, "attributes": attrs,
                        "attribute_values": values, "count": sum(1 for m in model.graph.node
                                                                 if (m.domain, m.op_type) == (n.domain, n.op_type))})
    return ops


def _onnx_export(module, args, path: Path, input_names, output_names, dynamic_shapes, dynamic_axes, opset: int,
                 table: dict | None, verbose: bool, allow_fallback: bool) -> tuple[str, str | None, "onnx.ModelProto"]:  # noqa: F821
    """torch.onnx.export with the dynamo exporter; on failure, the legacy (TorchScript) exporter when allowed.
    Returns (exporter used, dynamo failure message or None, the checked and shape-inferred ModelProto: the
    graph is checked once, here)."""
    import torch

    try:
        with quiet_export(verbose):
            torch.onnx.export(module, args, str(path), dynamo=True, opset_version=opset, external_data=False,
                              input_names=list(input_names), output_names=list(output_names),
                              dynamic_shapes=dynamic_shapes, custom_translation_table=table or None,
                              verbose=verbose)
        return "dynamo", None, _check_or_repair(path)
    except Exception as exc:  # the exporter raises many types
        dynamo_err = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
        if not allow_fallback:
            raise ExportError(f"torch.onnx (dynamo) cannot export {path.name}: {dynamo_err}") from None
    if path.exists():
        path.unlink()
    try:
        with quiet_export(verbose):
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset,
                              input_names=list(input_names), output_names=list(output_names),
                              dynamic_axes=dynamic_axes)
    except Exception as exc:
        raise ExportError(f"cannot export {path.name}: dynamo exporter: {dynamo_err}; legacy exporter: "
                          f"{type(exc).__name__}: {exc}") from None
    return "torchscript", dynamo_err, _check_graph(path)


def _ort_session(path: Path, custom_lib: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if custom_lib:
        so.register_custom_ops_library(custom_lib)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


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


# ---- parity inputs -----------------------------------------------------------------------------

def _random_user_batch(rng: np.random.Generator, b: int, cfg, full: bool, p_scale: float):
    n, L, d = cfg.num_items, cfg.max_len, cfg.d
    seq = np.zeros((b, L), dtype=np.int64)
    lengths = np.full(b, L) if full else rng.integers(1, max(2, L // 2) + 1, size=b)
    lengths = np.minimum(lengths, L)
    for i, ln in enumerate(lengths):
        seq[i, L - ln:] = rng.integers(1, n + 1, size=ln)
    p_pos = (rng.standard_normal((b, d)) * p_scale).astype(np.float32)
    p_neg = (rng.standard_normal((b, d)) * p_scale).astype(np.float32)
    combos = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], dtype=np.int64)
    presence = combos[(np.arange(b) + rng.integers(0, 4)) % 4]
    # an absent prompt is sent as zeros on half the rows, as random values on the rest
    zero_absent = rng.random(b) < 0.5
    p_pos[(presence[:, 0] == 0) & zero_absent] = 0
    p_neg[(presence[:, 1] == 0) & zero_absent] = 0
    return {"item_seq": seq, "p_pos": p_pos, "p_neg": p_neg, "presence": presence}


def _real_histories(rng: np.random.Generator, catalogue, cfg, b: int) -> np.ndarray:
    """Left-padded histories of real catalogue items: mostly one tag's items (a coherent taste), some mixed."""
    L = cfg.max_len
    seq = np.zeros((b, L), dtype=np.int64)
    tags = catalogue.tag_names
    for i in range(b):
        ln = int(rng.integers(1, L + 1))
        pool = catalogue.items_with_tag(tags[i % len(tags)]) if tags and i % 3 else np.arange(1, cfg.num_items + 1)
        if len(pool) == 0:
            pool = np.arange(1, cfg.num_items + 1)
        seq[i, L - ln:] = rng.choice(np.asarray(pool), size=ln)
    return seq


def _real_prompts(catalogue) -> tuple[list[str], list[str]]:
    from dpr.data.prompts import NEGATIVE, POSITIVE, PromptBank

    bank = PromptBank()
    tags = catalogue.tag_names or ["comedy"]
    pos = [bank.render(t, tag) for tag in tags for t in bank.templates(POSITIVE)]
    neg = [bank.render(t, tag) for tag in tags for t in bank.templates(NEGATIVE)]
    return pos, neg


# ---- the export -----------------------------------------------------------------------------------

def _dims(max_batch: int, max_tokens: int):
    import torch

    batch = torch.export.Dim("batch", min=1, max=max(max_batch, 2))
    seq = torch.export.Dim("seq", min=1, max=max(max_tokens, 2))
    return batch, seq


def _fused_gate(experts_per_polarity_check=None):
    import torch

    def gate(z, w_router, b_router, expert_out, polarity, residual, experts_per_polarity, top_k):
        return torch.ops.dpr.fused_moe_gate(z, w_router, b_router, expert_out, polarity, residual,
                                            int(experts_per_polarity), int(top_k))
    return gate


def _fused_available() -> tuple[dict | None, str | None, str]:
    """(translation table, ORT custom-op library path, reason when unavailable)."""
    try:
        from dpr.kernels.onnx_translation import custom_translation_table
        table = custom_translation_table()
    except Exception as exc:
        return None, None, f"dpr.kernels (torch op / ONNX translation) unavailable: {type(exc).__name__}: {exc}"
    try:
        from dpr.kernels import build as kbuild
        lib = kbuild.ort_library_path(cuda=False)
        if lib is None:
            with quiet_export(False):
                kbuild.build(verbose=False, fetch_headers=False, only=["cpu_lib", "ort_lib"])
            lib = kbuild.ort_library_path(cuda=False)
    except Exception as exc:
        return table, None, f"ORT custom-op library unavailable: {type(exc).__name__}: {exc}"
    if lib is None:
        return table, None, ("the ONNX Runtime custom-op library libdpr_ort_ops.so is not built (run "
                             "`python -m dpr.kernels.build`); the fused graph cannot be verified")
    return table, lib, ""


def _portable_table() -> dict:
    try:
        from dpr.kernels.onnx_translation import portable_translation_table
        return portable_translation_table()
    except Exception:
        import torch
        from onnxscript import opset20 as op

        def _sort_stable(self, stable=None, dim: int = -1, descending: bool = False):
            k = op.Shape(self, start=dim) if dim == -1 else op.Shape(self, start=dim, end=dim + 1)
            return op.TopK(self, k, axis=dim, largest=1 if descending else 0, sorted=1)
        return {torch.ops.aten.sort.stable: _sort_stable}


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

    up_path = folder / f"{USER_ENCODER_PORTABLE}.onnx"
    with torch.no_grad():
        model.moe.gate = moe_gate_reference
        exporter, dyn_err, inferred_models[USER_ENCODER_PORTABLE] = _onnx_export(
            model, ex_user_t, up_path, USER_INPUTS, ["user_vector"], dyn_user, dyn_axes_user, cfg.opset,
            _portable_table(), cfg.verbose, allow_fallback=True)
    graphs[USER_ENCODER_PORTABLE] = {"file": up_path.name, "exporter": exporter, "dynamo_error": dyn_err,
                                     "tensorrt_profile": profile_user, "history_trim": history_trim}

    custom_lib = None
    if cfg.fused and mcfg.moe != "moe":
        skipped[USER_ENCODER] = f"the model has moe={mcfg.moe!r}: no gate to fuse"
    elif cfg.fused:
        ftable, custom_lib, why = _fused_available()
        if custom_lib is None:
            skipped[USER_ENCODER] = why
        else:
            uf_path = folder / f"{USER_ENCODER}.onnx"
            fmodel = ck.build_model().eval()
            fmodel.moe.gate = _fused_gate()
            with torch.no_grad():
                table_all = dict(_portable_table())
                table_all.update(ftable)
                exporter, dyn_err, inferred_models[USER_ENCODER] = _onnx_export(
                    fmodel, ex_user_t, uf_path, USER_INPUTS, ["user_vector"], dyn_user, dyn_axes_user, cfg.opset,
                    table_all, cfg.verbose, allow_fallback=False)
            graphs[USER_ENCODER] = {"file": uf_path.name, "exporter": exporter, "dynamo_error": dyn_err,
                                    "custom_op_library": Path(custom_lib).name, "tensorrt_profile": profile_user,
                                    "history_trim": history_trim}
    else:
        skipped[USER_ENCODER] = "not requested (--no-fused)"

    # -- checks: onnx checker, shape inference, ops, IO description
    from dpr.export.trt_ops import check_tensorrt_ops, graph_ops

    for name, g in graphs.items():
        inferred = inferred_models.pop(name)
        g["inputs"] = _io_spec(inferred.graph.input)
        g["outputs"] = _io_spec(inferred.graph.output)
        g["opset"] = {o.domain or "ai.onnx": int(o.version) for o in inferred.opset_import}
        g["ops"] = [f"{d}::{o}" if d else o for d, o in graph_ops(inferred)]
        g["custom_ops"] = _custom_ops(inferred)
        g["tensorrt_unsupported_ops"] = [f"{d}::{o}" if d else o for d, o in check_tensorrt_ops(inferred)]
        if name == USER_ENCODER and not any(c["name"] == "FusedMoEGate" for c in g["custom_ops"]):
            raise ExportError("the fused user encoder has no dpr::FusedMoEGate node (translation table not applied)")
        if name == USER_ENCODER_PORTABLE and g["custom_ops"]:
            raise ExportError(f"the portable user encoder contains custom ops: {g['custom_ops']}")

    # -- parity (fp32, gated)
    model.moe.gate = moe_gate_reference
    parity = _parity(model, penc, te, ck.catalogue, folder, graphs, custom_lib, cfg, rng, table)
    failures = []
    for name, par in parity.items():
        g = graphs.get(name)
        if g is not None:
            g["parity"] = par
        worst = par["all"]
        if worst["max_abs"] > cfg.atol or worst["top10_overlap"] < cfg.min_overlap:
            failures.append(f"{name}: max abs error {worst['max_abs']:.3g} (limit {cfg.atol:g}), top-10 overlap "
                            f"{worst['top10_overlap']:.4f} (limit {cfg.min_overlap:g})")
    if failures:
        raise ExportError("parity check failed (ONNX Runtime vs PyTorch): " + "; ".join(failures))

    # -- int8 prompt encoder (gated on its worst-row cosine; see dpr.export.quantize)
    if cfg.int8:
        from dpr.export.quantize import INT8_GRAPH, build_int8_prompt_encoder

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
    from dpr.export.trt_ops import OPS_FILE

    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            files[p.relative_to(folder).as_posix()] = {"sha256": _sha256(p), "bytes": p.stat().st_size}
    import dataclasses

    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created_unix": int(time.time()),
        "export_seconds": round(time.time() - t_start, 2),
        "export_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "model_config": dataclasses.asdict(mcfg),
        "checkpoint": {"file": ckpt_path.name, "sha256": _sha256(ckpt_path), "meta": _jsonable(ck.meta)},
        "text_encoder": te_ident,
        "tokenizer": tok_info,
        "opset": cfg.opset,
        "max_batch": cfg.max_batch,
        "tensorrt": {"profile": {"min": 1, "opt": opt, "max": cfg.max_batch},
                     "supported_ops_list": OPS_FILE.name,
                     "custom_op_plugins": ["dpr::FusedMoEGate"]},
        "custom_op": {"domain": "dpr", "name": "FusedMoEGate", "version": 1,
                      "inputs": ["z", "w_router", "b_router", "expert_out", "polarity", "residual"],
                      "outputs": ["out"],
                      "attributes": {"experts_per_polarity": mcfg.experts_per_polarity, "top_k": mcfg.top_k},
                      "ort_library": "libdpr_ort_ops.so (dpr.kernels.build.ort_library_path())",
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


def _parity(model, penc, te, catalogue, folder: Path, graphs: dict, custom_lib, cfg: ExportConfig,
            rng, table: np.ndarray) -> dict:
    import torch

    from dpr.export.parity import compare, merge

    mcfg = model.cfg
    out: dict[str, dict] = {}
    # prompt encoder: random token batches + every real prompt of the template bank
    sess = _ort_session(folder / graphs[PROMPT_ENCODER]["file"])
    vocab = int(te.model.config.vocab_size)
    pad = te.tokenizer.pad_token_id or 0
    cases = {}
    for b in cfg.parity_batches:
        max_len = te.max_tokens if b <= 64 else min(te.max_tokens, 24)
        lens = rng.integers(1, max_len + 1, size=b)
        lens[0] = max_len
        ids = np.full((b, max_len), pad, dtype=np.int64)
        mask = np.zeros((b, max_len), dtype=np.int64)
        for i, ln in enumerate(lens):
            ids[i, :ln] = rng.integers(0, vocab, size=ln)
            mask[i, :ln] = 1
        cases[f"random_b{b}"] = (ids, mask)
    pos, neg = _real_prompts(catalogue)
    tk = te.tokenizer(pos + neg, padding=True, truncation=True, max_length=te.max_tokens, return_tensors="np")
    cases["real_prompts"] = (tk["input_ids"].astype(np.int64), tk["attention_mask"].astype(np.int64))
    res = {}
    real_p = None
    for key, (ids, mask) in cases.items():
        with torch.no_grad():
            ref = penc(torch.from_numpy(ids), torch.from_numpy(mask)).float().numpy()
        got = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        res[key] = compare(got, ref, table[:, :mcfg.d])     # prompt vectors live in E's d columns
        if key == "real_prompts":
            real_p = (ref, got)
    res["all"] = merge(list(res.values()))
    out[PROMPT_ENCODER] = res

    # user encoders: random batches (short / full histories, four presence combinations) + real inputs
    n_pos = len(pos)
    p_ref, p_onnx = real_p
    user_cases = {}
    for b in cfg.parity_batches:
        for full in (False, True):
            user_cases[f"random_b{b}_{'full' if full else 'short'}"] = _random_user_batch(rng, b, mcfg, full, 1.0)
    b = max(cfg.parity_batches)
    seq = _real_histories(rng, catalogue, mcfg, b)
    ip = rng.integers(0, n_pos, size=b)
    ineg = rng.integers(0, len(neg), size=b)
    combos = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], dtype=np.int64)
    presence = combos[np.arange(b) % 4]
    user_cases["real"] = {"item_seq": seq, "p_pos": p_ref[ip], "p_neg": p_ref[n_pos + ineg], "presence": presence}
    short = user_cases[f"random_b{b}_short"]
    longest = max(1, int((short["item_seq"] > 0).sum(axis=1).max()))
    for name in (USER_ENCODER_PORTABLE, USER_ENCODER):
        if name not in graphs:
            continue
        sess = _ort_session(folder / graphs[name]["file"], custom_lib if name == USER_ENCODER else None)
        cases = dict(user_cases)
        if graphs[name].get("history_trim"):
            # the graph run on histories cut to the batch's longest, against PyTorch on the full max_len
            cases["trimmed_history"] = dict(short, item_seq=np.ascontiguousarray(short["item_seq"][:, -longest:]),
                                            _reference_seq=short["item_seq"])
        res = {}
        for key, inp in cases.items():
            with torch.no_grad():
                ref = model(*(torch.from_numpy(inp.get("_reference_seq", inp["item_seq"]) if k == "item_seq"
                                               else inp[k]) for k in USER_INPUTS)).numpy()
            got = sess.run(None, {k: inp[k] for k in USER_INPUTS})[0]
            res[key] = compare(got, ref, table)
        # end to end on real prompts: ONNX prompt vectors into the ONNX user encoder vs all-PyTorch
        e2e = dict(user_cases["real"], p_pos=p_onnx[ip].astype(np.float32), p_neg=p_onnx[n_pos + ineg].astype(np.float32))
        with torch.no_grad():
            ref = model(*(torch.from_numpy(user_cases["real"][k]) for k in USER_INPUTS)).numpy()
        got = sess.run(None, {k: e2e[k] for k in USER_INPUTS})[0]
        res["real_end_to_end"] = compare(got, ref, table)
        res["all"] = merge(list(res.values()))
        out[name] = res
    return out


def _export_fp16(ck, te, folder: Path, graphs: dict, custom_lib, cfg: ExportConfig, rng, table, ex_args, ex_user_t,
                 batch, seq, dyn_user, dyn_axes_user, dyn_axes_pe) -> dict:
    """float16 copies of the graphs, exported from a ``.half()`` model (float16 weights, float inputs and
    outputs in float16). Recorded with their parity against the fp32 PyTorch model; never gated."""
    import torch

    from dpr.export.parity import compare, merge
    from dpr.export.trt_ops import check_tensorrt_ops, graph_ops
    from dpr.model import PromptEncoder
    from dpr.model.moe import moe_gate_reference

    info: dict[str, dict] = {}
    model32 = ck.build_model().eval()
    penc32 = PromptEncoder(te, model32.projection).eval()
    todo = [(PROMPT_ENCODER, None)]
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
            entry["exporter"] = exporter
            entry["inputs"] = _io_spec(inferred.graph.input)
            entry["outputs"] = _io_spec(inferred.graph.output)
            entry["ops"] = [f"{d}::{o}" if d else o for d, o in graph_ops(inferred)]
            entry["tensorrt_unsupported_ops"] = [f"{d}::{o}" if d else o for d, o in check_tensorrt_ops(inferred)]
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
