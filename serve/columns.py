"""One front-end call's rows as columns (:class:`Part`), merged into one ``RequestBatch`` per engine call.

Every front end (``/recommend``, the v2 infer route, Triton) turns what it received into Parts; the batcher
concatenates the Parts that wait together and calls ``Engine.recommend_batch`` once, then hands each Part
its slice of the ``ResultBatch``. ``RequestBatch`` holds one ``k`` and one ``exclude_history`` for the
whole batch, so a Part has one of each and Parts are merged by that pair (a call mixing k values is split
into one Part per value by :func:`split_rows`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from dpr.engine import RequestBatch, ResultBatch
from dpr.errors import InputError


class LimitError(InputError):
    """A request is over one of the service's limits (``status`` is 413 or 422)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass
class Part:
    flat: list                    # every row's history ids, concatenated (oldest first within a row)
    lens: list[int]               # ids per row
    prompts: list | None          # str | None per row, or None: no row has one
    negatives: list | None
    k: int
    exclude_history: bool = True
    filters: list | None = None   # dict | None per row, or None
    form: str = "ids"             # "indices": ``flat`` is an int64 array of catalogue indices (1..N), mapped already
    # the engine whose catalogue the indices were mapped against, when another may run the Part (the HTTP service
    # swaps engines on a reload while Parts queue): run_parts maps such a Part's ids again (None: the running one)
    origin: object = None

    def __len__(self) -> int:
        return len(self.lens)

    @property
    def key(self) -> tuple:
        return (self.k, self.exclude_history, self.form)


def _column(parts: Sequence[Part], name: str) -> list | None:
    cols = [getattr(p, name) for p in parts]
    if all(c is None for c in cols):
        return None
    out: list = []
    for p, c in zip(parts, cols):
        out.extend(c if c is not None else [None] * len(p))
    return out


