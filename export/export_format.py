"""The export folder's format: its name and version, the graphs' names and inputs, the tokenizer files.

One place the exporter (and anything else reading an export) takes them from; the fused op's own names are
in ``dpr.kernels.op_spec``.
"""

from __future__ import annotations

FORMAT_NAME = "dpr-onnx-export"
FORMAT_VERSION = 1

PROMPT_ENCODER = "prompt_encoder"
USER_ENCODER = "user_encoder"                   # fused
USER_ENCODER_PORTABLE = "user_encoder_portable"
INLINED_SUFFIX = "+inlined"                      # parity key: the fused graph run without the kernel
USER_INPUTS = ("item_seq", "p_pos", "p_neg", "presence")
PROMPT_INPUTS = ("input_ids", "attention_mask")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

