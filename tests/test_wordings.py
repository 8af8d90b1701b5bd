"""Natural prompt wordings (dpr.data.wordings): the committed development sets, ``names_tag``, validation,
and the ``*_natural`` evaluation tasks (kept out of training)."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from dpr.data.wordings import NaturalWordings, find_wordings, load_wordings, names_tag, tag_words, wordings_name
from dpr.errors import DataError

REPO = Path(__file__).resolve().parents[1]
ML1M_DIR = Path(os.environ.get("DPR_ML1M_DIR") or REPO.parent / "shared" / "data" / "ml-1m")
WORDINGS = REPO / "configs" / "wordings"
AMAZON_DIR = REPO.parent / "shared" / "data" / "amazon-office"
ML1M_GENRES = ["Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
               "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
               "Western"]
FILES = {"ml-1m": 18, "amazon-office": 25}           # file stem -> number of tags it covers
MIN_PER_TAG = 6


def _raw(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# ---- the committed files, without the data ----------------------------------------------------------

@pytest.mark.parametrize("stem", sorted(FILES))
def test_committed_file_never_names_its_tags(stem):
    """Every wording passes names_tag == False for its own tag, every list has >= 6 distinct entries, both
    polarities cover the same tags, and no wording holds the tag's name as written."""
    path = WORDINGS / f"{stem}.json"
    data = _raw(path)
    assert set(data) <= {"description", "positive", "negative"}
    assert set(data["positive"]) == set(data["negative"])
    assert len(data["positive"]) == FILES[stem]
    if stem == "ml-1m":
        assert sorted(data["positive"]) == ML1M_GENRES
    seen: dict[str, str] = {}
    for pol in ("positive", "negative"):
        for tag, ws in data[pol].items():
            assert isinstance(ws, list) and len(ws) >= MIN_PER_TAG, f"{pol} {tag}: {len(ws)} wordings"
            for w in ws:
                key = " ".join(w.lower().split())
                assert key not in seen, f"duplicate wording {w!r} ({pol} {tag}; also {seen[key]})"
                seen[key] = f"{pol} {tag}"
                assert not names_tag(w, tag), f"{pol} wording {w!r} names its tag {tag!r}"
                assert tag.lower() not in w.lower()
                for word in re.split(r"[^a-z]+", tag.lower()):
                    if len(word) >= 3 and word not in ("and", "other"):
                        assert not re.search(rf"\b{word}", w.lower()), f"{w!r} contains {word!r} of {tag!r}"
    # the loader agrees (no tag-name check without the data)
    nw = load_wordings(path, min_per_tag=MIN_PER_TAG)
    assert len(nw) == sum(len(ws) for pol in ("positive", "negative") for ws in data[pol].values())


def test_find_wordings_by_dataset_argument(tmp_path, monkeypatch):
    assert find_wordings("ml-1m") == WORDINGS / "ml-1m.json"
    assert find_wordings("ML1M") == WORDINGS / "ml-1m.json"
    assert find_wordings("/somewhere/else/amazon-office") == WORDINGS / "amazon-office.json"
    assert find_wordings("synthetic") is None and wordings_name("synthetic") is None
    assert find_wordings(str(tmp_path / "no-such-catalogue")) is None
    assert wordings_name("amazon-office", data_dir="/data") == "amazon-office"
    # an installed package has no configs/: nothing found, no error
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("dpr.data.wordings.wordings_dirs", lambda: [tmp_path / "configs" / "wordings"])
    assert find_wordings("ml-1m") is None


# ---- the committed files against the real tag lists ------------------------------------------------

def _ml1m_tags() -> list[str]:
    from dpr.data.ml1m import read_movies

    if not (ML1M_DIR / "movies.dat").is_file():
        pytest.skip(f"needs MovieLens-1M's movies.dat in {ML1M_DIR} (set DPR_ML1M_DIR)")
    return sorted({g for _, genres in read_movies(ML1M_DIR / "movies.dat").values() for g in genres})


def _amazon_tags() -> list[str]:
    items = AMAZON_DIR / "items.csv"
    if not items.is_file():
        pytest.skip(f"needs the Amazon Office catalogue {items} (../shared/data is absent)")
    with open(items, newline="", encoding="utf-8") as fh:
        return sorted({t for row in csv.DictReader(fh) for t in row["tags"].split("|") if t})


@pytest.mark.data
@pytest.mark.parametrize("stem,tags", [("ml-1m", _ml1m_tags), ("amazon-office", _amazon_tags)])
def test_committed_file_validates_against_the_real_tags(stem, tags):
    names = tags()
    nw = load_wordings(WORDINGS / f"{stem}.json", names, min_per_tag=MIN_PER_TAG)
    cov = nw.coverage(names)
    for pol in ("positive", "negative"):
        assert cov[pol]["missing"] == [] and cov[pol]["tags"] == len(names) == FILES[stem]
    if stem == "ml-1m":
        assert names == ML1M_GENRES


