"""DPR model parts: backbones, frozen prompt encoder, Fusion, MoE and the fused-gate reference."""

from dpr.model.backbones import BACKBONES, Backbone, GRU4Rec, SASRec, build_backbone  # noqa: F401
from dpr.model.dpr_model import DPRModel, PromptEncoder  # noqa: F401
from dpr.model.fusion import Fusion  # noqa: F401
from dpr.model.moe import (POLARITY_NEGATIVE, POLARITY_NONE, POLARITY_POSITIVE, MoE,  # noqa: F401
                           moe_gate_reference)
from dpr.model.text_encoder import TextEncoder, resolve_text_encoder  # noqa: F401
