"""Words of the text encoder's own vocabulary as stand-in prompts, so steering reads what a request means.

Template prompts all name their tag, and item titles describe it only where titles are informative (a
movie's title rarely says its genre). People write "something to make me laugh" or "nothing with
explosions": words the training prompts never contained. The encoder already places such words near the
tag's meaning; what is missing is a training signal that ties that neighbourhood to the tag. So, per tag,
the words of the encoder's vocabulary nearest to the tag (its prototype: the mean of its training template
embeddings, plus the centroid of its items' titles when titles are given) and clearly nearer to it than to
any other tag (cosine margin) are kept, up to ``per_tag`` of them; during stages 2-3 a share of the training
rows (either polarity, as with titles) get the embedding of one of their tag's words instead of a template.

Measured with all-MiniLM-L6-v2 (docs/RESULTS.md, "Wordings that never name the tag"): a linear classifier
trained on the templates and titles finds the right genre for 0.53 of the ML-1M natural wordings; with
the mined words added, 0.70 (Amazon Office: 0.51 -> 0.57). The wordings themselves are never used.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from dpr.model.moe import POLARITY_NEGATIVE, POLARITY_POSITIVE
from dpr.train.title_prompts import StandInPool

PER_TAG = 50          # words kept per tag (the gain flattens from 50 to 200 on both catalogues)
MARGIN = 0.03         # cosine lead over the second-nearest tag a word needs (ambiguous words stay out)
AUTO_SHARE = 0.3      # share of training rows given a word, as for titles
_WORD = re.compile(r"[a-z]{3,}")


def vocabulary(tokenizer) -> list[str]:
    """The whole words of a WordPiece/BPE vocabulary: lower-case letters only, three or more (no word-piece
    continuations, numbers, punctuation or special tokens), in the vocabulary's id order."""
    vocab = tokenizer.get_vocab()
    return [w for w, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if _WORD.fullmatch(w)]


def tag_prototypes(ctx, num_tags: int, titles=None) -> torch.Tensor:
    """(T, D) unit vectors: the mean of each tag's training template embeddings (both polarities), plus the
    centroid of its titled items' embeddings when ``titles`` (a TitlePrompts) is given."""
    parts = []
    for pol in (POLARITY_POSITIVE, POLARITY_NEGATIVE):
        n = ctx.train_wordings[pol]
        if n:
            words = np.repeat(np.arange(n), num_tags)
            tags = np.tile(np.arange(num_tags), n)
            parts.append(ctx.table.lookup(pol, words, tags).view(n, num_tags, -1).mean(0))
    proto = torch.nn.functional.normalize(torch.stack(parts).mean(0), dim=1)
    if titles is not None:
        cent = torch.zeros_like(proto)
        for t in range(num_tags):
            c = int(titles.count[t])
            if c:
                cent[t] = titles.embeddings[torch.from_numpy(titles.flat[titles.start[t]:titles.start[t] + c])].mean(0)
        proto = torch.nn.functional.normalize(proto + torch.nn.functional.normalize(cent, dim=1), dim=1)
    return proto


class WordPrompts(StandInPool):
    """Per tag, the vocabulary words nearest to it (see the module doc), with their frozen embeddings; ``replace``
    puts one of its tag's words in chosen rows. ``words[t]``: tag t's words, nearest first."""

    def __init__(self, text_encoder, ctx, num_tags: int, titles=None, per_tag: int = PER_TAG,
                 margin: float = MARGIN):
        vocab = vocabulary(text_encoder.tokenizer)
        emb = text_encoder.encode(vocab, batch_size=512)                       # (V, D); words are a few tokens
        proto = tag_prototypes(ctx, num_tags, titles)
        self.vocabulary_size = len(vocab)
        self.words: list[list[str]] = [[] for _ in range(num_tags)]
        picked: list[np.ndarray] = [np.zeros(0, np.int64) for _ in range(num_tags)]
        if len(vocab) and num_tags:
            sim = emb @ proto.t()                                               # (V, T)
            if num_tags > 1:
                top = sim.topk(2, dim=1)
                best, lead = top.indices[:, 0], top.values[:, 0] - top.values[:, 1]
            else:
                best, lead = torch.zeros(len(vocab), dtype=torch.long), torch.full((len(vocab),), float("inf"))
            for t in range(num_tags):
                idx = torch.nonzero((best == t) & (lead >= margin)).flatten()
                idx = idx[sim[idx, t].argsort(descending=True)[:per_tag]]
                picked[t] = idx.numpy().astype(np.int64)
                self.words[t] = [vocab[i] for i in picked[t].tolist()]
        kept = np.concatenate(picked) if picked else np.zeros(0, np.int64)
        self.embeddings = emb[torch.from_numpy(kept)]                           # the kept words' rows only
        self._set_members(np.split(np.arange(len(kept), dtype=np.int64), np.cumsum([len(p) for p in picked])[:-1]))

    def summary(self, tag_names, shown: int = 5) -> str:
        kept = int(self.count.sum())
        few = ", ".join(f"{tag_names[t]}: {' '.join(self.words[t][:shown])}" for t in range(min(3, len(self.words))))
        return (f"{kept} words for {int((self.count > 0).sum())} of {len(self.count)} tags from a vocabulary of "
                f"{self.vocabulary_size} (e.g. {few})")


class StandIns:
    """Training prompts replaced by stand-ins: each row (with a tag) draws one number u, and takes the first
    source whose share interval holds it (titles in [0, s1), words in [s1, s1 + s2)), so a row gets at most one
    stand-in and each source's share is what it says."""

    def __init__(self, sources: list):
        self.sources = [(src, float(share)) for src, share in sources if src is not None and share > 0]
        total = sum(s for _, s in self.sources)
        if total > 1:
            raise ValueError(f"stand-in prompt shares add up to {total:g} > 1")

    def __bool__(self) -> bool:
        return bool(self.sources)

    def mix(self, emb: torch.Tensor, tags: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        tags = np.asarray(tags, dtype=np.int64)
        if not self.sources or not len(tags):
            return emb
        u = rng.random(len(tags))
        lo = 0.0
        for src, share in self.sources:
            emb = src.replace(emb, tags, (u >= lo) & (u < lo + share), rng)
            lo += share
        return emb