# ---- names_tag ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("wording,tag", [
    ("I want Comedy", "Comedy"), ("any good comedies?", "Comedy"), ("a comic one", "Comedy"),
    ("a stand-up comedian special", "Comedy"), ("science fiction please", "Sci-Fi"), ("some SCI-FI", "Sci-Fi"),
    ("for the child in me", "Children's"), ("childhood favourites", "Children's"),
    ("something animated", "Animation"), ("warring nations", "War"), ("wartime stories", "War"),
    ("the wild west", "Western"), ("a horrifying one", "Horror"), ("a mysterious stranger", "Mystery"),
    ("criminals on the run", "Crime"), ("black and white films", "Film-Noir"), ("neo-noir", "Film-Noir"),
    ("a new armchair", "Chairs & Sofas"), ("a phone for my desk", "Telephones & Accessories"),
    ("keep the records straight", "Forms, Recordkeeping & Money Handling"),
    ("inkjet cartridges", "Printer Ink & Toner"), ("something to print on", "Printer Ink & Toner"),
    ("old files", "Filing Products"), ("planning my week", "Calendars, Planners & Personal Organizers"),
    ("to organise my week", "Calendars, Planners & Personal Organizers"), ("a whiteboard", "Presentation Boards"),
    ("something written by hand", "Writing & Correction Supplies"), ("newspaper", "Paper"),
    ("no PAPERS please", "Paper"), ("romantic evening", "Romance"), ("music lovers", "Musical"),
])
def test_names_tag_true(wording, tag):
    assert names_tag(wording, tag)


@pytest.mark.parametrize("wording,tag", [
    ("something to make me laugh", "Comedy"), ("come on, cheer me up", "Comedy"),
    ("spaceships and aliens", "Sci-Fi"), ("for the kids", "Children's"), ("nothing with cartoons", "Animation"),
    ("cute animals", "Animation"), ("warm and cosy", "War"), ("an award winner", "War"),
    ("cowboys and outlaws", "Western"), ("terrifying", "Horror"), ("a whodunit", "Mystery"),
    ("a heist", "Crime"), ("dark detectives", "Film-Noir"), ("a comfy seat", "Chairs & Sofas"),
    ("a cordless handset", "Telephones & Accessories"), ("pink", "Printer Ink & Toner"),
    ("a film", "Filing Products"), ("other stuff", "Other Office Equipment"),
    ("sheets for the copier", "Paper"), ("stuff to stick things together", "Tape, Adhesives & Fasteners"),
])
def test_names_tag_false(wording, tag):
    assert not names_tag(wording, tag)


def test_tag_words():
    assert tag_words("Children's") == ["child"]
    assert tag_words("Sci-Fi") == ["sci"]
    assert tag_words("Other Office Equipment") == ["office", "equipment"]
    assert tag_words("Tape, Adhesives & Fasteners") == ["tape", "adhesives", "fasteners"]


# ---- validation ---------------------------------------------------------------------------------------

TAGS = ["Comedy", "Horror", "Sci-Fi"]
GOOD = ["something to make me laugh", "a funny one", "silly jokes", "lighthearted please", "give me a giggle",
        "something hilarious"]


@pytest.mark.parametrize("data,needle", [
    ({"positive": {"Comdy": GOOD}, "negative": {}}, ["'Comdy'", "did you mean 'Comedy'"]),
    ({"positive": {"Comedy": []}, "negative": {}}, ["'Comedy'", "non-empty list"]),
    ({"positive": {"Comedy": "a funny one"}, "negative": {}}, ["'Comedy'", "non-empty list"]),
    ({"positive": {"Comedy": ["a funny one", "  "]}, "negative": {}}, ["'Comedy'", "not a non-empty string"]),
    ({"positive": {"Comedy": ["a funny one", "A  funny one"]}, "negative": {}}, ["duplicate", "'Comedy'"]),
    ({"positive": {"Comedy": ["silly jokes"]}, "negative": {"Horror": ["silly jokes"]}},
     ["duplicate", "'Horror'", "'Comedy'"]),
    ({"positive": {"Comedy": ["a funny one", "more comedies please"]}, "negative": {}},
     ["'more comedies please'", "names its tag 'Comedy'"]),
    ({"positive": {}, "negative": {"Sci-Fi": ["no science fiction"]}},
     ["'no science fiction'", "names its tag 'Sci-Fi'"]),
    ({"positive": {"Comedy": GOOD}}, ["missing the 'negative' section"]),
    ({"positive": {"Comedy": GOOD}, "negative": {}, "extra": 1}, ["unknown keys"]),
    (["not", "an", "object"], ["JSON object"]),
])
def test_malformed_file_is_refused_naming_the_tag(tmp_path, data, needle):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(data))
    with pytest.raises(DataError) as exc:
        load_wordings(f, TAGS)
    msg = str(exc.value)
    assert str(f) in msg
    for n in needle:
        assert n in msg, msg


