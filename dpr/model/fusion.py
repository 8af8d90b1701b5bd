"""Fusion: aligns the collaborative signal (user vector h) with the semantic one (prompt vector p)."""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from dpr.config import ModelConfig


class Fusion(nn.Module):
    """``z = LayerNorm(W2 gelu(W1 [h; p; h*p] + e_polarity) + h)``.

    ``fusion="add"`` (ablation: prompt added directly) gives ``z = h + p``.
    The polarity embedding (positive / negative) lets one module serve both kinds of prompt.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.fusion
        d, hid = cfg.d, cfg.fusion_hidden
        self.fc1 = nn.Linear(3 * d, hid)
        self.polarity_emb = nn.Embedding(3, hid)      # 0 unused, 1 positive, 2 negative
        self.fc2 = nn.Linear(hid, d)
        self.ln = nn.LayerNorm(d)

    def forward(self, h: torch.Tensor, p: torch.Tensor, polarity: int) -> torch.Tensor:
        if self.kind == "add":
            return h + p
        x = self.fc1(torch.cat([h, p, h * p], dim=-1)) + self.polarity_emb.weight[polarity]
        return self.ln(self.fc2(F.gelu(x)) + h)
