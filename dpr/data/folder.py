"""The generic dataset folder any user can produce (REFERENCE.md section 5).

``items.csv``        header ``item_id,title,tags`` (``title`` and ``tags`` may be absent as columns;
                     tags are ``|``-separated and may be empty). Catalogue order = file order.
``interactions.csv`` header ``user_id,item_id`` and an optional ``timestamp`` column. Without a
                     timestamp, row order is chronological per user; with one, each user's rows are
                     stably sorted by it (numeric). Users keep the order of their first row.

IDs are strings. Files are UTF-8 (a BOM is allowed); a file that is not valid UTF-8 is read as
latin-1 unless ``encoding`` is given. Every problem raises :class:`DataError` naming ``file:line``.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np

from dpr.data.dataset import Catalogue, Dataset
from dpr.errors import DataError

ITEMS_FILE = "items.csv"
INTERACTIONS_FILE = "interactions.csv"
TAG_SEP = "|"


def is_folder_dataset(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / ITEMS_FILE).is_file() and (p / INTERACTIONS_FILE).is_file()


def _read_text(path: Path, encoding: str | None) -> str:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    data = path.read_bytes()
    if encoding is not None:
        try:
            return data.decode(encoding)
        except (UnicodeDecodeError, LookupError) as exc:
            raise DataError(f"{path}: cannot decode as {encoding}: {exc}") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _rows(path: Path, encoding: str | None, required: tuple[str, ...], optional: tuple[str, ...]):
    """Yield ``(line_number, {column: value})`` for each data row, checking the header and widths."""
    reader = csv.reader(io.StringIO(_read_text(path, encoding), newline=""), strict=True)
    try:
        header = next(reader, None)
        while header is not None and not any(h.strip() for h in header):
            header = next(reader, None)
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV: {exc}") from exc
    if header is None:
        raise DataError(f"{path}: empty file; expected a header row {','.join(required + optional)}")
    header = [h.strip().lower() for h in header]
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path}:{reader.line_num}: header {','.join(header)!r} lacks column(s) "
                        f"{', '.join(missing)}; expected {','.join(required)}[,{','.join(optional)}]")
    cols = {c: header.index(c) for c in required + optional if c in header}
    width = len(header)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV: {exc}") from exc
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != width:
            raise DataError(f"{path}:{reader.line_num}: expected {width} fields ({','.join(header)}), "
                            f"got {len(row)}: {row!r}")
        yield reader.line_num, {c: row[i] for c, i in cols.items()}


def read_items(path: str | os.PathLike, encoding: str | None = None) -> Catalogue:
    path = Path(path)
    ids: list[str] = []
    titles: list[str] = []
    tags: list[list[str]] = []
    seen: set[str] = set()
    for lineno, row in _rows(path, encoding, ("item_id",), ("title", "tags")):
        item_id = row["item_id"].strip()
        if not item_id:
            raise DataError(f"{path}:{lineno}: empty item_id")
        if item_id in seen:
            raise DataError(f"{path}:{lineno}: duplicate item_id {item_id!r}")
        seen.add(item_id)
        ids.append(item_id)
        titles.append(row.get("title", item_id).strip() or item_id)
        item_tags: list[str] = []
        for t in row.get("tags", "").split(TAG_SEP):
            t = t.strip()
            if t and t not in item_tags:
                item_tags.append(t)
        tags.append(item_tags)
    if not ids:
        raise DataError(f"{path}: no items")
    return Catalogue(ids=ids, titles=titles, tags=tags)


def load_folder(path: str | os.PathLike, name: str | None = None, unknown_items: str = "error",
                encoding: str | None = None) -> Dataset:
    """Load ``items.csv`` + ``interactions.csv`` from ``path``.

    ``unknown_items``: ``"error"`` (default) raises on an interaction whose item is not in items.csv;
    ``"skip"`` drops such rows (a user left with no rows is dropped).
    """
    if unknown_items not in ("error", "skip"):
        raise ValueError(f"unknown_items must be 'error' or 'skip', got {unknown_items!r}")
    d = Path(path)
    if not d.is_dir():
        raise DataError(f"{d}: dataset folder not found (expected {ITEMS_FILE} and {INTERACTIONS_FILE})")
    catalogue = read_items(d / ITEMS_FILE, encoding)
    index = catalogue.id_to_index
    inter_path = d / INTERACTIONS_FILE

    users: dict[str, tuple[list[int], list[float]]] = {}
    has_ts = None
    for lineno, row in _rows(inter_path, encoding, ("user_id", "item_id"), ("timestamp",)):
        if has_ts is None:
            has_ts = "timestamp" in row
        uid, iid = row["user_id"].strip(), row["item_id"].strip()
        if not uid or not iid:
            raise DataError(f"{inter_path}:{lineno}: empty user_id or item_id")
        item = index.get(iid)
        if item is None:
            if unknown_items == "skip":
                continue
            raise DataError(f"{inter_path}:{lineno}: item_id {iid!r} is not in {d / ITEMS_FILE} "
                            "(pass unknown_items='skip' to drop such rows)")
        ts = 0.0
        if has_ts:
            raw = row["timestamp"].strip()
            try:
                ts = float(raw)
            except ValueError:
                raise DataError(f"{inter_path}:{lineno}: timestamp {raw!r} is not a number") from None
            if ts != ts:  # NaN would make the order undefined
                raise DataError(f"{inter_path}:{lineno}: timestamp is NaN")
        items, times = users.setdefault(uid, ([], []))
        items.append(item)
        times.append(ts)
    if not users:
        raise DataError(f"{inter_path}: no interactions")

    sequences = []
    for items, times in users.values():
        seq = np.asarray(items, dtype=np.int64)
        if has_ts:
            seq = seq[np.argsort(np.asarray(times), kind="stable")]
        sequences.append(seq)
    return Dataset(name=name or d.resolve().name, catalogue=catalogue, user_ids=list(users),
                   sequences=sequences)


def write_folder(dataset: Dataset, path: str | os.PathLike) -> Path:
    """Write ``dataset`` in the generic folder format (UTF-8, no timestamps: row order is chronological)."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    cat = dataset.catalogue
    with open(d / ITEMS_FILE, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "title", "tags"])
        for i, t, ts in zip(cat.ids, cat.titles, cat.tags):
            w.writerow([i, t, TAG_SEP.join(ts)])
    with open(d / INTERACTIONS_FILE, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id"])
        for uid, seq in zip(dataset.user_ids, dataset.sequences):
            for item in seq.tolist():
                w.writerow([uid, cat.ids[item - 1]])
    return d
