"""The DPR model: backbone -> user vector h; prompts -> p; Fusion + MoE steer h inside the
retrieval space; items are ranked by ``h' . E_i`` over the whole catalogue."""

from __future__ import annotations

import torch
from torch import nn

from dpr.config import ModelConfig
from dpr.model.backbones import build_backbone
from dpr.model.fusion import Fusion
from dpr.model.moe import POLARITY_NEGATIVE, POLARITY_NONE, POLARITY_POSITIVE, MoE


class DPRModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.item_emb = nn.Embedding(cfg.num_items + 1, cfg.d, padding_idx=0)
        nn.init.normal_(self.item_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.backbone = build_backbone(cfg, self.item_emb)
        self.projection = nn.Linear(cfg.text_dim, cfg.d)      # P: text space -> retrieval space
        self.fusion = Fusion(cfg)
        self.moe = MoE(cfg)

    # ---- parts ---------------------------------------------------------------------------
    def user_vector(self, item_seq: torch.Tensor) -> torch.Tensor:
        return self.backbone(item_seq)

    def project_prompt(self, text_emb: torch.Tensor) -> torch.Tensor:
        return self.projection(text_emb)

    def steer(self, h: torch.Tensor, p_pos: torch.Tensor, p_neg: torch.Tensor,
              presence: torch.Tensor) -> torch.Tensor:
        """``h' = h + delta_pos + delta_neg``. ``presence`` (B, 2): [positive given, negative given].

        A missing prompt contributes exactly 0, so a row with no prompt returns the backbone's h
        unchanged (the standard task cannot regress). The two gates chain: the positive gate's output
        is the negative gate's residual; each polarity's router input is fused from h, not from the
        other's output, so the two steerings stay decoupled.
        """
        pol_pos = presence[:, 0].to(torch.int64) * POLARITY_POSITIVE
        pol_neg = presence[:, 1].to(torch.int64) * POLARITY_NEGATIVE
        z_pos = self.fusion(h, p_pos, POLARITY_POSITIVE)
        h1 = self.moe(z_pos, pol_pos, h)
        z_neg = self.fusion(h, p_neg, POLARITY_NEGATIVE)
        return self.moe(z_neg, pol_neg, h1)

    def forward(self, item_seq: torch.Tensor, p_pos: torch.Tensor, p_neg: torch.Tensor,
                presence: torch.Tensor) -> torch.Tensor:
        """The user-encoder graph: history + projected prompt vectors + presence -> steered h'."""
        return self.steer(self.user_vector(item_seq), p_pos, p_neg, presence)

    def scores(self, user_vec: torch.Tensor) -> torch.Tensor:
        """(B, N + 1) dot-product scores over the item table (column 0 is padding)."""
        return user_vec @ self.item_emb.weight.t()

    @property
    def item_table(self) -> torch.Tensor:
        return self.item_emb.weight


class PromptEncoder(nn.Module):
    """The prompt-encoder graph: token ids -> frozen text encoder -> pooled, normalised -> P -> p."""

    def __init__(self, text_encoder: nn.Module, projection: nn.Linear):
        super().__init__()
        self.text_encoder = text_encoder
        self.projection = projection

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.projection(self.text_encoder(input_ids, attention_mask))


__all__ = ["DPRModel", "PromptEncoder", "POLARITY_NONE", "POLARITY_POSITIVE", "POLARITY_NEGATIVE"]
