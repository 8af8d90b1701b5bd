"""Configuration dataclasses. Every design choice the paper leaves open is a field here, not a
constant in code (REFERENCE.md section 2), and CLIs mirror these fields as flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    num_items: int = 0                 # N; item indices are 1..N, 0 is padding
    num_tags: int = 0
    backbone: str = "sasrec"           # "sasrec" | "gru4rec" (see dpr.model.backbones.BACKBONES)
    d: int = 64
    max_len: int = 50
    # SASRec
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.2
    # GRU4Rec
    gru_layers: int = 1
    # prompt encoder
    text_dim: int = 384                # output size of the frozen sentence encoder
    # Fusion: "mlp" (MLP over [h; p; h*p] + polarity embedding, LayerNorm) or "add" (z = h + p: ablation)
    fusion: str = "mlp"
    fusion_hidden: int = 128
    # MoE: "moe" (E+ / E- experts, routed) or "shared" (one MLP for both polarities: ablation)
    moe: str = "moe"
    experts_per_polarity: int = 4
    top_k: int = 2
    expert_hidden: int = 128           # each expert: d -> expert_hidden -> d
    # Tag channel: the retrieval space gains one column per tag (items: their 0/1 tags; user vector: a weight
    # per tag read from the prompt, 0 without one), so a prompt can lift or sink a whole tag while the MoE's
    # shift of h orders the items inside it (dpr.model.dpr_model). Off in checkpoints that predate it.
    tag_channel: bool = False

    @property
    def num_experts(self) -> int:
        return 2 * self.experts_per_polarity

    def validate(self) -> "ModelConfig":
        if self.num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {self.num_items}")
        if self.backbone not in ("sasrec", "gru4rec"):
            raise ValueError(f"unknown backbone {self.backbone!r}; choose sasrec or gru4rec")
        if self.fusion not in ("mlp", "add"):
            raise ValueError(f"unknown fusion {self.fusion!r}; choose mlp or add")
        if self.moe not in ("moe", "shared"):
            raise ValueError(f"unknown moe {self.moe!r}; choose moe or shared")
        if not 1 <= self.top_k <= self.experts_per_polarity:
            raise ValueError(f"top_k must be in 1..experts_per_polarity={self.experts_per_polarity}, got {self.top_k}")
        if self.d < 1 or self.max_len < 1:
            raise ValueError("d and max_len must be positive")
        if self.backbone == "sasrec" and self.d % self.num_heads:
            raise ValueError(f"d={self.d} must be divisible by num_heads={self.num_heads}")
        return self


@dataclass
class TrainConfig:
    seed: int = 0
    device: str = "cpu"                # stage 1 (the costly one) runs here, e.g. "cuda"; the rest on the CPU
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    # stage 1: collaborative (backbone + item table)
    stage1_epochs: int = 30
    stage1_batch_size: int = 0         # stage-1 batch (0: batch_size, which stages 2-3 use)
    stage1_max_minutes: float = 0.0    # wall-clock budget for stage 1 (0: none); the best epoch so far is kept
    stage1_all_windows: bool = False   # train on every max_len window of long histories, not only the newest
    stage1_window_stride: int = 0      # with all windows: items between window ends (0: max_len, no overlap)
    stage1_length_buckets: bool = False  # batch windows of similar length, each cut to its longest (SASRec
                                       # only: the same outputs without the left padding; ML-1M windows are
                                       # 57% real items, so an epoch does about half the backbone work)
    stage1_lr_schedule: str = "constant"  # "constant" | "cosine" (to 0 over stage1_epochs or the time budget)
    stage1_warmup_epochs: float = 0.0  # linear warm-up of the learning rate (epochs, fractions allowed)
    stage1_label_smoothing: float = 0.0
    stage1_mask_history: bool = True   # leave the window's earlier items out of each position's softmax, as
                                       # evaluation and serving leave the history out of the ranking
    patience: int = 5                  # early stopping on validation NDCG@10 (epochs without gain)
    eval_every: int = 1
    # stage 2: alignment (projection P (+ Fusion)), backbone/items/text encoder frozen
    stage2_epochs: int = 5
    stage2_steps_per_epoch: int = 200
    stage2_lr: float = 1e-2
    align_temperature: float = 0.1
    # stage 3: steering (Fusion + MoE (+ P)), backbone frozen
    # stage 3 budget: 0 = chosen from the dataset (dpr.train.auto: about one example per user per epoch, and
    # stage3_examples_per_user examples per user in all), early-stopped on the validation steering score
    stage3_epochs: int = 0
    stage3_steps_per_epoch: int = 0
    stage3_examples_per_user: float = 60.0
    stage3_min_steps: int = 1000       # floor of the automatic budget (the old fixed 10 x 100): the synthetic demo
                                       # data lost 14% of its validation steering score with 480 steps
    stage3_patience: int = 8           # stage-3 epochs without a better validation steering score before stopping
    stage3_calibrate: bool = True      # after stage 3, scale each polarity's shift by the factor the validation
                                       # split prefers (dpr.train.calibrate; folded into the experts' weights)
    neg_max_violation: float = 0.05    # calibration: the negative scale keeps validation violation@10 under this
    stage3_lr: float = 3e-3
    stage3_mask_history: bool = True   # leave each example's history items out of the steering softmax
    neg_lambda: float = 3.0            # weight of -log(1 - forbidden-tag softmax mass)
    neg_keep_lambda: float = 1.0       # negative-only rows: weight of KL(backbone || steered) over the items the
                                       # prompt allows, so suppressing a tag keeps the backbone's order elsewhere
    pos_lambda: float = -1.0           # rows with a positive prompt: weight of -log(softmax mass on the tag's items);
                                       # -1 (with pos_keep_lambda): stage 3 runs per candidate pair, validation picks
    pos_keep_lambda: float = -1.0      # rows with a positive prompt: weight of KL(backbone || steered) over the items
                                       # the request allows (the tag's items, minus a negative tag's), so steering
                                       # toward a tag keeps the backbone's order inside it (hard_filter's order)
    title_prompt_share: float = -1.0   # stages 2-3: share of prompts replaced by the title of an item of the tag
                                       # (dpr.train.title_prompts), so meaning carries, not only the tag's name;
                                       # -1: 0.3 where the titles say what their tag is (measured), else 0
    word_prompt_share: float = -1.0    # stages 2-3: share of prompts replaced by a word of the text encoder's
                                       # vocabulary near the tag's meaning (dpr.train.word_prompts); -1: 0.3 where
                                       # words are found for at least half the tags, else 0
    tag_channel: int = -1              # the model's tag channel: 1 on, 0 off, -1 chosen from the dataset (on when
                                       # it has 1..dpr.train.auto.TAG_CHANNEL_MAX_TAGS tags)
    mix_positive: float = 0.4          # share of positive / negative / compound examples in stage 3
    mix_negative: float = 0.4
    mix_compound: float = 0.2
    recent_window: int = 10            # "recent history" for choosing steering tags
    heldout_templates: int = 1         # wordings per polarity held out of training (for eval)
    max_train_users: int = 0           # 0 = all users (for quick runs)
    max_eval_users: int = 0            # 0 = all users


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, data: dict):
    """Build a config dataclass from a dict, rejecting unknown keys with a clear message."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
    return cls(**data)
