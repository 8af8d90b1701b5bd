"""Frozen text embeddings of every (polarity, wording, tag) prompt, computed once.

The text encoder is frozen, so training and evaluation look prompt embeddings up in this table
instead of running the encoder per step."""

from __future__ import annotations

import numpy as np
import torch


class PromptTable:
    def __init__(self, text_encoder, templates: dict[int, list[str]], tag_names: list[str], render):
        """``templates``: polarity (1 positive, 2 negative) -> wordings; ``render(template, tag)``."""
        self.templates = {pol: list(ts) for pol, ts in templates.items()}
        self.tag_names = list(tag_names)
        self.texts: list[str] = []
        self.index: dict[tuple[int, int, int], int] = {}
        for pol, ts in self.templates.items():
            for w, tpl in enumerate(ts):
                for t, tag in enumerate(self.tag_names):
                    self.index[(pol, w, t)] = len(self.texts)
                    self.texts.append(render(tpl, tag))
        self.embeddings = text_encoder.encode(self.texts) if self.texts else torch.zeros(0, text_encoder.dim)

    def num_wordings(self, polarity: int) -> int:
        return len(self.templates.get(polarity, []))

    def lookup(self, polarity: int, wordings: np.ndarray, tags: np.ndarray) -> torch.Tensor:
        """(B, text_dim) embeddings; rows with tag < 0 get zeros (no prompt)."""
        rows = np.array([self.index.get((polarity, int(w), int(t)), -1) if t >= 0 else -1
                         for w, t in zip(wordings, tags)], dtype=np.int64)
        out = torch.zeros(len(rows), self.embeddings.shape[1])
        ok = rows >= 0
        if ok.any():
            out[torch.from_numpy(ok)] = self.embeddings[torch.from_numpy(rows[ok])]
        return out

    def text(self, polarity: int, wording: int, tag: int) -> str:
        return self.texts[self.index[(polarity, wording, tag)]]