def join(parts: Sequence[Part]) -> Part:
    """Parts of one key (and one ``origin``) as one Part (plain list or array concatenation: no per-row objects):
    the batching front hands the calls of one event-loop turn to the batcher as one, and :func:`merge` builds an
    engine batch from it."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if first.form == "indices":              # Parts of one key share a form (it is part of the key)
        flat = np.concatenate([np.asarray(p.flat, np.int64) for p in parts])
    else:
        flat = []
        for p in parts:
            flat.extend(p.flat)
    lens: list = []
    for p in parts:
        lens.extend(p.lens)
    return Part(flat, lens, _column(parts, "prompts"), _column(parts, "negatives"), first.k, first.exclude_history,
                _column(parts, "filters"), first.form, first.origin)


def merge(parts: Sequence[Part]) -> RequestBatch:
    """Parts of one (k, exclude_history) as one RequestBatch."""
    p = join(parts)
    offsets = np.zeros(len(p.lens) + 1, np.int64)
    np.cumsum(p.lens, out=offsets[1:])
    flat, make = p.flat, RequestBatch.from_ids
    if p.form == "indices":
        flat, make = np.asarray(p.flat, np.int64), RequestBatch.from_indices
    return make(flat, offsets, prompts=p.prompts, negative_prompts=p.negatives, k=p.k,
                exclude_history=p.exclude_history, hard_filter=p.filters)


def slice_result(res: ResultBatch, start: int, stop: int) -> ResultBatch:
    """Rows ``start:stop`` of a ResultBatch (views; ids/titles/tags still looked up lazily)."""
    if start == 0 and stop == len(res):
        return res
    extra = {}
    if getattr(res, "ks", None) is not None:         # a per-row k column (newer engines)
        extra["ks"] = res.ks[start:stop]
    return dataclasses.replace(res, indices=res.indices[start:stop], scores=res.scores[start:stop],
                               counts=res.counts[start:stop], short_reasons=res.short_reasons[start:stop], **extra)


_ROW = re.compile(r"\brow (\d+)(?=:)")


def relabel_rows(message: str, rows: Sequence[int], label=None) -> str:
    """An engine error about "row j" of a Part's batch, said of the call's own row ``rows[j]`` (worded by
    ``label(row)``, default "row N"): a Part holds some of a call's rows, so the engine's row number is not the
    caller's. A message that names no row is about a value all the Part's rows share: said of its first row."""
    name = label if label is not None else (lambda r: f"row {r}")

    def sub(m):
        j = int(m[1])
        return name(rows[j]) if j < len(rows) else m[0]
    out, n = _ROW.subn(sub, message, count=1)
    if n == 0 and rows:          # a value every row of the Part shares (the engine then names no row): the first
        out = f"{name(rows[0])}: {message}"
    return out


def split_rows(rows_k: Sequence[int], rows_excl: Sequence[bool]) -> list[tuple[tuple, list[int]]]:
    """Row positions grouped by (k, exclude_history), in first-seen order (usually one group)."""
    groups: dict = {}
    for i, key in enumerate(zip(rows_k, rows_excl)):
        groups.setdefault(key, []).append(i)
    return list(groups.items())


class IdCheck:
    """The catalogue's ids as a set, so a call with an unknown id is refused before it joins a batch (one bad
    call must not fail its batch-mates; the engine checks again and stays the authority)."""

    def __init__(self, engine, unknown_items: str):
        self.ids = frozenset(engine.item_ids) if unknown_items == "error" else None
        self.example = ", ".join(repr(a) for a in engine.item_ids[:2])

    def check(self, flat: list, lens: list[int], label) -> None:
        if self.ids is None or self.ids.issuperset(flat):
            return
        start = 0
        for row, n in enumerate(lens):
            for pos, x in enumerate(flat[start:start + n]):
                if x not in self.ids:
                    raise InputError(f"{label(row)}: history holds unknown item id {x!r} at position {pos} "
                                     f"(not in the export's catalogue; ids in this export look like {self.example})")
            start += n


def check_limits(lens: list[int], prompts, negatives, k: int, cfg, label) -> None:
    """The service's limits on one call, each refusal naming the limit and its flag."""
    if len(lens) > cfg.max_requests_per_call:
        raise LimitError(f"{len(lens)} requests in one call; the limit is {cfg.max_requests_per_call} "
                         f"(--max-requests-per-call)", 413)
    for row, n in enumerate(lens):
        if n > cfg.max_history:
            raise LimitError(f"{label(row)}: history has {n} item ids; the limit is {cfg.max_history} (--max-history)")
        if n == 0:
            raise InputError(f"{label(row)}: history is empty (at least one item id is needed)")
    if k > cfg.max_k:       # one k for all the rows given: said of the first (a list names its request)
        raise LimitError(f"{label(0)}: k={k} is over the limit of {cfg.max_k} (--max-k)")
    for col, what in ((prompts, "prompt"), (negatives, "negative prompt")):
        for row, p in enumerate(col or ()):
            if p is None:
                continue
            if not p.strip():
                raise InputError(f"{label(row)}: {what} is empty or whitespace only (send null for no prompt)")
            if len(p) * 4 > cfg.max_prompt_bytes:     # cheap bound first, exact only near it
                nb = len(p.encode("utf-8", "surrogatepass"))
                if nb > cfg.max_prompt_bytes:
                    raise LimitError(f"{label(row)}: {what} is {nb} bytes; the limit is {cfg.max_prompt_bytes} "
                                     f"(--max-prompt-bytes)")


def rows_within_limits(lens: np.ndarray, k: int, cfg) -> bool:
    """:func:`check_limits` on a call's columns, but for its prompts: rows per call, no empty history, none over the
    history limit, k in 1..max_k (True: within every one)."""
    return (len(lens) <= cfg.max_requests_per_call and bool(lens.all()) and int(lens.max()) <= cfg.max_history
            and 1 <= k <= cfg.max_k)


def prompt_texts(raw: list, max_bytes: int) -> list | bool | None:
    """A prompt column's elements (bytes, ``b""`` for none) as str-or-None per row, None when no row has one, or
    False when one is not UTF-8, blank, or over ``max_bytes`` (:func:`check_limits` words that refusal)."""
    if max(map(len, raw), default=0) > max_bytes:
        return False
    try:                        # one decode for the column; a NUL inside a prompt splits it: decoded one by one
        out = b"\0".join(raw).decode("utf-8").split("\0")
        if len(out) != len(raw):
            out = [x.decode("utf-8") for x in raw]
    except UnicodeDecodeError:
        return False
    if not any(out):
        return None
    if any(map(str.isspace, out)):          # blank ("" is no prompt: isspace is False for it)
        return False
    return [x or None for x in out]


