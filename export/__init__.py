"""ONNX export of a trained DPR checkpoint (``dpr-export``): prompt encoder, user encoder (fused, with its
portable body as a local function; optionally a separate portable graph), item table, catalogue and a
manifest, verified against PyTorch in ONNX Runtime."""

if __name__ != "dpr.export":  # imported as the bare name 'export': never this folder (dpr/_bare_name.py)
    from dpr._bare_name import defer_to_installed

    defer_to_installed(__name__, __file__)
else:
    from dpr.export.exporter import ExportConfig, ExportError, export, make_engine_tokenizer  # noqa: F401
    from dpr.export.trt_constraints import check_profile, check_tensorrt_constraints  # noqa: F401
    from dpr.export.trt_ops import check_tensorrt_ops, graph_ops, tensorrt_supported_ops  # noqa: F401

    __all__ = ["ExportConfig", "ExportError", "export", "make_engine_tokenizer", "check_tensorrt_ops", "graph_ops",
               "tensorrt_supported_ops", "check_tensorrt_constraints", "check_profile"]
