"""The DPR model: backbone -> user vector h; prompts -> p; Fusion + MoE steer h inside the
retrieval space; items are ranked by ``h' . E_i`` over the whole catalogue.

With the tag channel (``ModelConfig.tag_channel``) the retrieval space has ``d + T`` columns: item i is
``[E_i ; tags_i]`` (its 0/1 tags) and the steered user vector is ``[h' ; w]``, where ``w`` (one weight per tag)
is read from the prompts: ``w = a+ sigmoid(G p_pos) - a- sigmoid(G p_neg)``, each term present only when its
prompt is. Why: a shift of h alone must make every item of a narrow tag outscore the rest while keeping the
backbone's order inside it, which a 64-d collaborative space cannot do (docs/RESULTS.md, Amazon Office); the
channel lifts or sinks the tag as a whole and leaves h' to order the items. Without a prompt ``w = 0`` and the
extra columns add exact zeros, so the model is still the backbone (the same scores, up to the order in which a
GEMM sums); retrieval is still one inner
product over the whole catalogue, so every retriever and vector store serves it unchanged."""

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
        if cfg.tag_channel:
            if cfg.num_tags < 1:
                raise ValueError("tag_channel needs num_tags >= 1")
            # the catalogue's 0/1 tags (row 0 padding): a buffer, so checkpoints and exports carry it
            self.register_buffer("item_tags", torch.zeros(cfg.num_items + 1, cfg.num_tags))
            self.tag_head = nn.Linear(cfg.d, cfg.num_tags)    # G: projected prompt -> a logit per tag
            # log of the positive / negative channel strengths (a+, a-), learned in stage 3
            self.tag_log_scale = nn.Parameter(torch.full((2,), 1.5))

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

    def tag_weights(self, p_pos: torch.Tensor, p_neg: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
        """(B, T) weights of the tag channel: ``a+ sigmoid(G p_pos)`` for a present positive prompt minus
        ``a- sigmoid(G p_neg)`` for a present negative one; exactly 0 on a row without prompts."""
        scale = self.tag_log_scale.exp()
        pres = presence.to(p_pos.dtype)
        return (pres[:, :1] * scale[0] * torch.sigmoid(self.tag_head(p_pos))
                - pres[:, 1:2] * scale[1] * torch.sigmoid(self.tag_head(p_neg)))

    def retrieval_vector(self, h: torch.Tensor, p_pos: torch.Tensor, p_neg: torch.Tensor,
                         presence: torch.Tensor) -> torch.Tensor:
        """The steered user vector in the retrieval space: ``h'``, and with the tag channel ``[h' ; w]``."""
        steered = self.steer(h, p_pos, p_neg, presence)
        if not self.cfg.tag_channel:
            return steered
        return torch.cat([steered, self.tag_weights(p_pos, p_neg, presence)], dim=1)

    def lift(self, h: torch.Tensor) -> torch.Tensor:
        """An unsteered user vector in the retrieval space (zero tag weights)."""
        if not self.cfg.tag_channel:
            return h
        return torch.cat([h, h.new_zeros(h.shape[0], self.cfg.num_tags)], dim=1)

    def forward(self, item_seq: torch.Tensor, p_pos: torch.Tensor, p_neg: torch.Tensor,
                presence: torch.Tensor) -> torch.Tensor:
        """The user-encoder graph: history + projected prompt vectors + presence -> the steered user vector
        in the retrieval space ((B, retrieval_dim))."""
        return self.retrieval_vector(self.user_vector(item_seq), p_pos, p_neg, presence)

    def scores(self, user_vec: torch.Tensor) -> torch.Tensor:
        """(B, N + 1) dot-product scores over the retrieval table (column 0 is padding)."""
        return user_vec @ self.retrieval_table.t()

    @property
    def item_table(self) -> torch.Tensor:
        """The collaborative item table E ((N + 1, d)): what the backbone reads and stages 1-2 train."""
        return self.item_emb.weight

    @property
    def retrieval_table(self) -> torch.Tensor:
        """What items are ranked against ((N + 1, retrieval_dim)): E, and with the tag channel [E | tags]."""
        if not self.cfg.tag_channel:
            return self.item_emb.weight
        return torch.cat([self.item_emb.weight, self.item_tags], dim=1)

    @property
    def retrieval_dim(self) -> int:
        return self.cfg.d + (self.cfg.num_tags if self.cfg.tag_channel else 0)

    @torch.no_grad()
    def set_item_tags(self, item_tags) -> None:
        """Bind the catalogue's (N + 1, T) 0/1 tag matrix to the tag channel (no-op without one)."""
        if self.cfg.tag_channel:
            tags = torch.as_tensor(item_tags, dtype=self.item_tags.dtype)
            if tuple(tags.shape) != tuple(self.item_tags.shape):
                raise ValueError(f"item_tags must have shape {tuple(self.item_tags.shape)}, got {tuple(tags.shape)}")
            self.item_tags.copy_(tags)
            self.item_tags[0].zero_()


class PromptEncoder(nn.Module):
    """The prompt-encoder graph: token ids -> frozen text encoder -> pooled, normalised -> P -> p."""

    def __init__(self, text_encoder: nn.Module, projection: nn.Linear):
        super().__init__()
        self.text_encoder = text_encoder
        self.projection = projection

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.projection(self.text_encoder(input_ids, attention_mask))


__all__ = ["DPRModel", "PromptEncoder", "POLARITY_NONE", "POLARITY_POSITIVE", "POLARITY_NEGATIVE"]
