"""MovieLens-1M from ``user_sequences.txt`` + ``movies.dat`` (REFERENCE.md section 5).

``user_sequences.txt``: one line per user, ``UserID MovieID MovieID ...`` in chronological order,
space separated, with the *original* MovieLens ids (the same ids as ``movies.dat``). The
``sasrec_id_mapping/`` folder next to it maps SASRec's remapped, >=5-ratings ml-1m (3,416 items) back
to the original ids; this loader does not need it: the sequences already use the original ids and
keep every rating (3,706 distinct movies).

``movies.dat``: ``MovieID::Title (Year)::Genre|Genre``, latin-1. Genres become tags.

The catalogue holds the movies that occur in the sequences (3,706), ordered by numeric MovieID;
``Catalogue.ids`` are the original MovieIDs as strings. Users keep the file's order (by UserID).
The data is never copied into the repository: it is read from ``../shared/data/ml-1m`` or
``$DPR_ML1M_DIR`` (see :func:`find_ml1m_dir`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dpr.data.dataset import Catalogue, Dataset
from dpr.errors import DataError

ML1M_ENV = "DPR_ML1M_DIR"
SEQUENCES_FILE = "user_sequences.txt"
MOVIES_FILE = "movies.dat"
_REL = Path("..") / "shared" / "data" / "ml-1m"


def is_ml1m_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / SEQUENCES_FILE).is_file() and (p / MOVIES_FILE).is_file()


def find_ml1m_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The ml-1m folder: ``data_dir`` if given, else ``$DPR_ML1M_DIR``, else ``../shared/data/ml-1m``
    relative to the current directory or to the repository root (the first that exists)."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get(ML1M_ENV)
    if env:
        p = Path(env)
        if not p.is_dir():
            raise DataError(f"${ML1M_ENV}={env} is not a directory; point it at the folder holding "
                            f"{SEQUENCES_FILE} and {MOVIES_FILE}")
        return p
    repo_root = Path(__file__).resolve().parents[2]
    candidates = [Path.cwd() / _REL, repo_root / _REL]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    raise DataError("MovieLens-1M folder not found; looked in "
                    + ", ".join(str(c) for c in candidates)
                    + f". Set ${ML1M_ENV} or pass data_dir (it must hold {SEQUENCES_FILE} and {MOVIES_FILE})")


def read_movies(path: str | os.PathLike) -> dict[str, tuple[str, list[str]]]:
    """``{MovieID: (title, genres)}`` from a latin-1 ``movies.dat``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected MovieLens movies.dat)")
    movies: dict[str, tuple[str, list[str]]] = {}
    with open(path, encoding="latin-1", newline="") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("::")
            if len(parts) != 3 or not parts[0].strip():
                raise DataError(f"{path}:{lineno}: expected 'MovieID::Title::Genres', got {line[:80]!r}")
            mid, title, genres = parts[0].strip(), parts[1], parts[2]
            if mid in movies:
                raise DataError(f"{path}:{lineno}: duplicate MovieID {mid!r}")
            movies[mid] = (title, [g for g in (s.strip() for s in genres.split("|")) if g])
    return movies


def load_ml1m(data_dir: str | os.PathLike | None = None, name: str = "ml-1m") -> Dataset:
    """Load MovieLens-1M: 6,040 users, 3,706 items, 1,000,209 interactions, 18 genre tags."""
    d = find_ml1m_dir(data_dir)
    if not d.is_dir():
        raise DataError(f"{d}: MovieLens-1M directory not found")
    movies = read_movies(d / MOVIES_FILE)
    seq_path = d / SEQUENCES_FILE
    if not seq_path.is_file():
        raise DataError(f"{seq_path}: file not found (expected 'UserID MovieID MovieID ...' lines)")

    user_ids: list[str] = []
    raw: list[list[str]] = []
    seen_users: set[str] = set()
    with open(seq_path, encoding="latin-1", newline="") as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise DataError(f"{seq_path}:{lineno}: user {parts[0]!r} has no items "
                                "(expected 'UserID MovieID MovieID ...')")
            uid = parts[0]
            if uid in seen_users:
                raise DataError(f"{seq_path}:{lineno}: duplicate UserID {uid!r}")
            seen_users.add(uid)
            for mid in parts[1:]:
                if mid not in movies:
                    raise DataError(f"{seq_path}:{lineno}: MovieID {mid!r} (user {uid}) is not in "
                                    f"{d / MOVIES_FILE}")
            user_ids.append(uid)
            raw.append(parts[1:])

    used = {m for seq in raw for m in seq}
    order = sorted(used, key=lambda m: (0, int(m), m) if m.isdigit() else (1, 0, m))
    index = {m: i for i, m in enumerate(order, start=1)}
    catalogue = Catalogue(ids=order, titles=[movies[m][0] for m in order],
                          tags=[list(movies[m][1]) for m in order])
    sequences = [np.fromiter((index[m] for m in seq), dtype=np.int64, count=len(seq)) for seq in raw]
    return Dataset(name=name, catalogue=catalogue, user_ids=user_ids, sequences=sequences)
