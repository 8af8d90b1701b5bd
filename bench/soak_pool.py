"""The soak's pool of requests and their expected answers, built before the soak starts, and the small
export it soaks without ``--export``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpr.errors import InputError

from .soak_answers import Answer

__all__ = ["Case", "make_pool", "small_export", "DEFAULT_EXPORT"]

DEFAULT_EXPORT = Path("build/soak/export")


@dataclass
class Case:
    request: dict
    expected: Answer


def _invalid_requests(engine, rng, n: int) -> list[dict]:
    """``n`` requests, each with one field broken in a way a hostile or careless caller would."""
    ids = engine.item_ids
    good = lambda: {"history": [ids[int(j)] for j in rng.choice(len(ids), 3, replace=False)], "k": 5}  # noqa: E731
    makers = [
        lambda r: dict(r, k=0),
        lambda r: dict(r, k=len(ids) + 1),
        lambda r: dict(r, k=10 ** 30),
        lambda r: dict(r, k="5"),
        lambda r: dict(r, k=2.5),
        lambda r: dict(r, history=[]),
        lambda r: dict(r, history="i1"),
        lambda r: dict(r, history=None),
        lambda r: dict(r, history=r["history"] + [f"no-such-item-{rng.integers(1 << 30)}"]),
        lambda r: dict(r, history=r["history"] + [None]),
        lambda r: dict(r, history=r["history"] + [float("nan")]),
        lambda r: dict(r, history=r["history"] + ["i1\x00"]),
        lambda r: dict(r, prompt=""),
        lambda r: dict(r, prompt="   \t"),
        lambda r: dict(r, prompt="bad \ud800 surrogate"),
        lambda r: dict(r, prompt=b"\xff\xfe not utf-8"),
        lambda r: dict(r, prompt="x" * (engine.max_prompt_bytes + 1)),
        lambda r: dict(r, prompt=123),
        lambda r: dict(r, negative_prompt=["a list"]),
        lambda r: dict(r, hard_filter={"include_tags": ["no-such-tag"]}),
        lambda r: dict(r, hard_filter={"colour": ["red"]}),
        lambda r: dict(r, hard_filter="Comedy"),
        lambda r: dict(r, hard_filter={"exclude_items": [None]}),
        lambda r: dict(r, surprise=1),
        lambda r: {"k": 5},
    ]
    return [makers[i % len(makers)](good()) for i in range(n)]


def _valid_requests(engine, rng, n: int) -> list[dict]:
    ids, tags, L = engine.item_ids, engine.tag_names, engine.max_len
    pos = [f"show me more {t} films" for t in tags] + ["something light and funny", "more comedy\x00 please"]
    neg = [f"no {t} please" for t in tags] + ["nothing too long"]
    out = []
    for i in range(n):
        ln = int(rng.integers(1, 2 * L + 1))
        hist = [ids[int(j)] for j in rng.choice(len(ids), size=ln, replace=ln > len(ids) // 2)]
        if i % 7 == 0:                                     # repeated ids are a valid history
            hist = hist + hist[: max(1, ln // 3)]
        r = {"history": hist, "k": int(rng.integers(1, 21))}
        m = int(rng.integers(0, 4))
        if m in (1, 3):
            r["prompt"] = pos[int(rng.integers(len(pos)))]
        if m in (2, 3):
            r["negative_prompt"] = neg[int(rng.integers(len(neg)))]
        if i % 5 == 0:
            r["hard_filter"] = {"exclude_tags": [tags[int(rng.integers(len(tags)))]]}
        elif i % 11 == 0:
            r["hard_filter"] = {"exclude_items": [ids[int(j)] for j in rng.choice(len(ids), 20, replace=False)]}
        if i % 13 == 0:
            r["exclude_history"] = False
        out.append(r)
    return out


def make_pool(engine, valid: int = 256, invalid: int = 64, seed: int = 0) -> list[Case]:
    """Distinct valid requests with the answer ``Engine.recommend`` gives each alone, and broken ones with
    the error ``Engine.validate_request`` gives each."""
    rng = np.random.default_rng(seed)
    cases = []
    for r in _valid_requests(engine, rng, valid):
        rec = engine.recommend([r["history"]], prompts=[r.get("prompt")], negative_prompts=[r.get("negative_prompt")],
                               k=r["k"], exclude_history=r.get("exclude_history", True),
                               hard_filter=[r.get("hard_filter")])[0]
        cases.append(Case(r, Answer(True, list(rec.item_ids), [float(s) for s in rec.scores])))
    for r in _invalid_requests(engine, rng, invalid):
        try:
            engine.validate_request(r)
        except InputError as exc:
            cases.append(Case(r, Answer(False, error_type="InputError", message=str(exc))))
            continue
        raise AssertionError(f"the soak's invalid request was accepted by the engine: {r!r}")
    return cases


def small_export(out: Path = DEFAULT_EXPORT) -> Path:
    """A small trained export (the tests' fixture recipe: 400 synthetic items, tiny BERT, a few steps), built
    once into ``out`` (a ``.complete`` marker says it finished)."""
    out = Path(out)
    if (out / "manifest.json").is_file() and (out.parent / ".complete").is_file():
        return out
    from dpr.checkpoint import save_checkpoint
    from dpr.config import ModelConfig, TrainConfig
    from dpr.data import load_dataset
    from dpr.data.prompts import NEGATIVE_TEMPLATES, POSITIVE_TEMPLATES
    from dpr.export import ExportConfig, export
    from dpr.model import TextEncoder
    from dpr.model.tiny_encoder import make_tiny_text_encoder
    from dpr.train.pipeline import train

    base = out.parent
    corpus = list(POSITIVE_TEMPLATES) + list(NEGATIVE_TEMPLATES)
    corpus += ["comedy horror sci-fi drama romance thriller action documentary animation western musical war"]
    enc = TextEncoder.load(str(make_tiny_text_encoder(base / "tiny-encoder", corpus)))
    data = load_dataset("synthetic", num_users=300, num_items=400, num_tags=8, seed=3)
    ck = train(data, ModelConfig(d=16, max_len=12, fusion_hidden=32, expert_hidden=32, num_heads=2),
               TrainConfig(stage1_epochs=2, stage2_epochs=1, stage2_steps_per_epoch=5, stage3_epochs=1,
                           stage3_steps_per_epoch=5, batch_size=64),
               enc, log=lambda *a: None, val_users=50)
    path = export(save_checkpoint(ck, base / "tiny.pt"), ExportConfig(out=str(out)))
    (base / ".complete").write_text("ok\n")
    return Path(path)
