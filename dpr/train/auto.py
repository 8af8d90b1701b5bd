"""Training settings that adapt to the dataset (``0`` in a TrainConfig field means "choose for me").

* ``tag_channel = -1``: the model's tag channel (dpr.model.dpr_model) is on when the catalogue has 1 to
  ``TAG_CHANNEL_MAX_TAGS`` tags: each tag is a column of the retrieval space, so retrieval costs
  ``(d + T) / d`` times as much (at d = 64 and 128 tags, 3x), and past that a tag vocabulary is closer to
  free text than to categories.

Chosen from what the dataset is, never from its test split; each choice is recorded with its reason in
the checkpoint (``meta["auto"]``) and printed by ``dpr-train``:

* ``stage3_steps_per_epoch = 0``: an epoch samples about one steering example per training user,
  ``ceil(users / batch_size)`` steps, clamped to [20, 100] (so validation, once per epoch, happens every
  few seconds on small catalogues and not too rarely on large ones);
* ``stage3_epochs = 0``: enough epochs for ``stage3_examples_per_user`` sampled examples per user in all
  (each example is a random cut of the user's sequence, a prompt polarity and a wording), clamped to
  [10, 300] and to at least ``stage3_min_steps`` steps in all; early stopping on the validation steering score
  (``stage3_patience``) ends it sooner.

What steering needs on a catalogue with one tag per item and short histories (Amazon Office, measured in
docs/RESULTS.md) is far more steps than on MovieLens-1M: the fixed 10 x 100 steps stopped while the
validation score was still rising.
"""

from __future__ import annotations

import dataclasses
import math

from dpr.config import TrainConfig


def dataset_profile(dataset) -> dict:
    """What the adaptive choices look at: sizes, tags per item, history lengths."""
    import numpy as np

    lengths = np.array([len(s) for s in dataset.sequences], dtype=np.int64)
    tags = dataset.catalogue.item_tags[1:]
    return {"users": int(dataset.num_users), "items": int(dataset.num_items), "tags": int(tags.shape[1]),
            "tags_per_item": float(tags.sum(1).mean()) if tags.size else 0.0,
            "mean_history": float(lengths.mean()) if lengths.size else 0.0}


TAG_CHANNEL_MAX_TAGS = 128


def resolve_tag_channel(cfg: TrainConfig, num_tags: int) -> tuple[bool, str]:
    """Whether the model gets a tag channel, and why."""
    if cfg.tag_channel in (0, 1):
        return bool(cfg.tag_channel), "set in the config"
    if cfg.tag_channel != -1:
        raise ValueError(f"tag_channel must be 1 (on), 0 (off) or -1 (chosen from the dataset), got {cfg.tag_channel}")
    if 1 <= num_tags <= TAG_CHANNEL_MAX_TAGS:
        return True, f"{num_tags} tags (1..{TAG_CHANNEL_MAX_TAGS}): one retrieval column per tag"
    return False, (f"{num_tags} tags: " + ("none to steer by" if num_tags < 1 else
                                          f"more than {TAG_CHANNEL_MAX_TAGS}, too many retrieval columns"))


def resolve(cfg: TrainConfig, dataset) -> tuple[TrainConfig, dict]:
    """``cfg`` with its automatic fields filled in, and ``{field: {"value", "reason"}}`` for each one chosen."""
    prof = dataset_profile(dataset)
    users = prof["users"] if not cfg.max_train_users else min(prof["users"], cfg.max_train_users)
    chosen: dict = {}
    changes: dict = {}
    steps = cfg.stage3_steps_per_epoch
    if steps == 0:
        steps = min(100, max(20, math.ceil(users / cfg.batch_size)))
        changes["stage3_steps_per_epoch"] = steps
        chosen["stage3_steps_per_epoch"] = {
            "value": steps, "reason": f"about one example per training user: ceil({users} / batch {cfg.batch_size}), "
                                      f"clamped to [20, 100]"}
    if cfg.stage3_epochs == 0:
        epochs = math.ceil(cfg.stage3_examples_per_user * users / (steps * cfg.batch_size))
        epochs = min(300, max(10, math.ceil(cfg.stage3_min_steps / steps), epochs))
        changes["stage3_epochs"] = epochs
        chosen["stage3_epochs"] = {
            "value": epochs, "reason": f"{cfg.stage3_examples_per_user:g} sampled examples per user "
                                       f"({users} users, {steps} x {cfg.batch_size} per epoch), at least "
                                       f"{cfg.stage3_min_steps} steps, at most 300 epochs; early stopping after "
                                       f"{cfg.stage3_patience} epochs without gain"}
    return dataclasses.replace(cfg, **changes), {"profile": prof, "chosen": chosen}


def describe(auto: dict) -> str:
    """One line per automatic choice, for the log."""
    lines = [f"auto: dataset {auto['profile']}"]
    lines += [f"auto: {k} = {v['value']} ({v['reason']})" for k, v in auto.get("chosen", {}).items()]
    return "\n".join(lines)
