"""An embedded, seeded synthetic dataset so every command works with no data (REFERENCE.md section 5).

The generator, per user and step ``s`` of a sequence of length ``L``:

* items carry 1-3 genre-like tags and a Zipf-like popularity;
* every item has a few *successors* (popular items sharing its first tag): with probability
  ``p_successor`` the next item is a successor of the previous one (sequential structure a backbone
  can learn);
* otherwise a tag is drawn from the user's taste at that step, ``(1 - w) * start + w * end``, where
  ``w`` ramps from 0 to 1 (over ``ramp`` steps) around a change point at 50-80 % of the sequence,
  and an item with that tag is drawn by popularity. ``end`` is the ``start`` taste moved by ``drift``
  toward a fresh one, so the recent history differs from the long-term taste and naming a tag
  carries information the history lacks (steering is learnable);
* no item repeats inside a user's sequence.
"""

from __future__ import annotations

import numpy as np

from dpr.data.dataset import Catalogue, Dataset

TAG_WORDS = ("comedy", "drama", "action", "horror", "sci-fi", "romance", "thriller", "animation",
             "documentary", "fantasy", "mystery", "western", "crime", "musical", "war", "adventure")
_ADJ = ("Silent", "Crimson", "Last", "Hidden", "Golden", "Broken", "Midnight", "Electric", "Frozen",
        "Wild", "Secret", "Lonely", "Burning", "Distant", "Little", "Dark", "Lost", "Endless", "Paper",
        "Velvet", "Iron", "Quiet", "Savage", "Hollow", "Bright", "Northern", "Restless", "Wicked")
_NOUN = ("Harbor", "Circus", "Garden", "Kingdom", "Road", "Mirror", "Storm", "River", "Empire", "Letter",
         "Island", "Machine", "Summer", "Forest", "Detective", "Dream", "Station", "Shadow", "Voyage",
         "Promise", "Orchard", "Frontier", "Carnival", "Lighthouse", "Symphony", "Horizon", "Tide")
_NAMES = ("Anna", "Max", "Rosa", "Leo", "Clara", "Hugo", "Nina", "Oscar", "Iris", "Felix", "Mara", "Theo")
_SEQUEL = ("", " II", " III", " IV", " V")


def tag_names(num_tags: int) -> list[str]:
    """``num_tags`` genre-like names; beyond the word list, ``tag-<k>`` (1-based)."""
    return [TAG_WORDS[k] if k < len(TAG_WORDS) else f"tag-{k + 1}" for k in range(num_tags)]


def _titles(n: int, rng: np.random.Generator) -> list[str]:
    a, b, c, name, form = (rng.integers(0, len(x), n) for x in (_ADJ, _NOUN, _NOUN, _NAMES, range(5)))
    seen: dict[str, int] = {}
    out = []
    for i in range(n):
        f = form[i]
        if f <= 1:
            base = f"The {_ADJ[a[i]]} {_NOUN[b[i]]}"
        elif f == 2:
            base = f"{_ADJ[a[i]]} {_NOUN[b[i]]}"
        elif f == 3:
            base = f"The {_NOUN[b[i]]} of the {_NOUN[c[i]]}"
        else:
            base = f"{_NAMES[name[i]]}'s {_NOUN[b[i]]}"
        k = seen.get(base, 0)
        seen[base] = k + 1
        out.append(base + (_SEQUEL[k] if k < len(_SEQUEL) else f" ({k + 1})"))
    return out


