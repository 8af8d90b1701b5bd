"""Request validation and id mapping: whatever an entry point receives, checked into :class:`Columns`.

Three inputs, one output:

* ``columns_from_lists``: what ``Engine.recommend`` takes (lists of histories of item ids, prompt lists,
  options); errors name the request ("request 3: history: ...");
* ``columns_from_batch``: a :class:`~dpr.engine.batch.RequestBatch` (flat ids or catalogue indices plus
  offsets, prompt columns); errors name the row ("row 3: ...");
* ``row``: one request (a :class:`Request` or a dict), what the dynamic batcher checks on ``submit``.

Checks run column by column, vectorised where the check allows: every history id of a batch is mapped in one
call (the C++ id index, else one C-level dict map); only a batch holding something to report goes row by row,
so that the message names the row. Options are type-checked, never coerced: ``exclude_history="yes"``,
``k=2.0`` or ``k=True`` are errors naming the field (and the row, for per-row columns).
"""

from __future__ import annotations

from collections.abc import Mapping, Set as AbstractSet, ValuesView
from itertools import chain
from typing import Sequence

import numpy as np

from dpr.errors import InputError

from .batch import ID_FORMS, RequestBatch
from .catalogue import Catalogue, describe_value, is_filter, is_integer, short_repr
from .columns import Columns, Request, Row, flatten, offsets_of


def _is_column(x) -> bool:
    """A per-row column (list, tuple or 1-D array), as opposed to one value for the whole batch."""
    return isinstance(x, (list, tuple)) or (isinstance(x, np.ndarray) and x.ndim >= 1)


# History containers the batch fast path maps as they are; any other container takes the checked path.
_FAST_ROW_TYPES = frozenset((list, tuple, np.ndarray))


def _unordered(x) -> bool:
    """A container with no order (a set, a dict or one of its views): refused as a history, since the model reads
    the most recent items and a set's iteration order is its hash order. Other sized iterables are read in their
    own order, as before."""
    return isinstance(x, (AbstractSet, Mapping, ValuesView))


_CLEAN_PROMPTS = 65_536       # at most this many remembered clean prompts (about 5 MB of short strings)


