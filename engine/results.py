"""The list-and-dict results ``Engine.recommend`` and the dynamic batcher hand out. The columnar result of
``Engine.recommend_batch`` is :class:`~dpr.engine.batch.ResultBatch`; :mod:`dpr.engine.assembly` turns one
into the other."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Recommendation:
    """One request's ranked items (best first). ``count`` items came back of the ``k`` asked for; fewer only
    when fewer items are eligible (the history and the hard filter exclude the rest): ``short_reason`` then
    says why (None for a full result)."""
    item_ids: list[str]
    scores: list[float]
    titles: list[str]
    tags: list[list[str]]
    k: int | None = None               # how many were asked for (None: not recorded)
    count: int | None = None           # how many came back (len(item_ids); filled in when not given)
    short_reason: str | None = None    # why count < k, e.g. "only 3 items remain after excluding ..."

    def __post_init__(self):
        if self.count is None:
            self.count = len(self.item_ids)

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def short(self) -> bool:
        """True when fewer than ``k`` items came back."""
        return self.k is not None and self.count < self.k

    def to_dict(self) -> dict:
        return {"k": self.k, "count": self.count, "short_reason": self.short_reason,
                "items": [{"rank": i + 1, "id": a, "title": t, "tags": g, "score": s}
                          for i, (a, t, g, s) in enumerate(zip(self.item_ids, self.titles, self.tags, self.scores))]}


LAZY_FIELDS = ("item_ids", "scores", "titles", "tags")


@dataclass
class Recommendations:
    """A batch's results: per-row lists (``item_ids[i]`` is row i's ranking); ``recs[i]`` is a Recommendation.
    ``ks[i]`` items were asked for and ``counts[i]`` came back; ``short_reasons[i]`` says why a row is short
    (None when full); ``short_rows`` lists the short rows.

    Made by the engine (:func:`dpr.engine.assembly.recommendations`), the four lists are built from the
    batch's arrays on first access, each on its own: a caller that reads only ``item_ids`` never pays for
    5,000 fresh tag lists (nor the garbage collector for tracking them)."""
    item_ids: list[list[str]] = field(default_factory=list)
    scores: list[list[float]] = field(default_factory=list)
    titles: list[list[str]] = field(default_factory=list)
    tags: list[list[list[str]]] = field(default_factory=list)
    ks: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    short_reasons: list[str | None] = field(default_factory=list)

    def __getattr__(self, name: str):
        # only reached for a lazy field not built yet (the engine's results skip __init__ for them)
        src = self.__dict__.get("_lazy")
        if src is None or name not in LAZY_FIELDS:
            raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")
        value = src(name)
        self.__dict__[name] = value
        return value

    def __getstate__(self) -> dict:
        """Pickled (or copied) with every list built: the builder refers to the batch's arrays."""
        for name in LAZY_FIELDS:
            getattr(self, name)
        return {k: v for k, v in self.__dict__.items() if k != "_lazy"}

    def __len__(self) -> int:
        return len(self.counts) if "_lazy" in self.__dict__ else len(self.item_ids)

    def __getitem__(self, i: int) -> Recommendation:
        return Recommendation(self.item_ids[i], self.scores[i], self.titles[i], self.tags[i],
                              k=self.ks[i] if self.ks else None, count=self.counts[i] if self.counts else None,
                              short_reason=self.short_reasons[i] if self.short_reasons else None)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def short_rows(self) -> list[int]:
        """The rows that got fewer than their ``k`` items."""
        return [i for i, r in enumerate(self.short_reasons) if r is not None]

    def to_list(self) -> list[dict]:
        return [r.to_dict() for r in self]
