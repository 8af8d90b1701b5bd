"""MovieLens-1M loader against the real files in ../shared/data/ml-1m (or $DPR_ML1M_DIR).

Skipped when the folder is absent. No MovieLens content is stored here: expected titles are read
from movies.dat at test time.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from dpr.data import build_eval_cases, load_dataset, load_ml1m

ML1M_DIR = Path(os.environ.get("DPR_ML1M_DIR") or Path(__file__).resolve().parents[1].parent / "shared/data/ml-1m")

pytestmark = [
    pytest.mark.data,
    pytest.mark.skipif(not (ML1M_DIR / "user_sequences.txt").is_file() or not (ML1M_DIR / "movies.dat").is_file(),
                       reason=f"MovieLens-1M not found at {ML1M_DIR} (set DPR_ML1M_DIR)"),
]


@pytest.fixture(scope="module")
def ml1m():
    return load_ml1m(ML1M_DIR)


def test_ml1m_stats(ml1m):
    assert ml1m.stats() == {"name": "ml-1m", "users": 6040, "items": 3706, "interactions": 1_000_209, "tags": 18}
    lens = np.array([len(s) for s in ml1m.sequences])
    assert lens.min() >= 20
    items = np.concatenate(ml1m.sequences)
    assert items.min() == 1 and items.max() == 3706 and len(np.unique(items)) == 3706
    assert (ml1m.catalogue.item_tags[1:].sum(1) >= 1).all()          # every movie has a genre


def test_ml1m_ids_are_original_movie_ids(ml1m):
    cat = ml1m.catalogue
    assert [int(i) for i in cat.ids] == sorted(int(i) for i in cat.ids)
    # the first user's first item, read straight from the file, maps back to its MovieID
    first = (ML1M_DIR / "user_sequences.txt").read_text().split("\n", 1)[0].split()
    assert ml1m.user_ids[0] == first[0]
    assert [cat.ids[i - 1] for i in ml1m.sequences[0].tolist()] == first[1:]
    # titles and genres agree with movies.dat decoded as latin-1
    movies = {}
    for line in (ML1M_DIR / "movies.dat").read_bytes().decode("latin-1").splitlines():
        mid, title, genres = line.split("::")
        movies[mid] = (title, genres.split("|"))
    for mid, title, tags in zip(cat.ids, cat.titles, cat.tags):
        assert movies[mid] == (title, tags)


def test_ml1m_titles_decode_latin1(ml1m):
    titles = ml1m.catalogue.titles
    non_ascii = [t for t in titles if any(ord(c) > 127 for c in t)]
    assert non_ascii, "expected accented titles (latin-1 bytes such as 0xE9)"
    assert not any("\ufffd" in t or "Ã" in t for t in titles)         # no replacement chars, no mojibake
    assert any("é" in t for t in non_ascii)


def test_ml1m_via_load_dataset_and_eval_cases(ml1m, monkeypatch):
    monkeypatch.setenv("DPR_ML1M_DIR", str(ML1M_DIR))
    ds = load_dataset("ml-1m")
    assert ds.num_interactions == ml1m.num_interactions
    # REFERENCE.md section 4: positive cases cover all 6,040 users, negative cases 6,033
    assert len(build_eval_cases(ml1m, task="positive")) == 6040
    assert len(build_eval_cases(ml1m, task="negative")) == 6033


@pytest.fixture(scope="module")
def ml1m_checkpoint(ml1m, text_encoder):
    """A checkpoint trained on ML-1M in seconds: stage 1 on 600 users, one short steering epoch."""
    from dpr.config import ModelConfig, TrainConfig
    from dpr.train.pipeline import train

    return train(ml1m, ModelConfig(d=32, max_len=50, fusion_hidden=32, expert_hidden=32),
                 TrainConfig(stage1_epochs=2, lr=5e-3, max_train_users=600, stage2_epochs=1, stage2_steps_per_epoch=20,
                             stage3_epochs=1, stage3_steps_per_epoch=10, seed=0),
                 text_encoder, log=lambda *a: None, val_users=200)


def _evaluate(ck, ml1m, text_encoder, users=300):
    from dpr.data.prompts import PromptBank
    from dpr.eval.protocol import build_context, evaluate

    ctx = build_context(text_encoder, ml1m.catalogue, PromptBank())
    return evaluate(ck.build_model(), ml1m, ctx, max_users=users, progress=False)


def test_ml1m_checkpoint_evaluates(ml1m, ml1m_checkpoint, text_encoder):
    r = _evaluate(ml1m_checkpoint, ml1m, text_encoder)
    assert r["cases"]["standard"] == 300 and 250 <= r["cases"]["positive"] <= 300
    assert r["standard"]["dpr"] == r["standard"]["backbone"]              # no prompt: DPR is the backbone
    # 10 of 3,706 items at random gives NDCG@10 ~ 0.0015; two epochs on 600 users beat it several times over
    assert r["standard"]["backbone"]["ndcg@10"] > 0.005
    for method in ("hard_filter", "dpr_hard_filter"):
        assert r["positive"][method]["tag_precision@10"] == 1.0
        assert r["negative"][method]["violation@10"] == 0.0
    # the hard filter can only help a target that carries the tag
    assert r["positive"]["hard_filter"]["ndcg@10"] >= r["positive"]["backbone"]["ndcg@10"]


TRAINED = Path(os.environ.get("DPR_ML1M_CHECKPOINT") or Path(__file__).resolve().parents[1] / "build/ml1m/sasrec.pt")


@pytest.mark.skipif(not TRAINED.is_file(), reason=f"no trained ML-1M checkpoint at {TRAINED} (make ml1m)")
def test_ml1m_trained_checkpoint_steers(ml1m):
    """The `make ml1m` checkpoint (when present) on a few hundred users: a real backbone, and DPR steering
    beating the filter baseline the paper compares with."""
    from dpr.checkpoint import load_checkpoint
    from dpr.model import TextEncoder

    ck = load_checkpoint(TRAINED)
    r = _evaluate(ck, ml1m, TextEncoder.load(ck.text_encoder["source"]), users=400)
    assert r["standard"]["backbone"]["ndcg@10"] > 0.12
    assert r["positive"]["dpr"]["ndcg@10"] > r["positive"]["post_filter"]["ndcg@10"]
    assert r["negative"]["dpr"]["violation@10"] < r["negative"]["backbone"]["violation@10"]