def test_missing_tags_are_allowed_and_reported(tmp_path):
    nw = NaturalWordings.from_dict({"positive": {"Comedy": GOOD}, "negative": {"Horror": ["nothing scary"]}}, TAGS)
    cov = nw.coverage(TAGS)
    assert cov["positive"] == {"tags": 1, "of": 3, "missing": ["Horror", "Sci-Fi"], "wordings": 6}
    assert cov["negative"]["missing"] == ["Comedy", "Sci-Fi"]
    assert nw.wordings("positive", "Comedy") == GOOD and nw.wordings(2, "Comedy") == []
    assert nw.wordings("neg", "Horror") == ["nothing scary"]
    with pytest.raises(DataError, match="at least 6"):
        NaturalWordings.from_dict({"positive": {"Horror": ["nothing scary"]}, "negative": {}}, TAGS, min_per_tag=6)
    with pytest.raises(DataError, match="not valid JSON"):
        (tmp_path / "x.json").write_text("{")
        load_wordings(tmp_path / "x.json")
    with pytest.raises(DataError, match="not found"):
        load_wordings(tmp_path / "absent.json")


# ---- evaluation ---------------------------------------------------------------------------------------

def _synthetic_wordings(tag_names: list[str], drop_positive: str) -> dict:
    """Wordings for the synthetic tags (genre words), taken from the ML-1M file by case-insensitive name;
    ``drop_positive`` gets no positive wordings (its cases must be skipped and counted)."""
    ml = _raw(WORDINGS / "ml-1m.json")
    out: dict = {"positive": {}, "negative": {}}
    for pol in ("positive", "negative"):
        by_lower = {k.lower(): v for k, v in ml[pol].items()}
        for t in tag_names:
            if t in by_lower and not (pol == "positive" and t == drop_positive):
                out[pol][t] = by_lower[t]
    return out


@pytest.fixture(scope="module")
def natural_setup(tiny_checkpoint, small_dataset, text_encoder):
    from dpr.checkpoint import load_checkpoint
    from dpr.data.prompts import PromptBank
    from dpr.eval.protocol import build_context

    ck = load_checkpoint(tiny_checkpoint)
    names = small_dataset.catalogue.tag_names
    drop = names[0]
    nw = NaturalWordings.from_dict(_synthetic_wordings(names, drop), names, source="generated")
    ctx = build_context(text_encoder, small_dataset.catalogue, PromptBank(heldout=ck.train_config.heldout_templates))
    return ck.build_model(), small_dataset, ctx, nw, drop


def test_eval_natural_tasks_mirror_heldout_metrics(natural_setup):
    from dpr.data.cases import build_eval_cases
    from dpr.eval.protocol import evaluate, format_table

    model, ds, ctx, nw, drop = natural_setup
    r = evaluate(model, ds, ctx, tasks=("positive", "negative", "compound"), max_users=120, progress=False,
                 wordings=nw)
    cases = r["cases"]
    drop_idx = ds.catalogue.tag_index[drop]
    for task in ("positive", "negative", "compound"):
        nat, held = r[f"{task}_natural"], r[f"{task}_heldout"]
        assert set(nat) == set(held)
        for method in held:
            assert set(nat[method]) == set(held[method]), (task, method)
            assert all(np.isfinite(v) for v in nat[method].values())
        built = build_eval_cases(ds, split="test", task=task, max_users=120)
        skipped = int((built.pos_tag == drop_idx).sum())           # the dropped tag has no positive wordings
        assert cases[f"{task}_natural_skipped"] == skipped
        assert cases[f"{task}_natural"] + skipped == cases[f"{task}_heldout"] == len(built)
    assert cases["positive_natural_skipped"] > 0 and cases["negative_natural_skipped"] == 0
    table = format_table(r)
    assert "positive_natural (" in table and "skipped: no natural wordings" in table
    # no wordings: no natural tasks
    r0 = evaluate(model, ds, ctx, tasks=("positive",), heldout=False, max_users=40, progress=False)
    assert set(r0) == {"positive", "cases"}


