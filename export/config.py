"""The export's settings (``ExportConfig``) and its error type (``ExportError``)."""

from __future__ import annotations

from dataclasses import dataclass

from dpr.errors import DPRError


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
    # also write user_encoder_portable.onnx beside the fused graph (opt in: --portable-graph). The fused
    # graph's dpr::FusedMoEGate model-local function already is the portable gating: ONNX Runtime without
    # the custom-op library inlines it, TensorRT's fallback builds the graph with it inlined, and both give
    # the portable graph's results (docs/ARCHITECTURE.md, "One user graph"). So by default an export has
    # one user graph for every runtime. Without a fused graph (--no-fused, moe != "moe", no custom-op
    # library) the portable graph is the user graph and is always written.
    portable_graph: bool = False
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

