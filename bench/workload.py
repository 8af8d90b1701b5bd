"""The requests ``dpr-bench`` sends: one batch per iteration, identical for every backend of a run.

Histories are sampled from the export's catalogue with realistic shapes: log-normal lengths (median 30,
a tail beyond ``max_len`` so truncation and whole-history exclusion are exercised), a per-user taste of
one or two tags (70 % of the items carry them), Zipf-like item popularity, no repeated item.

Prompt rows cycle positive only / positive only / negative only / both (1.25 prompts per request).
Prompt modes:

* ``unique``: every prompt is new (template + tag + a title + a running number): never a cache hit, so
  the prompt encoder runs on every prompt;
* ``templates``: drawn uniformly from the prompt bank (every template of the polarity x every tag), as
  real traffic repeats a small set of phrasings: after warm-up the prompt cache serves most of them;
* ``none``: no prompt at all (the model is then the backbone).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dpr.data.prompts import NEGATIVE, POSITIVE, PromptBank

MEDIAN_HISTORY = 30
TASTE_SHARE = 0.7


@dataclass
class Batch:
    histories: list[list[str]]          # original item ids, oldest first
    prompts: list[str | None]
    negative_prompts: list[str | None]

    @property
    def num_prompts(self) -> int:
        return sum(p is not None for p in self.prompts) + sum(p is not None for p in self.negative_prompts)


class Workload:
    """Builds the batches of one run from the export's ``items.json`` (ids, titles, tags)."""

    def __init__(self, items: dict, max_len: int, seed: int = 0):
        self.ids = [str(x) for x in items["ids"]]
        self.titles = list(items["titles"])
        tags = [list(t) for t in items["tags"]]
        self.tag_names = list(items.get("tag_names") or sorted({t for ts in tags for t in ts}))
        self.max_len = int(max_len)
        self.seed = int(seed)
        n = len(self.ids)
        rng = np.random.default_rng(seed)
        pop = 1.0 / np.arange(1, n + 1) ** 0.8
        pop = pop[rng.permutation(n)]
        self._cdf = np.cumsum(pop) / pop.sum()
        tag_pos = {t: i for i, t in enumerate(self.tag_names)}
        members: list[list[int]] = [[] for _ in self.tag_names]
        for i, ts in enumerate(tags):
            for t in ts:
                if t in tag_pos:
                    members[tag_pos[t]].append(i)
        self._tag_items = [np.asarray(m, np.int64) for m in members]
        self._tag_cdf = [np.cumsum(pop[m]) / pop[m].sum() if len(m) else None for m in self._tag_items]
        bank = PromptBank()
        tag_words = self.tag_names or ["comedy"]
        self._bank = {pol: [bank.render(t, g) for t in bank.templates(pol) for g in tag_words]
                      for pol in (POSITIVE, NEGATIVE)}
        self._counter = 0

    # ---- histories ------------------------------------------------------------------------------
    def _draw(self, rng, cdf, pool, size):
        pick = np.minimum(np.searchsorted(cdf, rng.random(size)), len(cdf) - 1)
        return pick if pool is None else pool[pick]

    def history(self, rng: np.random.Generator) -> list[str]:
        n = len(self.ids)
        length = int(np.clip(round(rng.lognormal(np.log(MEDIAN_HISTORY), 0.8)), 1, min(4 * self.max_len, n)))
        taste = [i for i in rng.choice(len(self._tag_items), size=min(2, len(self._tag_items)), replace=False)
                 if len(self._tag_items[i])] if self._tag_items else []
        picks = []
        for _ in range(4):                                      # draw with replacement, keep first occurrences
            m = 2 * length
            from_taste = rng.random(m) < TASTE_SHARE if taste else np.zeros(m, bool)
            cand = self._draw(rng, self._cdf, None, m)
            for j in np.flatnonzero(from_taste):
                t = taste[int(rng.integers(len(taste)))]
                cand[j] = self._draw(rng, self._tag_cdf[t], self._tag_items[t], 1)[0]
            picks.extend(cand.tolist())
            picks = list(dict.fromkeys(picks))
            if len(picks) >= length:
                break
        if len(picks) < length:                                 # tiny catalogues: fill with unseen items
            rest = np.setdiff1d(np.arange(n), np.asarray(picks, np.int64))
            picks.extend(rng.permutation(rest)[:length - len(picks)].tolist())
        return [self.ids[i] for i in picks[:length]]

    # ---- prompts --------------------------------------------------------------------------------
    def _prompt(self, rng, polarity: str, mode: str) -> str:
        bank = self._bank[polarity]
        text = bank[int(rng.integers(len(bank)))]
        if mode == "unique":
            self._counter += 1
            text = f"{text}, like {self.titles[int(rng.integers(len(self.titles)))]} {self._counter}"
        return text

    def batch(self, size: int, mode: str, iteration: int) -> Batch:
        """Batch ``iteration`` of a ``mode`` run (deterministic given the seed)."""
        rng = np.random.default_rng([self.seed, iteration, ("unique", "templates", "none").index(mode)])
        hist = [self.history(rng) for _ in range(size)]
        pos: list[str | None] = [None] * size
        neg: list[str | None] = [None] * size
        if mode != "none":
            for i in range(size):
                kind = i % 4                                    # 0, 1: positive; 2: negative; 3: both
                if kind in (0, 1, 3):
                    pos[i] = self._prompt(rng, POSITIVE, mode)
                if kind in (2, 3):
                    neg[i] = self._prompt(rng, NEGATIVE, mode)
        return Batch(hist, pos, neg)

    def batches(self, size: int, mode: str, count: int) -> list[Batch]:
        return [self.batch(size, mode, i) for i in range(count)]
