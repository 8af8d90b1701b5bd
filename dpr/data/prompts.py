"""Prompt templates over tags (REFERENCE.md section 3): several wordings per polarity; the last
``heldout`` wordings of each polarity are kept out of training to test generalisation to new phrasing."""

from __future__ import annotations

from typing import Iterable

import numpy as np

POSITIVE = "positive"
NEGATIVE = "negative"

POSITIVE_TEMPLATES = (
    "I want to watch {tag} movies",
    "show me more {tag}",
    "something {tag} tonight",
    "recommend me some {tag} films",
    "I'd love a good {tag} movie",
    "more {tag} please",
    "in the mood for {tag}",
)
NEGATIVE_TEMPLATES = (
    "no {tag} please",
    "anything but {tag}",
    "I don't want {tag} movies",
    "skip the {tag}",
    "no more {tag} films",
    "keep {tag} out of it",
    "not in the mood for {tag}",
)


def tag_display(tag: str) -> str:
    """The form a tag takes inside a prompt: lowercase, ``_`` as a space ("Sci-Fi" -> "sci-fi",
    "Children's" -> "children's")."""
    return " ".join(tag.replace("_", " ").split()).lower()


def _polarity(polarity) -> str:
    if polarity in (POSITIVE, "pos", "+", 1):
        return POSITIVE
    if polarity in (NEGATIVE, "neg", "-", 2):
        return NEGATIVE
    raise ValueError(f"unknown polarity {polarity!r}; use 'positive' or 'negative'")


class PromptBank:
    """Templates per polarity with a train / held-out split (the last ``heldout`` of each polarity)."""

    def __init__(self, positive: Iterable[str] = POSITIVE_TEMPLATES,
                 negative: Iterable[str] = NEGATIVE_TEMPLATES, heldout: int = 1):
        self._templates = {POSITIVE: tuple(positive), NEGATIVE: tuple(negative)}
        for pol, ts in self._templates.items():
            if len(set(ts)) != len(ts):
                raise ValueError(f"duplicate {pol} templates")
            for t in ts:
                if "{tag}" not in t:
                    raise ValueError(f"template {t!r} has no {{tag}} placeholder")
            if not 0 <= heldout < len(ts):
                raise ValueError(f"heldout={heldout} must leave at least one of the {len(ts)} {pol} "
                                 "templates for training")
        self.heldout = int(heldout)

    def templates(self, polarity) -> list[str]:
        return list(self._templates[_polarity(polarity)])

    def train_templates(self, polarity) -> list[str]:
        ts = self._templates[_polarity(polarity)]
        return list(ts[:len(ts) - self.heldout])

    def heldout_templates(self, polarity) -> list[str]:
        ts = self._templates[_polarity(polarity)]
        return list(ts[len(ts) - self.heldout:])

    @staticmethod
    def render(template: str, tag: str) -> str:
        return template.format(tag=tag_display(tag))

    def sample(self, polarity, tag: str, rng: np.random.Generator, heldout: bool = False) -> str:
        """A random rendering of ``tag`` with a train (or held-out) template."""
        ts = self.heldout_templates(polarity) if heldout else self.train_templates(polarity)
        if not ts:
            raise ValueError("no held-out templates (heldout=0)")
        return self.render(ts[int(rng.integers(len(ts)))], tag)

    def all_prompts(self, tags: Iterable[str]) -> list[str]:
        """Every distinct prompt text over ``tags`` (both polarities, train and held-out), in a fixed
        order: for precomputing the frozen encoder's embeddings once."""
        out: dict[str, None] = {}
        tags = list(tags)
        for pol in (POSITIVE, NEGATIVE):
            for t in self._templates[pol]:
                for tag in tags:
                    out.setdefault(self.render(t, tag))
        return list(out)
