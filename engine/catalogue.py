"""The export's catalogue as the engine serves it: item ids, titles and tags; the id -> catalogue-index maps
(a dict, and the C++ id index for whole batches); the tag matrix; hard filters checked into keys and turned
into allowed masks.

Catalogue indices run ``1..N`` (index ``i`` is ``item_ids[i - 1]``); 0 is padding, never an item.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from dpr.errors import InputError

log = logging.getLogger("dpr.engine")

FILTER_KEYS = ("include_tags", "exclude_tags", "exclude_items")


def is_integer(x) -> bool:
    """An int or numpy integer, not a bool (history ids given as integers are taken in their decimal form)."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def short_repr(x, limit: int = 60) -> str:
    r = repr(x)
    return r if len(r) <= limit else r[:limit - 3] + "..."


def describe_value(x) -> str:
    """``None`` or ``<type> <repr>`` of a value an error message reports."""
    return "None" if x is None else f"{type(x).__name__} {short_repr(x.item() if isinstance(x, np.generic) else x)}"


def is_filter(x) -> bool:
    """A single hard filter (a dict, or an object with filter attributes), as opposed to a per-row column."""
    return isinstance(x, Mapping) or any(hasattr(x, a) for a in FILTER_KEYS)


class Catalogue:
    """Items, their lookups and the hard filters over them. Built once per engine; read-only afterwards
    (thread-safe)."""

    def __init__(self, items: dict):
        self.item_ids: list[str] = [str(x) for x in items["ids"]]
        self.titles: list[str] = list(items["titles"])
        # tuples, not lists: tuples of strings leave the garbage collector's books (the first collection
        # untracks them), so 10^5 items add no work to every later full collection of the serving process
        self.item_tags: list[tuple[str, ...]] = [tuple(t) for t in items["tags"]]
        self.tag_names: list[str] = list(items.get("tag_names") or sorted({t for ts in self.item_tags for t in ts}))
        self.num_items = len(self.item_ids)
        # object arrays: a whole batch's results looked up in C loops (ResultBatch.ids / titles / tags)
        self.ids_obj = np.array(self.item_ids, dtype=object)
        self.titles_obj = np.array(self.titles, dtype=object)
        self.tags_obj = np.empty(self.num_items, dtype=object)
        for i, t in enumerate(self.item_tags):     # element-wise: numpy would turn equal-length tuples into 2-D
            self.tags_obj[i] = t
        self.id_to_index = {a: i + 1 for i, a in enumerate(self.item_ids)}
        self.id_index = make_id_index(self.item_ids)
        self.tag_index = {t: i for i, t in enumerate(self.tag_names)}
        tm = np.zeros((self.num_items + 1, max(1, len(self.tag_names))), dtype=bool)
        for i, ts in enumerate(self.item_tags, start=1):
            for t in ts:
                if t in self.tag_index:
                    tm[i, self.tag_index[t]] = True
        self.tag_matrix = tm
        self._full = np.ones(self.num_items + 1, dtype=bool)      # every item allowed (row 0: padding)
        self._full[0] = False
        self._full.flags.writeable = False

    def close(self) -> None:
        if self.id_index is not None:
            self.id_index.close()

    # ---- ids ----------------------------------------------------------------------------------------
    def id_example(self) -> str:
        """What a valid id of this export looks like (for error messages)."""
        ex = ", ".join(repr(a) for a in self.item_ids[:2])
        return f"ids in this export look like {ex}" if ex else "this export has no items"

    def non_string_id(self, x, pos: int, what: str) -> InputError:
        """The error for a history entry that is not a string id (None, bytes, a float, an unknown integer...)."""
        hint = ""
        if isinstance(x, (bytes, bytearray)):
            try:
                text = bytes(x).decode("utf-8")
            except UnicodeDecodeError:
                text = None
            if text is not None and text in self.id_to_index:
                hint = f"; decode bytes ids to str ({text!r} is an id of this export)"
        elif is_integer(x):
            hint = f"; '{int(x)}' is not an id either"
        return InputError(f"{what}: item ids are strings (got {describe_value(x)} at position {pos}){hint}; "
                          f"{self.id_example()}")

    # ---- hard filters -------------------------------------------------------------------------------
    def filter_key(self, f, what: str) -> tuple | None:
        """A hard filter checked into its hashable key ``(include_tags, exclude_tags, exclude_items)`` of
        sorted tuples (None: no filter). Tags are strings (one, or a list/tuple/set of them); item ids are
        strings or integers in an id's decimal form."""
        if f is None:
            return None
        if not isinstance(f, Mapping):
            f = {k: getattr(f, k) for k in FILTER_KEYS if getattr(f, k, None) is not None} \
                if any(hasattr(f, k) for k in FILTER_KEYS) else f
        if not isinstance(f, Mapping):
            raise InputError(f"{what} must be None or a dict with keys {FILTER_KEYS}, got {type(f).__name__}")
        bad = [k for k in f if k not in FILTER_KEYS]
        if bad:
            raise InputError(f"{what} has unknown key(s) {bad}; allowed: {', '.join(FILTER_KEYS)}")
        parts = []
        for key in FILTER_KEYS:
            vals = f.get(key)
            if vals is None:
                vals = ()
            elif isinstance(vals, str):
                vals = (vals,)
            elif isinstance(vals, np.ndarray) and vals.ndim == 1:
                vals = vals.tolist()
            elif not isinstance(vals, (list, tuple, set, frozenset)):
                raise InputError(f"{what}: {key} must be a string or a list of strings, got {describe_value(vals)}")
            if key == "exclude_items":
                bad = [v for v in vals if not isinstance(v, str) and not is_integer(v)]
                if bad:
                    raise InputError(f"{what}: exclude_items: item ids are strings (got {describe_value(bad[0])}); "
                                     f"{self.id_example()}")
                vals = [v if isinstance(v, str) else str(int(v)) for v in vals]
            else:
                bad = [v for v in vals if not isinstance(v, str)]
                if bad:
                    raise InputError(f"{what}: {key}: tags are strings (got {describe_value(bad[0])}); "
                                     f"known tags: {', '.join(self.tag_names)}")
            vals = tuple(sorted(set(vals)))
            if key.endswith("tags"):
                unknown = [v for v in vals if v not in self.tag_index]
                if unknown:
                    raise InputError(f"{what}: unknown tag(s) {unknown}; known tags: {', '.join(self.tag_names)}")
            else:
                unknown = [v for v in vals if v not in self.id_to_index]
                if unknown:
                    raise InputError(f"{what}: unknown item id(s) {unknown[:5]} (not in the export's catalogue; "
                                     f"{self.id_example()})")
            parts.append(vals)
        return tuple(parts) if any(parts) else None

    def filter_keys(self, filters: list, label: str = "request") -> list:
        """The checked filter key of every row; a filter shared by every row is checked once."""
        # the same object on every row (usually None): checked once. None is counted in one C loop; a dict by
        # identity (== on user dicts could compare numpy arrays inside them)
        first = filters[0] if filters else None
        if filters and (filters.count(None) == len(filters) if first is None else all(f is first for f in filters)):
            return [self.filter_key(filters[0], "hard_filter")] * len(filters)
        return [self.filter_key(f, f"{label} {i}: hard_filter") for i, f in enumerate(filters)]

    def mask_for(self, key: tuple) -> np.ndarray:
        """(N + 1,) bool: the items a filter key allows (entry 0, padding, never)."""
        inc, exc, items = key
        m = self._full.copy()
        if inc:
            m &= self.tag_matrix[:, [self.tag_index[t] for t in inc]].any(axis=1)
        if exc:
            m &= ~self.tag_matrix[:, [self.tag_index[t] for t in exc]].any(axis=1)
        if items:
            m[[self.id_to_index[i] for i in items]] = False
        return m

    def allowed_mask(self, keys: list) -> np.ndarray | None:
        """What the retriever takes for a batch's filter keys: None (no filter), one shared (N + 1,) mask when
        every row has the same key, else (B, N + 1) (rows without a filter allow every item)."""
        first = keys[0] if keys else None
        if keys.count(first) == len(keys):             # one shared key (usually None): one C loop, no genexpr
            return None if first is None else self.mask_for(first)
        masks = {key: self.mask_for(key) for key in set(keys) if key}
        return np.stack([masks[key] if key else self._full for key in keys])


def make_id_index(ids: list[str]):
    """The C++ id index (a batch's history ids in one call, cache misses overlapped: ~4.7 -> 1.7 ms for
    21,000 ids on a cold cache), or None (library not built, or ids it cannot hold): the dict then."""
    try:
        from dpr.kernels import id_index
    except Exception:  # noqa: BLE001 - the kernels package is optional at run time
        return None
    if not id_index.library_available():
        return None
    try:
        return id_index.IdIndex(ids)
    except (ValueError, id_index.KernelError) as exc:
        log.info("dpr.engine: item ids mapped by a dict (%s)", exc)
        return None