def one_k_part(flat: np.ndarray, lens: np.ndarray, k: int, exclude_history: bool, prompts: list | None,
               negatives: list | None, cfg, origin=None) -> Part | None:
    """A call whose rows share one k and exclude_history, already in catalogue indices (``flat`` 1..N, ``lens``
    per row), as one Part, with every limit of :func:`check_limits` checked on the columns; ``prompts`` /
    ``negatives``: each row's prompt bytes (``b""``: none), or None. None when a limit is crossed or a prompt is not
    UTF-8: the caller's checked path then words the refusal (the native Triton backend's and the v2 route's
    binary-tensor fast paths; ``body_columns.read`` checks ``/recommend`` bodies the same way)."""
    if not rows_within_limits(lens, k, cfg):
        return None
    texts = []
    for raw in (prompts, negatives):
        texts.append(None if raw is None else prompt_texts(raw, cfg.max_prompt_bytes))
        if texts[-1] is False:
            return None
    return Part(flat, lens, texts[0], texts[1], int(k), bool(exclude_history), None, form="indices", origin=origin)


def rebase(part: Part, engine) -> Part:
    """``part`` for ``engine``: as it is, or, when its indices were mapped against another engine's catalogue
    (``origin``: a reload swapped engines while it queued), as that catalogue's ids, which ``engine`` maps (and
    refuses by name when its catalogue lacks one)."""
    if part.origin is None or part.origin is engine or part.form != "indices":
        return part
    ids = np.asarray(part.origin.item_ids, dtype=object)[np.asarray(part.flat, np.int64) - 1].tolist()
    return dataclasses.replace(part, flat=ids, form="ids", origin=None)


def run_parts(engine, parts: Sequence[Part]) -> list:
    """Every Part's ResultBatch (or the exception it raised), with one ``recommend_batch`` call per
    (k, exclude_history) group. A failing group is re-run Part by Part so only the culprit fails."""
    parts = [rebase(p, engine) for p in parts]
    out: list = [None] * len(parts)
    groups: dict = {}
    for i, p in enumerate(parts):
        groups.setdefault(p.key, []).append(i)
    for idx in groups.values():
        members = [parts[i] for i in idx]
        try:
            res = engine.recommend_batch(merge(members))
        except Exception as exc:  # noqa: BLE001 - isolate the culprit
            if len(idx) == 1:
                out[idx[0]] = exc
                continue
            _isolate(engine, parts, idx, exc, out)
            continue
        _slice_into(out, res, idx, members)
    return out


def _slice_into(out: list, res: ResultBatch, idx: Sequence[int], members: Sequence[Part]) -> None:
    start = 0
    for i, p in zip(idx, members):
        out[i] = slice_result(res, start, start + len(p))
        start += len(p)


def _isolate(engine, parts: Sequence[Part], idx: list, exc: Exception, out: list) -> None:
    """A merged batch failed: give each culprit its own error and the others their answers. For a bad input (an
    unknown item id: the services leave that check to the engine) the Parts are checked one by one without
    running any model (the engine's own check, ``checker.columns_from_batch``), and the good ones run again as
    one batch: two engine calls, whatever the number of Parts, so one bad call cannot make its batch-mates cost
    a call each. Anything else (or a check that finds no culprit): each Part alone, as before."""
    rest = idx
    checker = getattr(engine, "checker", None)
    if isinstance(exc, InputError) and checker is not None:
        rest = []
        for i in idx:
            try:
                checker.columns_from_batch(merge([parts[i]]))
            except InputError as e:
                out[i] = e
            else:
                rest.append(i)
        if rest and len(rest) < len(idx):
            members = [parts[i] for i in rest]
            try:
                _slice_into(out, engine.recommend_batch(merge(members)), rest, members)
                return
            except Exception:  # noqa: BLE001 - not what the check found: each Part alone
                pass
    for i in rest:
        try:
            out[i] = engine.recommend_batch(merge([parts[i]]))
        except Exception as e:  # noqa: BLE001
            out[i] = e
