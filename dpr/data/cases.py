"""Steering cases (REFERENCE.md section 4) and the stage-3 steering sampler (section 3).

Tags are tag *indices* into ``catalogue.tag_names``. "Recent" means the last ``window`` items of the
history. Ties are broken uniformly at random with a seeded generator.

* positive: t = the target's tag least frequent in the recent history (``None`` if the target has no tag);
* negative: t = the tag most frequent in the recent history that the target lacks (``None`` if every
  recent tag is one of the target's, or the history has no tag);
* compound: both of the above (they never coincide: the negative tag is one the target lacks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dpr.data.dataset import Catalogue, Dataset, left_pad

TASKS = ("standard", "positive", "negative", "compound")
KIND_NONE, KIND_POSITIVE, KIND_NEGATIVE, KIND_COMPOUND = 0, 1, 2, 3
KIND_NAMES = ("none", "positive", "negative", "compound")
NO_TAG = -1


def _item_tags(catalogue) -> np.ndarray:
    return catalogue.item_tags if isinstance(catalogue, Catalogue) else np.asarray(catalogue, dtype=bool)


def _check_window(window: int) -> int:
    if int(window) < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return int(window)


def recent_tag_counts(histories: np.ndarray, item_tags: np.ndarray) -> np.ndarray:
    """(B, T) tag counts over a (B, window) left-padded history block (0 = padding, no tags)."""
    return item_tags[histories].sum(axis=1, dtype=np.int64)


def choose_positive(counts: np.ndarray, target_tags: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Per row, the target tag with the fewest recent occurrences (``noise`` in [0, 1) breaks ties);
    ``NO_TAG`` where the target has no tag."""
    score = np.where(target_tags, counts + 0.5 * noise, np.inf)
    return np.where(target_tags.any(axis=1), score.argmin(axis=1), NO_TAG)


