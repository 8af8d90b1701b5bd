"""Item titles as stand-in prompts during training, so steering learns what a tag *means*, not its name.

Template prompts all name their tag ("more {tag} please"), so a projection trained on them alone routes by
the name's tokens, and a request that never names the tag ("something to do my sums") falls where no
training prompt was. The catalogue's own titles describe each tag through its items ("Texas Instruments
TI-84 Plus Graphing Calculator" for Calculators): with probability ``share`` a training row's prompt
embedding is replaced by the frozen embedding of the title of a random item carrying the row's tag (for
either polarity: a negative prompt's text is about the content it excludes). The titles are encoded once.

Only where titles say what their tag is: ``title_prompt_share = -1`` (the default) measures, with the frozen
encoder, how often a title's nearest tag (by cosine to the mean of the tag's training prompts) is one of
its item's tags, against chance; at 3x chance or more the share is 0.3, else 0. Measured: Amazon Office
0.49 against 0.04 (12x: on), MovieLens-1M 0.155 against 0.093 (1.7x: off), the synthetic catalogue's
random titles 0.83x (off).
"""

from __future__ import annotations

import numpy as np
import torch


AUTO_SHARE = 0.3          # the share when titles are informative (Amazon Office ablation, docs/RESULTS.md)
MIN_LIFT = 3.0            # informative: the nearest-tag agreement at least this many times chance


class StandInPool:
    """Per tag, a pool of frozen text embeddings a training row's prompt can be swapped for: tag t's members are
    ``flat[start[t]:start[t] + count[t]]``, rows of ``embeddings``. Titles (:class:`TitlePrompts`) and vocabulary
    words (``dpr.train.word_prompts.WordPrompts``) are such pools."""

    count: np.ndarray
    start: np.ndarray
    flat: np.ndarray
    embeddings: torch.Tensor

    def _set_members(self, members: list) -> None:
        """``members[t]``: the rows of ``embeddings`` that tag t may draw."""
        self.count = np.array([len(m) for m in members], dtype=np.int64)
        self.start = np.concatenate([[0], np.cumsum(self.count)[:-1]]).astype(np.int64)
        self.flat = np.concatenate(members).astype(np.int64) if members else np.zeros(0, np.int64)

    def replace(self, emb: torch.Tensor, tags: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        """``emb`` with each selected row (``rows``, bool) replaced by a random member of its tag's pool; rows
        without a tag, or whose tag's pool is empty, keep their prompt."""
        tags = np.asarray(tags, dtype=np.int64)
        t = np.maximum(tags, 0)
        rows = (tags >= 0) & rows & (self.count[t] > 0)
        if not rows.any():
            return emb
        pick = self.start[t[rows]] + (rng.random(int(rows.sum())) * self.count[t[rows]]).astype(np.int64)
        out = emb.clone()
        out[torch.from_numpy(rows)] = self.embeddings[torch.from_numpy(self.flat[pick])]
        return out


class TitlePrompts(StandInPool):
    def __init__(self, text_encoder, catalogue):
        titles = [str(t).strip() for t in catalogue.titles]
        item_tags = np.asarray(catalogue.item_tags[1:], dtype=bool)          # (N, T), row i is item i + 1
        usable = np.array([bool(t) for t in titles], dtype=bool)
        self._set_members([np.flatnonzero(item_tags[:, k] & usable) for k in range(item_tags.shape[1])])
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
        return self.replace(emb, tags, rng.random(len(tags)) < share, rng)

    def tag_agreement(self, prompt_table, polarity: int, train_wordings: int, item_tags) -> tuple[float, float]:
        """(share of titled items whose nearest tag is one of theirs, the same for a random tag): how much the
        titles say about their tags to this encoder. A tag's point is the mean of its training prompts."""
        item_tags = np.asarray(item_tags, dtype=bool)[1:]
        T = item_tags.shape[1]
        words = np.repeat(np.arange(train_wordings), T)
        tags = np.tile(np.arange(T), train_wordings)
        protos = prompt_table.lookup(polarity, words, tags).view(train_wordings, T, -1).mean(0)
        protos = protos / protos.norm(dim=1, keepdim=True).clamp_min(1e-12)
        items = np.unique(self.flat)
        if not items.size:
            return 0.0, 1.0
        pred = (self.embeddings[torch.from_numpy(items)] @ protos.t()).argmax(1).numpy()
        agree = float(item_tags[items, pred].mean())
        chance = float(item_tags[items].mean(0).mean())
        return agree, chance


def auto_share(titles: TitlePrompts, ctx, catalogue) -> tuple[float, str]:
    """The title-prompt share for ``title_prompt_share = -1`` and why."""
    from dpr.model.moe import POLARITY_POSITIVE

    agree, chance = titles.tag_agreement(ctx.table, POLARITY_POSITIVE, ctx.train_wordings[POLARITY_POSITIVE],
                                         catalogue.item_tags)
    lift = agree / max(chance, 1e-12)
    share = AUTO_SHARE if lift >= MIN_LIFT else 0.0
    return share, (f"titles name their tag for {agree:.3f} of items against {chance:.3f} by chance ({lift:.1f}x; "
                   f"{'>=' if share else '<'} {MIN_LIFT:g}x)")