def test_natural_draws_are_seeded_and_from_the_tags_own_wordings(natural_setup):
    from dpr.data.cases import build_eval_cases
    from dpr.eval.protocol import natural_coverage, run_task
    from dpr.model.moe import POLARITY_NEGATIVE, POLARITY_POSITIVE

    model, ds, ctx, nw, drop = natural_setup
    names = ds.catalogue.tag_names
    nat = ctx.natural_table(nw, names)
    assert ctx.natural_table(nw, names) is nat                       # encoded once, cached in the context
    assert sorted(nat.texts) == sorted(set(nw.texts()))
    cases = build_eval_cases(ds, task="compound", max_users=100)
    cases = cases.subset(np.flatnonzero(natural_coverage(cases, nat)))
    for pol, tags, name in ((POLARITY_POSITIVE, cases.pos_tag, "positive"),
                            (POLARITY_NEGATIVE, cases.neg_tag, "negative")):
        a = nat.draw(pol, tags, np.random.default_rng(5))
        assert np.array_equal(a, nat.draw(pol, tags, np.random.default_rng(5)))
        for row, t in zip(a, tags):
            assert nat.texts[row] in nw.wordings(name, names[t])
    with pytest.raises(ValueError, match="no natural wordings"):
        nat.draw(POLARITY_POSITIVE, np.array([ds.catalogue.tag_index[drop]]), np.random.default_rng(0))
    one = run_task(model, ds.catalogue, cases, ctx, wordings=nw, seed=3, methods=("dpr", "rerank"))
    assert one == run_task(model, ds.catalogue, cases, ctx, wordings=nw, seed=3, methods=("dpr", "rerank"))
    with pytest.raises(ValueError, match="exclude"):
        run_task(model, ds.catalogue, cases, ctx, wordings=nw, heldout=True)


def test_natural_wordings_never_reach_training(natural_setup):
    from dpr.data.prompts import PromptBank

    _, ds, ctx, nw, _ = natural_setup
    texts = {" ".join(t.lower().split()) for t in nw.texts()}
    assert texts
    assert not texts & {" ".join(t.lower().split()) for t in ctx.table.texts}
    assert not texts & {t.lower() for t in PromptBank().all_prompts(ds.catalogue.tag_names)}
    for stem in FILES:                                               # the committed sets, too
        committed = {" ".join(t.lower().split()) for t in load_wordings(WORDINGS / f"{stem}.json").texts()}
        assert not committed & {t.lower() for t in PromptBank().all_prompts(ML1M_GENRES)}
    # nothing in training reads the wordings
    for src in (REPO / "dpr" / "train").glob("*.py"):
        assert "wordings import" not in src.read_text() and "dpr.data.wordings" not in src.read_text(), src


def test_cli_natural_tasks_json_table_and_results_md(tiny_checkpoint, tmp_path, capsys):
    from dpr.cli import eval as eval_cli
    from dpr.data.synthetic import tag_names
    from dpr.eval.results_md import main as results_md

    f = tmp_path / "synthetic-words.json"
    f.write_text(json.dumps(_synthetic_wordings(tag_names(8), drop_positive="drama")))
    base = [str(tiny_checkpoint), "--dataset", "synthetic", "--synthetic-users", "300", "--synthetic-items", "400",
            "--synthetic-tags", "8", "--synthetic-seed", "3", "--max-users", "60", "--tasks", "positive,negative"]
    out = tmp_path / "r.json"
    assert eval_cli.main(base + ["--wordings", str(f), "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "positive_natural" in captured.out and "natural wordings" in captured.err
    res = json.loads(out.read_text())
    assert {"positive_natural", "negative_natural", "positive_heldout"} <= set(res)
    assert set(res["positive_natural"]["dpr"]) == set(res["positive_heldout"]["dpr"])
    assert res["meta"]["wordings"]["coverage"]["positive"]["missing"] == ["drama"]
    assert res["cases"]["positive_natural_skipped"] > 0
    assert results_md([str(out)]) == 0
    md = capsys.readouterr().out
    assert "**positive_natural**" in md and "**negative_natural**" in md

    # auto (the default) on synthetic: no file, no natural tasks, no error; none: skipped
    for extra in ([], ["--wordings", "none"]):
        assert eval_cli.main(base + ["--tasks", "positive", "--json", str(out)] + extra) == 0
        assert not any(k.endswith("_natural") for k in json.loads(out.read_text()))
    capsys.readouterr()
    # a file that names its tag is refused with a clear error
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"positive": {"comedy": ["more comedy please"]}, "negative": {}}))
    assert eval_cli.main(base + ["--wordings", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "dpr-eval: error:" in err and "names its tag 'comedy'" in err