def choose_negative(counts: np.ndarray, target_tags: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Per row, the most frequent recent tag the target lacks; ``NO_TAG`` if there is none."""
    cand = ~target_tags & (counts >= 1)
    score = np.where(cand, counts + 0.5 * noise, -np.inf)
    return np.where(cand.any(axis=1), score.argmax(axis=1), NO_TAG)


def _single(history, target: int, catalogue, rng: np.random.Generator, window: int, fn) -> int | None:
    window = _check_window(window)
    m = _item_tags(catalogue)
    h = np.asarray(history, dtype=np.int64)
    h = h[h > 0]
    counts = recent_tag_counts(left_pad([h], window), m)
    tag = int(fn(counts, m[int(target)][None, :], rng.random((1, m.shape[1])))[0])
    return None if tag == NO_TAG else tag


def positive_case(history, target: int, catalogue, rng: np.random.Generator, window: int = 10) -> int | None:
    """The tag index for a positive steering case, or ``None`` if the target has no tag.
    ``catalogue``: a :class:`Catalogue` or its (N + 1, T) ``item_tags`` matrix."""
    return _single(history, target, catalogue, rng, window, choose_positive)


def negative_case(history, target: int, catalogue, rng: np.random.Generator, window: int = 10) -> int | None:
    """The tag index for a negative steering case, or ``None`` if no recent tag is absent from the target."""
    return _single(history, target, catalogue, rng, window, choose_negative)


@dataclass
class EvalCases:
    """Evaluation cases: row j asks to rank ``targets[j]`` for ``users[j]`` given ``histories[j]``,
    steered toward ``pos_tag[j]`` and/or away from ``neg_tag[j]`` (``NO_TAG`` = -1 when absent)."""

    task: str
    split: str
    users: np.ndarray                 # (M,) int64 user indices into the dataset
    histories: list[np.ndarray]       # M chronological histories (unpadded)
    targets: np.ndarray               # (M,) int64 internal item indices
    pos_tag: np.ndarray               # (M,) int64 tag index or -1
    neg_tag: np.ndarray               # (M,) int64 tag index or -1
    tag_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.users)

    def padded(self, max_len: int) -> np.ndarray:
        """(M, max_len) left-padded histories (the most recent ``max_len`` items)."""
        return left_pad(self.histories, max_len)

    def subset(self, idx) -> "EvalCases":
        idx = np.asarray(idx, dtype=np.int64)
        return EvalCases(self.task, self.split, self.users[idx], [self.histories[i] for i in idx.tolist()],
                         self.targets[idx], self.pos_tag[idx], self.neg_tag[idx], list(self.tag_names))


def build_eval_cases(dataset: Dataset, split: str = "test", task: str = "positive", seed: int = 0,
                     max_users: int = 0, window: int = 10) -> EvalCases:
    """Cases for ``task`` in ("standard", "positive", "negative", "compound") on ``split``
    ("valid" | "test"). Users with fewer than 3 interactions, and users with no valid tag for the task,
    are skipped. ``max_users`` > 0 keeps the first that many evaluation users (before skipping).
    A user's tie-breaking depends only on ``seed`` and the user's index, not on ``max_users``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if split not in ("valid", "test"):
        raise ValueError(f"unknown split {split!r}; use 'valid' or 'test'")
    window = _check_window(window)
    m = dataset.catalogue.item_tags
    rng = np.random.default_rng(seed)
    noise_pos = rng.random((dataset.num_users, m.shape[1]))
    noise_neg = rng.random((dataset.num_users, m.shape[1]))

    users = dataset.eval_users()
    if max_users and max_users > 0:
        users = users[:max_users]
    pairs = [dataset.split(int(u), split) for u in users]
    histories = [h for h, _ in pairs]
    targets = np.array([t for _, t in pairs], dtype=np.int64)
    n = len(users)
    pos = np.full(n, NO_TAG, dtype=np.int64)
    neg = np.full(n, NO_TAG, dtype=np.int64)
    if n and task != "standard":
        counts = recent_tag_counts(left_pad(histories, window), m)
        tt = m[targets]
        if task in ("positive", "compound"):
            pos = choose_positive(counts, tt, noise_pos[users])
        if task in ("negative", "compound"):
            neg = choose_negative(counts, tt, noise_neg[users])
    keep = np.ones(n, dtype=bool)
    if task in ("positive", "compound"):
        keep &= pos != NO_TAG
    if task in ("negative", "compound"):
        keep &= neg != NO_TAG
    idx = np.flatnonzero(keep)
    return EvalCases(task, split, users[idx], [histories[i] for i in idx.tolist()], targets[idx],
                     pos[idx], neg[idx], list(dataset.catalogue.tag_names))


@dataclass
class SteeringBatch:
    """One stage-3 batch (numpy). ``kind``: 0 none, 1 positive, 2 negative, 3 compound."""

    users: np.ndarray        # (B,) int64
    histories: np.ndarray    # (B, max_len) int64, left-padded prefixes of the train sequence
    lengths: np.ndarray      # (B,) int64 unpadded prefix lengths (>= 1)
    targets: np.ndarray      # (B,) int64 the item after the prefix
    kind: np.ndarray         # (B,) int64
    pos_tag: np.ndarray      # (B,) int64 a tag of the target, or -1
    neg_tag: np.ndarray      # (B,) int64 a tag the target lacks, or -1

    def __len__(self) -> int:
        return len(self.users)


def sample_steering_batch(dataset: Dataset, users, rng: np.random.Generator,
                          mix=(0.4, 0.4, 0.2), window: int = 10, max_len: int = 50,
                          prefer: float = 0.8) -> SteeringBatch:
    """Sample one steering example per user in ``users`` (users whose train sequence has fewer than
    2 items are dropped).

    Each example: a random prefix of the user's train sequence (cut >= 1), target = the next item,
    kind drawn from ``mix`` = (positive, negative, compound[, none]) shares. With probability
    ``prefer`` the positive tag is the target's tag rarest in the recent history (else a random tag of
    the target) and the negative tag the most frequent recent tag the target lacks (else a random tag
    the target lacks). An example whose kind has no valid tag falls back to the part it can have
    (compound -> positive or negative) or to kind 0 (no prompt).
    """
    mix = np.asarray(mix, dtype=np.float64)
    if mix.ndim != 1 or len(mix) not in (3, 4) or (mix < 0).any() or mix.sum() <= 0:
        raise ValueError(f"mix must be 3 or 4 non-negative shares (positive, negative, compound[, none]), got {mix}")
    window = _check_window(window)
    kinds_of_mix = np.array([KIND_POSITIVE, KIND_NEGATIVE, KIND_COMPOUND, KIND_NONE][:len(mix)])
    m = dataset.catalogue.item_tags
    T = m.shape[1]

    users = np.asarray(users, dtype=np.int64).reshape(-1)
    seqs = [dataset.train_sequence(int(u)) for u in users]
    lens = np.array([len(s) for s in seqs], dtype=np.int64)
    ok = lens >= 2
    if not ok.all():
        users, lens = users[ok], lens[ok]
        seqs = [s for s, k in zip(seqs, ok) if k]
    B = len(users)
    cut = (rng.random(B) * (lens - 1)).astype(np.int64) + 1          # 1 .. len - 1
    cut = np.minimum(cut, lens - 1)
    cl = cut.tolist()
    prefixes = [s[:c] for s, c in zip(seqs, cl)]
    targets = np.array([int(s[c]) for s, c in zip(seqs, cl)], dtype=np.int64)
    kind = kinds_of_mix[rng.choice(len(mix), size=B, p=mix / mix.sum())] if B else np.zeros(0, np.int64)

    counts = recent_tag_counts(left_pad(prefixes, window), m)
    tt = m[targets]
    # positive: rarest recent tag of the target (preferred) or any tag of the target
    best_pos = choose_positive(counts, tt, rng.random((B, T)))
    any_pos = np.where(tt.any(axis=1), np.where(tt, rng.random((B, T)), -1.0).argmax(axis=1), NO_TAG)
    pos = np.where(rng.random(B) < prefer, best_pos, any_pos)
    # negative: most frequent recent tag the target lacks (preferred, if any) or any tag it lacks
    best_neg = choose_negative(counts, tt, rng.random((B, T)))
    lacks = ~tt
    any_neg = np.where(lacks.any(axis=1), np.where(lacks, rng.random((B, T)), -1.0).argmax(axis=1), NO_TAG)
    neg = np.where((rng.random(B) < prefer) & (best_neg != NO_TAG), best_neg, any_neg)

    has_pos, has_neg = pos != NO_TAG, neg != NO_TAG
    want_pos = (kind == KIND_POSITIVE) | (kind == KIND_COMPOUND)
    want_neg = (kind == KIND_NEGATIVE) | (kind == KIND_COMPOUND)
    use_pos, use_neg = want_pos & has_pos, want_neg & has_neg
    kind = np.where(use_pos & use_neg, KIND_COMPOUND,
                    np.where(use_pos, KIND_POSITIVE, np.where(use_neg, KIND_NEGATIVE, KIND_NONE)))
    return SteeringBatch(users=users, histories=left_pad(prefixes, max_len), lengths=cut.copy(),
                         targets=targets, kind=kind.astype(np.int64),
                         pos_tag=np.where(use_pos, pos, NO_TAG).astype(np.int64),
                         neg_tag=np.where(use_neg, neg, NO_TAG).astype(np.int64))
