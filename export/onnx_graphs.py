"""Graph building: torch.onnx export (dynamo, legacy fallback), the ONNX checker and shape inference, the
fused gate's translation tables and local function, the IO description, ONNX Runtime sessions for parity."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

from dpr.export.config import ExportError

log = logging.getLogger("dpr.export")


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


def _add_gate_function(path: Path) -> "onnx.ModelProto":  # noqa: F821
    """Give the fused graph at ``path`` the ``dpr::FusedMoEGate`` model-local function (its portable body,
    ``dpr.kernels.onnx_function``), so that a runtime without the kernel inlines it; check it again and return
    the checked, shape-inferred model."""
    import onnx

    from dpr.kernels.onnx_function import attach_function

    model = onnx.load(str(path))
    if not attach_function(model):
        raise ExportError(f"{path.name} has no dpr::FusedMoEGate node (translation table not applied)")
    onnx.save(model, str(path))
    return _check_graph(path)


def _ort_session(path: Path, custom_lib: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if custom_lib:
        so.register_custom_ops_library(custom_lib)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


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

