"""Datasets (ml-1m, generic folder, synthetic), leave-one-out splits, prompts and steering cases."""

from __future__ import annotations

import os
from pathlib import Path

from dpr.data.cases import (  # noqa: F401
    KIND_COMPOUND, KIND_NAMES, KIND_NEGATIVE, KIND_NONE, KIND_POSITIVE, NO_TAG, TASKS, EvalCases,
    SteeringBatch, build_eval_cases, negative_case, positive_case, sample_steering_batch,
)
from dpr.data.dataset import PAD, Catalogue, Dataset, left_pad  # noqa: F401
from dpr.data.folder import is_folder_dataset, load_folder, write_folder  # noqa: F401
from dpr.data.ml1m import ML1M_ENV, find_ml1m_dir, is_ml1m_dir, load_ml1m  # noqa: F401
from dpr.data.prompts import NEGATIVE, POSITIVE, PromptBank, tag_display  # noqa: F401
from dpr.data.synthetic import make_synthetic  # noqa: F401
from dpr.errors import DataError

ML1M_NAMES = ("ml-1m", "ml1m", "movielens-1m")


def load_dataset(spec: str, data_dir: str | os.PathLike | None = None, **kwargs) -> Dataset:
    """Load a dataset by ``spec``:

    * ``"synthetic"``: :func:`make_synthetic` with ``kwargs`` (num_users, num_items, seed, ...);
    * ``"ml-1m"``: :func:`load_ml1m` from ``data_dir``, else ``$DPR_ML1M_DIR``, else
      ``../shared/data/ml-1m`` relative to the current directory or the repository root;
    * a folder path: the generic format (``items.csv`` + ``interactions.csv``; ``kwargs`` go to
      :func:`load_folder`) or an ml-1m-style folder (``user_sequences.txt`` + ``movies.dat``).
    """
    s = str(spec).strip()
    if s.lower() == "synthetic":
        if data_dir is not None:
            raise ValueError("data_dir does not apply to the synthetic dataset")
        return make_synthetic(**kwargs)
    if s.lower() in ML1M_NAMES:
        if kwargs:
            raise TypeError(f"unexpected options for ml-1m: {', '.join(sorted(kwargs))}")
        return load_ml1m(find_ml1m_dir(data_dir))
    path = Path(s).expanduser()
    if data_dir is not None and not path.is_absolute():
        path = Path(data_dir) / path
    if not path.exists():
        raise DataError(f"unknown dataset {spec!r}: not 'synthetic' or 'ml-1m', and no folder {path} exists")
    if not path.is_dir():
        raise DataError(f"{path}: a dataset must be a folder (holding items.csv + interactions.csv)")
    if is_folder_dataset(path):
        return load_folder(path, **kwargs)
    if is_ml1m_dir(path):
        if kwargs:
            raise TypeError(f"unexpected options for an ml-1m folder: {', '.join(sorted(kwargs))}")
        return load_ml1m(path, name=path.resolve().name)
    raise DataError(f"{path}: not a dataset folder; expected items.csv + interactions.csv "
                    "(generic format) or user_sequences.txt + movies.dat (MovieLens-1M)")


__all__ = [
    "PAD", "Catalogue", "Dataset", "left_pad", "load_dataset",
    "load_ml1m", "find_ml1m_dir", "is_ml1m_dir", "ML1M_ENV",
    "load_folder", "write_folder", "is_folder_dataset", "make_synthetic",
    "PromptBank", "tag_display", "POSITIVE", "NEGATIVE",
    "positive_case", "negative_case", "build_eval_cases", "EvalCases", "sample_steering_batch",
    "SteeringBatch", "TASKS", "NO_TAG", "KIND_NONE", "KIND_POSITIVE", "KIND_NEGATIVE", "KIND_COMPOUND",
    "KIND_NAMES", "DataError",
]