def make_synthetic(num_users: int = 1000, num_items: int = 2000, num_tags: int = 12,
                   seq_len: tuple[int, int] = (20, 60), seed: int = 0, *, drift: float = 0.8,
                   p_successor: float = 0.3, num_successors: int = 3, zipf: float = 0.9,
                   taste_concentration: float = 0.3, ramp: float = 4.0, name: str = "synthetic",
                   tags_per_item: tuple[float, float, float] = (0.5, 0.35, 0.15)) -> Dataset:
    """A seeded synthetic dataset (same arguments -> identical data).

    ``seq_len``: inclusive (min, max) sequence length per user. ``drift`` in [0, 1]: how far the taste
    at the end of a sequence moves from the taste at its start (0: stationary). ``p_successor``: chance
    the next item is one of the previous item's ``num_successors`` successors. ``zipf``: popularity
    exponent. ``taste_concentration``: Dirichlet concentration of tastes (small: few favourite tags).
    ``ramp``: steps over which the taste switches from start to end. ``tags_per_item``: the shares of items
    with 1, 2 and 3 tags (default 50/35/15 %; ``(1, 0, 0)`` gives one-tag items, as a category tree does).
    """
    lo, hi = int(seq_len[0]), int(seq_len[1])
    if num_users < 1 or num_items < 1 or num_tags < 1:
        raise ValueError("num_users, num_items and num_tags must be >= 1")
    if not 1 <= lo <= hi:
        raise ValueError(f"seq_len must be (min, max) with 1 <= min <= max, got {seq_len}")
    if hi > num_items:
        raise ValueError(f"seq_len max {hi} exceeds num_items {num_items} (items do not repeat per user)")
    if not 0.0 <= drift <= 1.0 or not 0.0 <= p_successor <= 1.0:
        raise ValueError("drift and p_successor must be in [0, 1]")
    if ramp <= 0:
        raise ValueError(f"ramp must be > 0, got {ramp}")
    shares = np.asarray(tags_per_item, dtype=np.float64)
    if shares.shape != (3,) or (shares < 0).any() or shares.sum() <= 0:
        raise ValueError(f"tags_per_item must be 3 non-negative shares (1, 2, 3 tags), got {tags_per_item}")
    rng = np.random.default_rng(seed)
    T, N = num_tags, num_items
    names = tag_names(T)

    # ---- items: tags (first tag from a mildly skewed tag prior), popularity, titles ------------
    tag_prior = 1.0 / np.arange(1, T + 1) ** 0.5
    tag_prior /= tag_prior.sum()
    n_tags = np.minimum(rng.choice([1, 2, 3], size=N, p=shares / shares.sum()), T)
    first = rng.choice(T, size=N, p=tag_prior)
    item_tags = np.zeros((N + 1, T), dtype=bool)
    item_tags[np.arange(1, N + 1), first] = True
    extra = np.argsort(rng.random((N, T)) - 2.0 * item_tags[1:], axis=1)  # other tags, random order
    for j in range(1, min(3, T)):
        rows = np.flatnonzero(n_tags > j)
        item_tags[rows + 1, extra[rows, j]] = True
    pop = np.zeros(N + 1)
    pop[1:] = (1.0 / np.arange(1, N + 1) ** zipf)[rng.permutation(N)]
    titles = _titles(N, rng)
    tags = [[names[t] for t in np.flatnonzero(row)] for row in item_tags[1:]]

    # per-tag item samplers: concatenated cumulative popularity, tag k's block shifted by k
    tag_items, cdf_blocks = [], []
    for k in range(T):
        members = np.flatnonzero(item_tags[:, k])
        if len(members) == 0:  # a tag no item drew: give it a random item so sampling stays valid
            members = np.array([int(rng.integers(1, N + 1))])
            item_tags[members, k] = True
            tags[members[0] - 1] = [names[t] for t in np.flatnonzero(item_tags[members[0]])]
        c = np.cumsum(pop[members])
        tag_items.append(members)
        cdf_blocks.append(k + c / c[-1])
    tag_item_flat = np.concatenate(tag_items)
    tag_cdf_flat = np.concatenate(cdf_blocks)
    tag_cdf_flat[-1] = T + 1.0  # guard against rounding at the very end

    # successors: popular items sharing the item's first tag
    S = max(1, num_successors)
    successors = np.zeros((N + 1, S), dtype=np.int64)
    u = first[:, None] + rng.random((N, S))
    successors[1:] = tag_item_flat[np.minimum(np.searchsorted(tag_cdf_flat, u), len(tag_item_flat) - 1)]

    # ---- users: start / end tastes, lengths ----------------------------------------------------
    U = num_users
    start = rng.dirichlet(np.full(T, taste_concentration), size=U)
    fresh = rng.dirichlet(np.full(T, taste_concentration), size=U)
    end = (1.0 - drift) * start + drift * fresh
    lengths = rng.integers(lo, hi + 1, U)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    total = int(offsets[-1])
    user_of = np.repeat(np.arange(U), lengths)
    pos = np.arange(total) - offsets[user_of]
    # taste switches from start to end around a change point at 50-80 % of the sequence (a short ramp)
    change = rng.uniform(0.5, 0.8, U) * lengths
    w = np.clip((pos - change[user_of]) / ramp + 0.5, 0.0, 1.0)

    def draw_tags(taste: np.ndarray) -> np.ndarray:
        cdf = np.cumsum(taste, axis=1)
        cdf /= cdf[:, -1:]
        flat = (cdf + np.arange(U)[:, None]).ravel()
        idx = np.searchsorted(flat, user_of + rng.random(total))
        return np.minimum(idx - user_of * T, T - 1)

    step_tag = np.where(rng.random(total) < w, draw_tags(end), draw_tags(start))
    # three independent tag-based candidates per step (fallbacks when a candidate was already seen)
    cand = tag_item_flat[np.minimum(np.searchsorted(tag_cdf_flat, step_tag[:, None] + rng.random((total, 3))),
                                    len(tag_item_flat) - 1)]
    use_succ = (rng.random(total) < p_successor).tolist()
    succ_pick = rng.integers(0, S, total).tolist()
    cand_l = cand.tolist()
    succ_l = successors.tolist()
    fallback = rng.integers(1, N + 1, total).tolist()

    out = np.empty(total, dtype=np.int64)
    for uidx in range(U):
        a, b = int(offsets[uidx]), int(offsets[uidx + 1])
        seen: set[int] = set()
        prev = 0
        for s in range(a, b):
            item = 0
            if prev and use_succ[s]:
                x = succ_l[prev][succ_pick[s]]
                if x not in seen:
                    item = x
            if not item:
                for x in cand_l[s]:
                    if x not in seen:
                        item = x
                        break
            if not item:
                x = fallback[s]
                while x in seen:
                    x = x % N + 1
                item = x
            seen.add(item)
            out[s] = item
            prev = item
    sequences = [out[offsets[i]:offsets[i + 1]].copy() for i in range(U)]
    catalogue = Catalogue(ids=[f"i{i}" for i in range(1, N + 1)], titles=titles, tags=tags,
                          tag_names=sorted(names))
    return Dataset(name=name, catalogue=catalogue, user_ids=[f"u{i}" for i in range(1, U + 1)],
                   sequences=sequences)
