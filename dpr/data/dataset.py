"""The one ``Dataset`` type every source (ml-1m, a generic folder, synthetic) produces.

Items are remapped to internal indices 1..N (0 is padding); users keep their chronological item
sequences. Leave-one-out: the last item is the test target, the second-to-last the validation target.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

PAD = 0


@dataclass
class Catalogue:
    """Items 1..N with their original ids, titles and tags. Index 0 (padding) is not an item."""

    ids: list[str]                  # ids[i - 1] is the original id of internal item i
    titles: list[str]
    tags: list[list[str]]           # tags[i - 1]: the tags of item i
    tag_names: list[str] = field(default_factory=list)   # sorted distinct tags; tag index = position

    def __post_init__(self):
        if not (len(self.ids) == len(self.titles) == len(self.tags)):
            raise ValueError("catalogue ids, titles and tags must have the same length")
        if not self.tag_names:
            self.tag_names = sorted({t for ts in self.tags for t in ts})

    @property
    def num_items(self) -> int:
        return len(self.ids)

    @property
    def num_tags(self) -> int:
        return len(self.tag_names)

    @cached_property
    def tag_index(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tag_names)}

    @cached_property
    def id_to_index(self) -> dict[str, int]:
        return {item_id: i + 1 for i, item_id in enumerate(self.ids)}

    @cached_property
    def item_tags(self) -> np.ndarray:
        """(N + 1, T) bool matrix; row 0 (padding) has no tags."""
        m = np.zeros((self.num_items + 1, self.num_tags), dtype=bool)
        for i, ts in enumerate(self.tags, start=1):
            for t in ts:
                m[i, self.tag_index[t]] = True
        return m

    def items_with_tag(self, tag: str) -> np.ndarray:
        """Internal indices of the items carrying ``tag`` (the tag index of REFERENCE.md)."""
        return np.flatnonzero(self.item_tags[:, self.tag_index[tag]])

    def to_dict(self) -> dict:
        return {"ids": list(self.ids), "titles": list(self.titles), "tags": [list(t) for t in self.tags],
                "tag_names": list(self.tag_names)}

    @classmethod
    def from_dict(cls, d: dict) -> "Catalogue":
        return cls(ids=list(d["ids"]), titles=list(d["titles"]), tags=[list(t) for t in d["tags"]],
                   tag_names=list(d.get("tag_names") or []))


@dataclass
class Dataset:
    name: str
    catalogue: Catalogue
    user_ids: list[str]
    sequences: list[np.ndarray]     # per user, chronological internal item indices (int64, 1..N)

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return self.catalogue.num_items

    @property
    def num_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def stats(self) -> dict:
        return {"name": self.name, "users": self.num_users, "items": self.num_items,
                "interactions": self.num_interactions, "tags": self.catalogue.num_tags}

    # ---- leave-one-out splits -------------------------------------------------------------
    # Users with fewer than 3 interactions cannot give a train/valid/test triple; they stay in
    # training only (their whole sequence) and are skipped by evaluation.
    def eval_users(self) -> np.ndarray:
        return np.array([u for u, s in enumerate(self.sequences) if len(s) >= 3], dtype=np.int64)

    def train_sequence(self, u: int) -> np.ndarray:
        s = self.sequences[u]
        return s[:-2] if len(s) >= 3 else s

    def split(self, u: int, which: str) -> tuple[np.ndarray, int]:
        """(input history, target) for ``which`` in {"valid", "test"}."""
        s = self.sequences[u]
        if which == "valid":
            return s[:-2], int(s[-2])
        if which == "test":
            return s[:-1], int(s[-1])
        raise ValueError(f"unknown split {which!r}; use 'valid' or 'test'")


def left_pad(seqs: list[np.ndarray], max_len: int) -> np.ndarray:
    """Left-pad (and left-truncate: the most recent ``max_len`` items are kept) to (B, max_len) int64."""
    out = np.zeros((len(seqs), max_len), dtype=np.int64)
    for i, s in enumerate(seqs):
        s = np.asarray(s, dtype=np.int64)[-max_len:]
        if len(s):
            out[i, max_len - len(s):] = s
    return out
