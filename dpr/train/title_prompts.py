"""Item titles as stand-in prompts during training, so steering learns what a tag *means*, not its name.

Template prompts all name their tag ("more {tag} please"), so a projection trained on them alone routes by
the name's tokens, and a request that never names the tag ("something to do my sums") falls where no
training prompt was. The catalogue's own titles describe each tag through its items ("Texas Instruments
TI-84 Plus Graphing Calculator" for Calculators): with probability ``share`` a training row's prompt
embedding is replaced by the frozen embedding of the title of a random item carrying the row's tag (for
either polarity: a negative prompt's text is about the content it excludes). The titles are encoded once.
"""

from __future__ import annotations

import numpy as np
import torch


class TitlePrompts:
    def __init__(self, text_encoder, catalogue):
        titles = [str(t).strip() for t in catalogue.titles]
        item_tags = np.asarray(catalogue.item_tags[1:], dtype=bool)          # (N, T), row i is item i + 1
        usable = np.array([bool(t) for t in titles], dtype=bool)
        members = [np.flatnonzero(item_tags[:, k] & usable) for k in range(item_tags.shape[1])]
        self.count = np.array([len(m) for m in members], dtype=np.int64)
        self.start = np.concatenate([[0], np.cumsum(self.count)[:-1]]).astype(np.int64)
        self.flat = np.concatenate(members).astype(np.int64) if members else np.zeros(0, np.int64)
        keep = np.unique(self.flat)
        self.embeddings = torch.zeros(len(titles), text_encoder.dim)
        if keep.size:
            self.embeddings[torch.from_numpy(keep)] = text_encoder.encode([titles[i] for i in keep.tolist()])

    def mix(self, emb: torch.Tensor, tags: np.ndarray, rng: np.random.Generator, share: float) -> torch.Tensor:
        """``emb`` (B, D) with each row whose tag is >= 0 replaced, with probability ``share``, by the title
        embedding of a random item of that tag (rows whose tag has no titled item keep their prompt)."""
        tags = np.asarray(tags, dtype=np.int64)
        if share <= 0 or not len(tags):
            return emb
        t = np.maximum(tags, 0)
        rows = (tags >= 0) & (rng.random(len(tags)) < share) & (self.count[t] > 0)
        if not rows.any():
            return emb
        pick = self.start[t[rows]] + (rng.random(int(rows.sum())) * self.count[t[rows]]).astype(np.int64)
        out = emb.clone()
        out[torch.from_numpy(rows)] = self.embeddings[torch.from_numpy(self.flat[pick])]
        return out
