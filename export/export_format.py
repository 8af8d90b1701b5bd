"""The export folder's format: its name and version, the graphs' names and inputs, the files every export
holds. One place the exporter writes them from and the engine (``dpr.engine.manifest``) checks them against;
the fused op's own names (domain, op type, inputs, attributes, TensorRT node attributes) are in
``dpr.kernels.op_spec``.
"""

from __future__ import annotations

FORMAT_NAME = "dpr-onnx-export"
FORMAT_VERSION = 1

PROMPT_ENCODER = "prompt_encoder"
USER_ENCODER = "user_encoder"                   # fused
USER_ENCODER_PORTABLE = "user_encoder_portable"  # written only with ExportConfig.portable_graph (or no fused graph)
INLINED_SUFFIX = "+inlined"                      # parity key: the fused graph run without the kernel
USER_INPUTS = ("item_seq", "p_pos", "p_neg", "presence")
PROMPT_INPUTS = ("input_ids", "attention_mask")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
ITEM_TABLE_FILE = "item_embeddings.npy"
ITEMS_FILE = "items.json"

#: files every export holds, and at least one user encoder graph: the fused graph's dpr::FusedMoEGate
#: model-local function is the portable gating (a runtime without the kernel inlines it), so an export
#: written without the portable graph (the default) has only the fused one
REQUIRED_FILES = (f"{PROMPT_ENCODER}.onnx", ITEM_TABLE_FILE, ITEMS_FILE, TOKENIZER_FILES[0])
USER_ENCODER_FILES = (f"{USER_ENCODER}.onnx", f"{USER_ENCODER_PORTABLE}.onnx")