class RequestChecker:
    """Checks requests against a catalogue. ``unknown_items``: ``"error"`` or ``"ignore"`` (history entries
    that are not ids of the catalogue are skipped)."""

    def __init__(self, catalogue: Catalogue, max_prompt_bytes: int, unknown_items: str = "error"):
        if unknown_items not in ("error", "ignore"):
            raise InputError(f"unknown_items must be 'error' or 'ignore', got {unknown_items!r}")
        self.catalogue = catalogue
        self.num_items = catalogue.num_items
        self.max_prompt_bytes = int(max_prompt_bytes)
        self.unknown_items = unknown_items
        # prompts already checked and found clean (a str within the byte limit, nothing to strip): template
        # prompts repeat across batches, and a set lookup is cheaper than encoding each again. Bounded.
        self._clean: set[str] = set()

    # ---- options --------------------------------------------------------------------------------------
    def check_k(self, k, what: str = "k") -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise InputError(f"{what} must be an integer, got {k!r}")
        if k < 1:
            raise InputError(f"{what} must be >= 1, got {k}")
        if k > self.num_items:
            raise InputError(f"{what}={k} is larger than the catalogue ({self.num_items} items)")
        return int(k)

    def k_column(self, k, b: int, label: str) -> np.ndarray:
        """(B,) int64 from one ``k`` for the batch or a per-row column of integers."""
        if not _is_column(k):
            return np.full(b, self.check_k(k), np.int64)
        if len(k) != b:
            raise InputError(f"k has {len(k)} entries but the batch has {b} rows (one k per row, or one int)")
        if isinstance(k, np.ndarray) and k.ndim == 1 and k.dtype.kind in "iu":
            bad = np.flatnonzero((k < 1) | (k > self.num_items))
            if bad.size:
                i = int(bad[0])
                self.check_k(k[i], f"{label} {i}: k")
            return k.astype(np.int64)
        # a list (numpy would turn True into 1 and 2.0 into an integer): each entry checked as it is
        return np.array([self.check_k(v, f"{label} {i}: k") for i, v in enumerate(k)], dtype=np.int64)

    @staticmethod
    def exclude_history_column(x, b: int, label: str) -> np.ndarray:
        """(B,) bool from one bool for the batch or a per-row column of bools (True or False, never 1,
        "yes" or None: a None would silently turn the exclusion off)."""
        if isinstance(x, (bool, np.bool_)):
            return np.full(b, bool(x))
        if not _is_column(x):
            raise InputError(f"exclude_history must be a bool (True or False) or a column of {b} bools, "
                             f"got {describe_value(x)}")
        if len(x) != b:
            raise InputError(f"exclude_history has {len(x)} entries but the batch has {b} rows (lengths must match)")
        if isinstance(x, np.ndarray):
            if x.ndim == 1 and x.dtype == np.bool_:
                return x.copy()
            if x.ndim != 1:
                raise InputError(f"exclude_history must be a 1-D column of {b} bools, got shape {x.shape}")
        for i, v in enumerate(x):
            if not isinstance(v, (bool, np.bool_)):
                raise InputError(f"{label} {i}: exclude_history must be a bool (True or False), got {describe_value(v)}")
        return np.array(x, dtype=bool)

    # ---- prompts --------------------------------------------------------------------------------------
    def check_prompt(self, p, what: str) -> str | None:
        if p is None:
            return None
        if isinstance(p, (bytes, bytearray)):
            try:
                p = bytes(p).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"{what} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        if not isinstance(p, str):
            raise InputError(f"{what} must be a string or None, got {type(p).__name__}")
        try:
            n = len(p.encode("utf-8"))
        except UnicodeEncodeError:
            raise InputError(f"{what} holds characters that cannot be encoded as UTF-8 (lone surrogates)") from None
        if n > self.max_prompt_bytes:
            raise InputError(f"{what} is too long ({n} bytes; the limit is {self.max_prompt_bytes})")
        s = p.strip()
        if not s:
            raise InputError(f"{what} is empty or whitespace only (pass None for no prompt)")
        return s

    def check_prompt_column(self, column: list, what: str, label: str = "request") -> list:
        """Each distinct prompt checked once (template prompts repeat). A column whose distinct prompts are
        all clean strings (or None) comes back as it is: no per-row work."""
        try:
            distinct = dict.fromkeys(column)
        except TypeError:                          # an unhashable entry: the row-by-row loop names it
            distinct = None
        if distinct is not None and not all(type(p) is str or p is None for p in distinct):
            distinct = None
        if distinct is not None:
            changed = {}
            clean = self._clean
            for p in distinct:
                if p is not None and p not in clean:
                    try:
                        v = self.check_prompt(p, what)
                    except InputError:
                        distinct = None            # the row-by-row loop below names the row
                        break
                    if v is not p:
                        changed[p] = v
                    elif len(clean) < _CLEAN_PROMPTS:
                        clean.add(p)
            if distinct is not None:
                return list(column) if not changed else [changed.get(p, p) if p is not None else None for p in column]
        checked: dict[str, str | None] = {}
        out = []
        for i, p in enumerate(column):
            if p is None:
                out.append(None)
                continue
            if type(p) is str:
                v = checked.get(p, checked)
                if v is not checked:
                    out.append(v)
                    continue
            v = self.check_prompt(p, f"{label} {i}: {what}")
            if type(p) is str:
                checked[p] = v
            out.append(v)
        return out

    # ---- histories ------------------------------------------------------------------------------------
    def history_indices(self, history, what: str) -> np.ndarray:
        """One history of item ids -> int64 catalogue indices (chronological), checked."""
        if history is None or isinstance(history, (str, bytes)) or not hasattr(history, "__len__"):
            raise InputError(f"{what} must be a list of item ids, got {type(history).__name__}")
        if _unordered(history):
            raise InputError(f"{what} must be an ordered list of item ids (oldest first), got a "
                             f"{type(history).__name__}, which has no order")
        if len(history) == 0:
            raise InputError(f"{what} is empty (at least one item id is needed)")
        cat = self.catalogue
        get = cat.id_to_index.get
        try:
            fast = [get(x) for x in history]            # ids given as strings, all known: one dict lookup each
        except TypeError:                               # an unhashable entry: the checked loop names it
            fast = [None]
        if None not in fast:
            return np.asarray(fast, dtype=np.int64)
        out = []
        ignore = self.unknown_items == "ignore"
        for pos, x in enumerate(history):
            if isinstance(x, str):
                idx = cat.id_to_index.get(x)
                if idx is None and not ignore:
                    raise InputError(f"{what} holds unknown item id {short_repr(x)} at position {pos} (not in "
                                     f"the export's catalogue; {cat.id_example()})")
            else:       # not a string: an integer whose decimal form is an id (ML-1M's 1193), else refused
                idx = cat.id_to_index.get(str(int(x))) if is_integer(x) else None
                if idx is None and not ignore:
                    raise cat.non_string_id(x, pos, what)
            if idx is not None:
                out.append(idx)
        if not out:
            raise InputError(f"{what} holds no known item id (all ignored as unknown)")
        return np.asarray(out, dtype=np.int64)

    def _map_histories(self, histories) -> tuple[np.ndarray, list[int]] | None:
        """Every history mapped in one pass (the C++ id index, else one C-level dict map over all ids):
        ``(flat indices, row lengths)``, the fast path when every id of every row is known. None sends the
        batch to the per-row checks, which name the problem."""
        try:
            if not _FAST_ROW_TYPES.issuperset(map(type, histories)):    # str, set...: the checked path
                return None
            lens = list(map(len, histories))
            if 0 in lens:
                return None
            flat = None
            index = self.catalogue.id_index
            if index is not None:
                flat = index.lookup(chain.from_iterable(histories), sum(lens))
                if flat is not None and not flat.all():
                    return None                # an unknown id
            if flat is None:                   # no index, or ids it cannot take (not strings, a NUL inside)
                got = list(map(self.catalogue.id_to_index.get, chain.from_iterable(histories)))
                if None in got:
                    return None
                flat = np.array(got, dtype=np.int64)
        except TypeError:                      # an unsized history or an unhashable id
            return None
        return flat, lens

    def _map_flat_ids(self, flat, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Item ids -> catalogue indices for a whole flat array in one call (the C++ id index, else a dict); an
        unknown or non-string id sends the rows to the per-row checks (same rules as ``recommend``: integers
        in an id's decimal form, ``unknown_items="ignore"``), which name the row."""
        ids = flat.tolist() if isinstance(flat, np.ndarray) else list(flat)
        n = len(ids)
        got = None
        index = self.catalogue.id_index
        try:
            if index is not None:
                got = index.lookup(ids, n)
                if got is not None and not got.all():
                    got = None
            elif all(type(x) is str for x in ids):
                m = list(map(self.catalogue.id_to_index.get, ids))
                got = None if None in m else np.array(m, dtype=np.int64)
        except TypeError:
            got = None
        if got is not None:
            return got, offsets
        o = offsets.tolist()
        return flatten([self.history_indices(ids[o[i]:o[i + 1]], f"row {i}: history") for i in range(len(o) - 1)])

    @staticmethod
    def row_of(offsets: np.ndarray, pos: int) -> int:
        """The row holding flat position ``pos``."""
        return int(np.searchsorted(offsets, pos, side="right")) - 1

    @staticmethod
    def check_offsets(offsets, n: int) -> np.ndarray:
        """(B + 1,) int64 row offsets: integers, from 0 to ``n`` (the flat array's length), no row empty."""
        if offsets is None or isinstance(offsets, (str, bytes)) or not hasattr(offsets, "__len__"):
            raise InputError(f"offsets must be an int64 array of B + 1 row offsets, got {type(offsets).__name__}")
        a = offsets if isinstance(offsets, np.ndarray) else np.asarray(offsets)
        if a.dtype.kind not in "iu":
            raise InputError(f"offsets must be integers (int64), got dtype {a.dtype}")
        if a.ndim != 1:
            raise InputError(f"offsets must be 1-D (B + 1 entries), got shape {a.shape}")
        if len(a) < 2:
            raise InputError(f"offsets has {len(a)} entries: it needs B + 1 >= 2 (at least one row)")
        if a.dtype.kind == "u" and a.max() > np.iinfo(np.int64).max:
            raise InputError(f"offsets hold values past int64 ({int(a.max())})")
        a = a.astype(np.int64, copy=False)
        if a[0] != 0:
            raise InputError(f"offsets[0] must be 0, got {int(a[0])}")
        d = np.diff(a)
        if not (d > 0).all():
            bad = np.flatnonzero(d < 0)
            if bad.size:
                i = int(bad[0])
                raise InputError(f"row {i}: offsets are not monotonic (offsets[{i}]={int(a[i])} > "
                                 f"offsets[{i + 1}]={int(a[i + 1])})")
        if a[-1] != n:
            raise InputError(f"offsets[-1] is {int(a[-1])} but the flat history array has {n} entries "
                             f"(they must be equal; offsets has {len(a)} entries for {len(a) - 1} rows)")
        empty = np.flatnonzero(d == 0)
        if empty.size:
            i = int(empty[0])
            raise InputError(f"row {i}: history is empty (offsets[{i}] == offsets[{i + 1}] == {int(a[i])}; "
                             f"at least one item is needed)")
        return a

    def check_flat_indices(self, flat, offsets: np.ndarray) -> np.ndarray:
        """Catalogue indices: integers (not bools, not floats) in 1..N."""
        f = flat if isinstance(flat, np.ndarray) else np.asarray(flat)
        if f.dtype.kind not in "iu":
            if f.dtype.kind == "O":            # name the first entry that is not an integer
                for p, x in enumerate(f.tolist()):
                    if not is_integer(x):
                        r = self.row_of(offsets, p)
                        raise InputError(f"row {r}: history: catalogue indices are integers 1..{self.num_items} "
                                         f"(got {describe_value(x)} at position {p - int(offsets[r])})")
            else:
                raise InputError(f"catalogue indices must be integers 1..{self.num_items}, got dtype {f.dtype}"
                                 f"{' (use RequestBatch.from_ids for item ids)' if f.dtype.kind in 'USO' else ''}")
            try:
                f = f.astype(np.int64)
            except OverflowError:
                raise InputError(f"catalogue indices must be integers 1..{self.num_items}") from None
        if f.ndim != 1:
            raise InputError(f"the flat history array must be 1-D, got shape {f.shape}")
        if f.size and (int(f.min()) < 1 or int(f.max()) > self.num_items):
            bad = np.flatnonzero((f < 1) | (f > self.num_items))
            p = int(bad[0])
            r = self.row_of(offsets, p)
            raise InputError(f"row {r}: history: catalogue index {int(f[p])} at position {p - int(offsets[r])} "
                             f"is out of range (indices run 1..{self.num_items}; 0 is padding)")
        return np.ascontiguousarray(f, dtype=np.int64)

    # ---- whole inputs ---------------------------------------------------------------------------------
    def columns_from_lists(self, histories, prompts, negative_prompts, k, exclude_history, hard_filter) -> Columns:
        """``Engine.recommend``'s arguments checked into columns; errors name the request."""
        if isinstance(histories, (str, bytes)) or not isinstance(histories, Sequence) and not isinstance(
                histories, np.ndarray):
            raise InputError(f"histories must be a list of histories (lists of item ids), got {type(histories).__name__}")
        b = len(histories)
        if b == 0:
            raise InputError("histories is empty: no request to serve")

        def per_row(x, name):
            if x is None:
                return [None] * b
            if isinstance(x, (str, bytes)):
                raise InputError(f"{name} must be a list (one entry per history), not a single string")
            if not isinstance(x, (Sequence, np.ndarray)):
                raise InputError(f"{name} must be a list of length {b}, got {type(x).__name__}")
            if len(x) != b:
                raise InputError(f"{name} has {len(x)} entries but there are {b} histories (lengths must match)")
            return x.tolist() if isinstance(x, np.ndarray) else list(x)

        pos = per_row(prompts, "prompts")
        neg = per_row(negative_prompts, "negative_prompts")
        filters = self._filter_column(hard_filter, b, per_row)
        excl = self.exclude_history_column(exclude_history, b, "request")
        ks = self.k_column(k, b, "request")
        mapped = self._map_histories(histories)
        if mapped is None:                     # something to report or skip: row by row, naming the request
            flat, offsets = flatten([self.history_indices(histories[i], f"request {i}: history") for i in range(b)])
        else:
            flat, offsets = mapped[0], offsets_of(mapped[1])
        pos = self.check_prompt_column(pos, "prompt")
        neg = self.check_prompt_column(neg, "negative prompt")
        fkeys = self.catalogue.filter_keys(filters)
        return Columns(flat, offsets, pos, neg, ks, excl, fkeys)

    def columns_from_batch(self, rb) -> Columns:
        """A RequestBatch checked as a whole: offsets, the flat history array (ids mapped, or indices
        range-checked), prompt columns, k, exclude_history, hard filter; errors name the row."""
        if not isinstance(rb, RequestBatch):
            raise InputError(f"recommend_batch takes a RequestBatch, got {type(rb).__name__} "
                             f"(lists of histories go to recommend())")
        if not isinstance(rb.form, str) or rb.form not in ID_FORMS:
            raise InputError(f"RequestBatch.form must be one of {ID_FORMS}, got {rb.form!r}")
        flat = rb.flat
        if flat is None or isinstance(flat, (str, bytes)) or not hasattr(flat, "__len__"):
            raise InputError(f"the flat history array must be an array or list of {rb.form}, "
                             f"got {type(flat).__name__}")
        if _unordered(flat):
            raise InputError(f"the flat history array must be an ordered array or list of {rb.form} (oldest "
                             f"first in each row), got a {type(flat).__name__}, which has no order")
        if isinstance(flat, np.ndarray) and flat.ndim != 1:
            raise InputError(f"the flat history array must be 1-D, got shape {flat.shape}")
        offsets = self.check_offsets(rb.offsets, len(flat))
        b = len(offsets) - 1
        if rb.form == "indices":
            flat = self.check_flat_indices(flat, offsets)
        else:
            flat, offsets = self._map_flat_ids(flat, offsets)

        def per_row(x, name):
            if x is None:
                return [None] * b
            if isinstance(x, (str, bytes)) or not isinstance(x, (Sequence, np.ndarray)):
                raise InputError(f"{name} must be None or a column of {b} entries (one per row), "
                                 f"got {type(x).__name__}")
            if isinstance(x, np.ndarray) and x.ndim != 1:
                raise InputError(f"{name} must be a 1-D column of {b} entries, got shape {x.shape}")
            if len(x) != b:
                raise InputError(f"{name} has {len(x)} entries but the batch has {b} rows (lengths must match)")
            return x.tolist() if isinstance(x, np.ndarray) else list(x)

        pos = self.check_prompt_column(per_row(rb.prompts, "prompts"), "prompt", "row")
        neg = self.check_prompt_column(per_row(rb.negative_prompts, "negative_prompts"), "negative prompt", "row")
        ks = self.k_column(rb.k, b, "row")
        excl = self.exclude_history_column(rb.exclude_history, b, "row")
        fkeys = self.catalogue.filter_keys(self._filter_column(rb.hard_filter, b, per_row), "row")
        return Columns(flat, offsets, pos, neg, ks, excl, fkeys)

    @staticmethod
    def _filter_column(hard_filter, b: int, per_row) -> list:
        """None, one filter for every row, or a per-row sequence (``per_row`` checks its length) -> (B,) list."""
        if hard_filter is None or is_filter(hard_filter):
            return [hard_filter] * b
        return per_row(hard_filter, "hard_filter")

    def row(self, req, what: str = "request") -> Row:
        """Check one request (a :class:`Request` or a dict of its fields); raises InputError naming the problem."""
        if isinstance(req, Mapping):
            bad = [k for k in req if k not in Request.__dataclass_fields__]
            if bad:
                raise InputError(f"{what} has unknown field(s) {bad}")
            if "history" not in req:
                raise InputError(f"{what} has no 'history'")
            req = Request(**req)
        elif not isinstance(req, Request):
            raise InputError(f"{what} must be a Request or a dict, got {type(req).__name__}")
        if not isinstance(req.exclude_history, (bool, np.bool_)):
            raise InputError(f"{what}: exclude_history must be a bool (True or False), "
                             f"got {describe_value(req.exclude_history)}")
        return Row(self.history_indices(req.history, f"{what}: history"),
                   self.check_prompt(req.prompt, f"{what}: prompt"),
                   self.check_prompt(req.negative_prompt, f"{what}: negative prompt"),
                   self.check_k(req.k, f"{what}: k"), bool(req.exclude_history),
                   self.catalogue.filter_key(req.hard_filter, f"{what}: hard_filter"))
