"""dpr.data: generic folder, synthetic generator, splits, prompts, steering cases and sampler.

Everything here runs on hand-made or synthetic data; MovieLens tests live in test_data_ml1m.py.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from dpr.data import (
    KIND_COMPOUND, KIND_NEGATIVE, KIND_NONE, KIND_POSITIVE, NO_TAG, Catalogue, Dataset, PromptBank,
    build_eval_cases, load_dataset, load_folder, make_synthetic, negative_case, positive_case,
    sample_steering_batch, tag_display, write_folder,
)
from dpr.data import left_pad
from dpr.data.cases import choose_negative, choose_positive
from dpr.data.ml1m import find_ml1m_dir, load_ml1m
from dpr.data.synthetic import TAG_WORDS
from dpr.errors import DataError


# ---------------------------------------------------------------------------------------------
# helpers / fixtures
# ---------------------------------------------------------------------------------------------

def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


@pytest.fixture
def folder(tmp_path):
    write(tmp_path / "items.csv",
          'item_id,title,tags\n'
          'x9,"Big, Loud Movie",action|comedy\n'
          'a1,Quiet Film,\n'
          'b2,"She said ""hi""",drama\n'
          'c3,Space Thing,sci-fi|action\n')
    write(tmp_path / "interactions.csv",
          "user_id,item_id\n"
          "u2,c3\n"
          "u1,a1\n"
          "u2,x9\n"
          "u1,b2\n"
          "u1,x9\n")
    return tmp_path


def tiny_catalogue():
    # tag indices: a=0, b=1, c=2, d=3 (tag_names are sorted)
    return Catalogue(ids=[f"i{k}" for k in range(1, 8)], titles=[f"T{k}" for k in range(1, 8)],
                     tags=[["a"],            # 1
                           ["b"],            # 2
                           ["a", "b"],       # 3
                           ["c"],            # 4
                           ["a", "c"],       # 5
                           [],               # 6 (no tags)
                           ["a", "b", "c", "d"]])  # 7


# ---------------------------------------------------------------------------------------------
# generic folder
# ---------------------------------------------------------------------------------------------

def test_folder_parses_quoted_titles_empty_tags_and_remaps_ids(folder):
    ds = load_folder(folder)
    cat = ds.catalogue
    assert cat.ids == ["x9", "a1", "b2", "c3"]                      # catalogue order = items.csv order
    assert cat.titles == ["Big, Loud Movie", "Quiet Film", 'She said "hi"', "Space Thing"]
    assert cat.tags == [["action", "comedy"], [], ["drama"], ["sci-fi", "action"]]
    assert cat.tag_names == ["action", "comedy", "drama", "sci-fi"]
    assert ds.user_ids == ["u2", "u1"]                                # order of first appearance
    assert [s.tolist() for s in ds.sequences] == [[4, 1], [2, 3, 1]]  # row order is chronological
    assert all(s.dtype == np.int64 for s in ds.sequences)
    assert ds.stats() == {"name": folder.name, "users": 2, "items": 4, "interactions": 5, "tags": 4}
    assert not cat.item_tags[0].any() and cat.item_tags[4, cat.tag_index["sci-fi"]]


def test_folder_timestamps_sort_stably_per_user(tmp_path):
    write(tmp_path / "items.csv", "item_id,title,tags\n1,A,x\n2,B,y\n3,C,x|y\n4,D,\n")
    write(tmp_path / "interactions.csv",
          "user_id,item_id,timestamp\n"
          "u,3,30\n"
          "u,1,10\n"
          "v,1,5\n"
          "u,4,20\n"
          "u,2,20\n"      # tie with the row above: file order kept
          "v,2,1.5\n")
    ds = load_folder(tmp_path)
    assert ds.user_ids == ["u", "v"]
    assert ds.sequences[0].tolist() == [1, 4, 2, 3]
    assert ds.sequences[1].tolist() == [2, 1]


def test_folder_unknown_item_errors_with_id_and_line_or_skips(tmp_path):
    write(tmp_path / "items.csv", "item_id,title,tags\n1,A,x\n2,B,y\n")
    write(tmp_path / "interactions.csv", "user_id,item_id\nu,1\nu,2\nu,zz\nw,zz\nv,2\n")
    with pytest.raises(DataError, match=r"interactions\.csv:4.*'zz'"):
        load_folder(tmp_path)
    ds = load_folder(tmp_path, unknown_items="skip")
    assert ds.user_ids == ["u", "v"]                # w had only an unknown item: dropped
    assert [s.tolist() for s in ds.sequences] == [[1, 2], [2]]
    with pytest.raises(ValueError):
        load_folder(tmp_path, unknown_items="ignore")


@pytest.mark.parametrize("items, inter, pattern", [
    ("item_id,title,tags\n1,A,x\n2,B\n", "user_id,item_id\nu,1\n", r"items\.csv:3: expected 3 fields"),
    ("item_id,title,tags\n1,A,x\n1,B,y\n", "user_id,item_id\nu,1\n", r"items\.csv:3: duplicate item_id '1'"),
    ("item_id,title,tags\n1,A,x\n,B,y\n", "user_id,item_id\nu,1\n", r"items\.csv:3: empty item_id"),
    ("id,title,tags\n1,A,x\n", "user_id,item_id\nu,1\n", r"items\.csv:1: .*lacks column\(s\) item_id"),
    ('item_id,title,tags\n1,"A,x\n', "user_id,item_id\nu,1\n", r"items\.csv:\d+: malformed CSV"),
    ("item_id,title,tags\n", "user_id,item_id\nu,1\n", r"items\.csv: no items"),
    ("item_id,title,tags\n1,A,x\n", "user_id,item_id\nu,1\nu,1,7\n", r"interactions\.csv:3: expected 2 fields"),
    ("item_id,title,tags\n1,A,x\n", "user_id,item_id,timestamp\nu,1,5\nu,1,soon\n",
     r"interactions\.csv:3: timestamp 'soon'"),
    ("item_id,title,tags\n1,A,x\n", "user,item\nu,1\n", r"interactions\.csv:1: .*user_id, item_id"),
    ("item_id,title,tags\n1,A,x\n", "", r"interactions\.csv: empty file"),
    ("item_id,title,tags\n1,A,x\n", "user_id,item_id\n", r"interactions\.csv: no interactions"),
])
def test_folder_malformed_files_name_file_and_line(tmp_path, items, inter, pattern):
    write(tmp_path / "items.csv", items)
    write(tmp_path / "interactions.csv", inter)
    with pytest.raises(DataError, match=pattern):
        load_folder(tmp_path)


def test_folder_line_numbers_count_multiline_quoted_fields(tmp_path):
    write(tmp_path / "items.csv", 'item_id,title,tags\n1,"two\nlines",x\n2,B\n')
    write(tmp_path / "interactions.csv", "user_id,item_id\nu,1\n")
    with pytest.raises(DataError, match=r"items\.csv:4:"):
        load_folder(tmp_path)


def test_folder_missing_dir_and_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_folder(tmp_path / "nope")
    write(tmp_path / "items.csv", "item_id,title,tags\n1,A,x\n")
    with pytest.raises(DataError, match=r"interactions\.csv: file not found"):
        load_folder(tmp_path)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "latin-1"])
def test_folder_decodes_utf8_bom_and_latin1(tmp_path, encoding):
    write(tmp_path / "items.csv", "item_id,title,tags\n1,Amélie à Paris,Comédie\n2,Straße,\n", encoding)
    write(tmp_path / "interactions.csv", "user_id,item_id\nzoë,1\nzoë,2\n", encoding)
    ds = load_folder(tmp_path)
    assert ds.catalogue.titles == ["Amélie à Paris", "Straße"]
    assert ds.catalogue.tag_names == ["Comédie"]
    assert ds.user_ids == ["zoë"]


def test_folder_explicit_encoding_error_is_dataerror(tmp_path):
    write(tmp_path / "items.csv", "item_id,title,tags\n1,Amélie,x\n", "latin-1")
    write(tmp_path / "interactions.csv", "user_id,item_id\nu,1\n")
    with pytest.raises(DataError, match="cannot decode as utf-8"):
        load_folder(tmp_path, encoding="utf-8")


def test_write_folder_round_trip(tmp_path):
    ds = make_synthetic(num_users=30, num_items=80, num_tags=5, seq_len=(5, 12), seed=3)
    back = load_folder(write_folder(ds, tmp_path / "out"))
    assert back.catalogue.ids == ds.catalogue.ids
    assert back.catalogue.titles == ds.catalogue.titles
    assert back.catalogue.tags == ds.catalogue.tags
    assert back.user_ids == ds.user_ids
    assert all(np.array_equal(a, b) for a, b in zip(back.sequences, ds.sequences))


# ---------------------------------------------------------------------------------------------
# load_dataset and the ml-1m loader on fake (made-up) files
# ---------------------------------------------------------------------------------------------

def fake_ml1m(d, movies=None, seqs=None):
    d.mkdir(parents=True, exist_ok=True)
    movies = movies if movies is not None else (
        "10::Made Up Caf\xe9 (2001)::Comedy|Drama\n2::Another One (1999)::Sci-Fi\n7::Third (1990)::Drama\n")
    (d / "movies.dat").write_bytes(movies.encode("latin-1"))
    (d / "user_sequences.txt").write_text(seqs if seqs is not None else "1 10 2 7\n5 7 10\n")
    return d


def test_load_ml1m_on_fake_files(tmp_path):
    ds = load_ml1m(fake_ml1m(tmp_path / "m"))
    assert ds.catalogue.ids == ["2", "7", "10"]               # rated movies, numeric MovieID order
    assert ds.catalogue.titles[2] == "Made Up Café (2001)"   # latin-1
    assert ds.catalogue.tags[2] == ["Comedy", "Drama"]
    assert ds.user_ids == ["1", "5"]
    assert [s.tolist() for s in ds.sequences] == [[3, 1, 2], [2, 3]]
    assert ds.catalogue.tag_names == ["Comedy", "Drama", "Sci-Fi"]


@pytest.mark.parametrize("movies, seqs, pattern", [
    ("1::A (1990)::Drama\n2::B (1991)\n", "1 1\n", r"movies\.dat:2: expected"),
    ("1::A (1990)::Drama\n1::B (1991)::Drama\n", "1 1\n", r"movies\.dat:2: duplicate MovieID"),
    ("1::A (1990)::Drama\n", "1 1\n2 1 99\n", r"user_sequences\.txt:2: MovieID '99'"),
    ("1::A (1990)::Drama\n", "1 1\n2\n", r"user_sequences\.txt:2: user '2' has no items"),
    ("1::A (1990)::Drama\n", "1 1\n1 1\n", r"user_sequences\.txt:2: duplicate UserID"),
])
def test_load_ml1m_malformed(tmp_path, movies, seqs, pattern):
    with pytest.raises(DataError, match=pattern):
        load_ml1m(fake_ml1m(tmp_path / "m", movies, seqs))


def test_load_ml1m_missing(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_ml1m(tmp_path / "absent")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "movies.dat").write_text("1::A::Drama\n")
    with pytest.raises(DataError, match=r"user_sequences\.txt: file not found"):
        load_ml1m(tmp_path / "m")


def test_ml1m_dir_resolution_env(tmp_path, monkeypatch):
    d = fake_ml1m(tmp_path / "m")
    monkeypatch.setenv("DPR_ML1M_DIR", str(d))
    assert find_ml1m_dir() == d
    assert load_dataset("ml-1m").stats()["users"] == 2
    monkeypatch.setenv("DPR_ML1M_DIR", str(tmp_path / "missing"))
    with pytest.raises(DataError, match="DPR_ML1M_DIR"):
        load_dataset("ml-1m")
    assert find_ml1m_dir(tmp_path / "explicit") == tmp_path / "explicit"


def test_load_dataset_dispatch(tmp_path, folder):
    a = load_dataset("synthetic", num_users=20, num_items=50, seq_len=(5, 8), seed=1)
    assert a.name == "synthetic" and a.num_users == 20 and a.num_items == 50
    assert load_dataset(str(folder)).catalogue.ids == ["x9", "a1", "b2", "c3"]
    assert load_dataset(str(folder), unknown_items="skip").num_users == 2
    m = load_dataset(str(fake_ml1m(tmp_path / "mlstyle")))
    assert m.num_users == 2 and m.catalogue.ids == ["2", "7", "10"]
    assert load_dataset("ml-1m", data_dir=tmp_path / "mlstyle").num_items == 3
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset(str(tmp_path / "nothing-here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a dataset folder"):
        load_dataset(str(tmp_path / "empty"))
    with pytest.raises(TypeError):
        load_dataset("synthetic", no_such_option=1)


# ---------------------------------------------------------------------------------------------
# Dataset splits and padding
# ---------------------------------------------------------------------------------------------

def test_leave_one_out_splits_and_short_users():
    cat = tiny_catalogue()
    ds = Dataset("t", cat, ["a", "b", "c"], [np.array([1, 2, 3, 4, 5]), np.array([6, 7]), np.array([2, 4, 6])])
    assert ds.eval_users().tolist() == [0, 2]
    h, t = ds.split(0, "test")
    assert h.tolist() == [1, 2, 3, 4] and t == 5
    h, t = ds.split(0, "valid")
    assert h.tolist() == [1, 2, 3] and t == 4
    assert ds.train_sequence(0).tolist() == [1, 2, 3]
    assert ds.train_sequence(1).tolist() == [6, 7]     # too short to evaluate: all of it trains
    with pytest.raises(ValueError):
        ds.split(0, "train")


def test_left_pad_pads_left_and_keeps_most_recent():
    out = left_pad([np.array([1, 2, 3, 4, 5]), np.array([7]), np.array([], dtype=np.int64)], 3)
    assert out.dtype == np.int64
    assert out.tolist() == [[3, 4, 5], [0, 0, 7], [0, 0, 0]]


# ---------------------------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------------------------

def test_synthetic_is_deterministic_per_seed():
    a, b = make_synthetic(seed=5, num_users=200), make_synthetic(seed=5, num_users=200)
    c = make_synthetic(seed=6, num_users=200)
    assert a.catalogue.to_dict() == b.catalogue.to_dict()
    assert all(np.array_equal(x, y) for x, y in zip(a.sequences, b.sequences))
    assert a.catalogue.titles != c.catalogue.titles
    assert sum(len(x) != len(y) or not np.array_equal(x, y) for x, y in zip(a.sequences, c.sequences)) > 150


def test_synthetic_shape_and_sanity():
    t0 = time.perf_counter()
    ds = make_synthetic()
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0, f"1000 synthetic users took {elapsed:.2f}s"
    st = ds.stats()
    assert (st["users"], st["items"], st["tags"]) == (1000, 2000, 12)
    cat = ds.catalogue
    assert cat.tag_names == sorted(TAG_WORDS[:12])
    lens = np.array([len(s) for s in ds.sequences])
    assert lens.min() >= 20 and lens.max() <= 60 and lens.min() < 25 and lens.max() > 55
    for s in ds.sequences:
        assert s.dtype == np.int64 and s.min() >= 1 and s.max() <= 2000
        assert len(np.unique(s)) == len(s)                         # no repeats within a user
    ntags = cat.item_tags[1:].sum(1)
    assert ntags.min() >= 1 and ntags.max() <= 3
    assert cat.item_tags[1:].any(0).all()                          # every tag is used
    assert len(set(cat.titles)) == len(cat.titles)                 # titles are unique
    assert all(re.fullmatch(r"[A-Z][A-Za-z' ]+( (II|III|IV|V|\(\d+\)))?", t) for t in cat.titles)
    counts = np.bincount(np.concatenate(ds.sequences), minlength=2001)[1:]
    top = np.sort(counts)[::-1]
    assert top[:200].sum() > 0.35 * counts.sum()                   # popularity is skewed (Zipf-ish)


def test_synthetic_many_tags_named_beyond_word_list():
    ds = make_synthetic(num_users=10, num_items=300, num_tags=len(TAG_WORDS) + 3, seq_len=(5, 6))
    names = set(ds.catalogue.tag_names)
    assert set(TAG_WORDS) <= names
    assert {f"tag-{len(TAG_WORDS) + k}" for k in (1, 2, 3)} <= names
    assert len(names) == len(TAG_WORDS) + 3


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(ValueError):
        make_synthetic(num_items=10, seq_len=(5, 20))
    with pytest.raises(ValueError):
        make_synthetic(seq_len=(0, 5))
    with pytest.raises(ValueError):
        make_synthetic(drift=1.5)


def _recent_vs_overall_tv(ds, window=10):
    m = ds.catalogue.item_tags.astype(np.float64)
    tv = []
    for s in ds.sequences:
        a, b = m[s].sum(0), m[s[-window:]].sum(0)
        tv.append(0.5 * np.abs(a / a.sum() - b / b.sum()).sum())
    return np.array(tv)


def test_synthetic_taste_drift():
    drifting = _recent_vs_overall_tv(make_synthetic(seed=1))
    stationary = _recent_vs_overall_tv(make_synthetic(seed=1, drift=0.0))
    # many users' recent-window tag distribution departs from their overall one, clearly more than
    # sampling noise alone (the stationary control) produces
    assert (drifting > 0.3).mean() > 0.35
    assert (drifting > 0.3).mean() > 1.6 * (stationary > 0.3).mean()
    assert drifting.mean() > stationary.mean() + 0.03


def test_synthetic_sequential_structure():
    def repeated_transition_share(ds):
        pairs = np.concatenate([s[:-1] * 10_000 + s[1:] for s in ds.sequences])
        _, counts = np.unique(pairs, return_counts=True)
        return counts[counts > 1].sum() / counts.sum()
    seq = repeated_transition_share(make_synthetic(seed=2, p_successor=0.3))
    none = repeated_transition_share(make_synthetic(seed=2, p_successor=0.0))
    assert seq > 1.5 * none, (seq, none)


# ---------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------

def test_prompt_bank_split_and_render():
    pb = PromptBank()
    for pol in ("positive", "negative"):
        assert len(pb.templates(pol)) >= 6
        train, held = pb.train_templates(pol), pb.heldout_templates(pol)
        assert len(held) == 1 and held == pb.templates(pol)[-1:]
        assert not set(train) & set(held)
        assert set(train) | set(held) == set(pb.templates(pol))
    assert not set(pb.templates("positive")) & set(pb.templates("negative"))
    pb2 = PromptBank(heldout=2)
    assert len(pb2.heldout_templates("neg")) == 2 and len(pb2.train_templates(1)) == len(pb.templates(1)) - 2
    assert PromptBank.render("no {tag} please", "Sci-Fi") == "no sci-fi please"
    assert PromptBank.render("show me more {tag}", "Children's") == "show me more children's"
    assert tag_display("Film-Noir") == "film-noir" and tag_display("sci-fi") == "sci-fi"
    assert tag_display(" Dark_Comedy ") == "dark comedy"
    with pytest.raises(ValueError):
        PromptBank(heldout=len(pb.templates("positive")))
    with pytest.raises(ValueError):
        PromptBank(positive=["show me"])
    with pytest.raises(ValueError):
        pb.templates("neutral")


def test_prompt_bank_all_prompts_and_sampling():
    pb = PromptBank()
    tags = ["Comedy", "Sci-Fi", "Horror"]
    allp = pb.all_prompts(tags)
    assert len(allp) == len(set(allp)) == (len(pb.templates("positive")) + len(pb.templates("negative"))) * 3
    assert pb.render(pb.heldout_templates("negative")[0], "Horror") in allp
    assert all(p == p.strip() and "{" not in p for p in allp)
    rng = np.random.default_rng(0)
    train_texts = {pb.render(t, "Comedy") for t in pb.train_templates("positive")}
    held_texts = {pb.render(t, "Comedy") for t in pb.heldout_templates("positive")}
    sampled = {pb.sample("positive", "Comedy", rng) for _ in range(200)}
    assert sampled == train_texts                          # every train wording, never a held-out one
    assert {pb.sample("positive", "Comedy", rng, heldout=True) for _ in range(20)} == held_texts


# ---------------------------------------------------------------------------------------------
# steering cases
# ---------------------------------------------------------------------------------------------

def test_positive_case_least_frequent_tag():
    cat, rng = tiny_catalogue(), np.random.default_rng(0)
    # recent tags: a x3 (1, 3, 5), b x2 (2, 3), c x1 (5); target 7 has a, b, c, d -> d (count 0)
    assert positive_case([1, 2, 3, 5], 7, cat, rng) == 3
    # target 3 has a, b: b (2) is rarer than a (3)
    assert positive_case([1, 2, 3, 5], 3, cat, rng) == 1
    # accepts the item_tags matrix and ignores padding
    assert positive_case([0, 0, 1, 2, 3, 5], 3, cat.item_tags, rng) == 1
    # target without tags -> None
    assert positive_case([1, 2], 6, cat, rng) is None


def test_positive_case_window_and_ties():
    cat = tiny_catalogue()
    # the window keeps only the last 2 items (4, 4): c x2; target 5 has a (0) and c (2) -> a,
    # although a dominates the older history
    assert positive_case([1, 1, 1, 1, 4, 4], 5, cat, np.random.default_rng(0), window=2) == 0
    assert positive_case([1, 1, 1, 1, 4, 4], 5, cat, np.random.default_rng(0), window=6) == 2
    # empty history: every tag of the target ties at 0 -> each is reachable
    picks = {positive_case([], 7, cat, np.random.default_rng(s)) for s in range(60)}
    assert picks == {0, 1, 2, 3}
    # deterministic with a seed
    assert positive_case([], 7, cat, np.random.default_rng(9)) == positive_case([], 7, cat, np.random.default_rng(9))


def test_negative_case_most_frequent_absent_tag():
    cat, rng = tiny_catalogue(), np.random.default_rng(0)
    # recent: a x3, b x2, c x1; target 4 (c) lacks a and b -> a
    assert negative_case([1, 2, 3, 5], 4, cat, rng) == 0
    # target 1 (a) lacks b (2) and c (1) -> b
    assert negative_case([1, 2, 3, 5], 1, cat, rng) == 1
    # every recent tag is the target's -> None
    assert negative_case([1, 1, 3], 3, cat, rng) is None
    # history with no tags -> None; a target without tags lacks everything
    assert negative_case([6, 6], 1, cat, rng) is None
    assert negative_case([2, 2, 1], 6, cat, rng) == 1
    # ties (a x1, b x1 against target 4) are broken at random
    assert {negative_case([1, 2], 4, cat, np.random.default_rng(s)) for s in range(60)} == {0, 1}


def test_choose_vectorised_matches_rules():
    counts = np.array([[3, 2, 1, 0], [0, 0, 0, 0], [1, 1, 0, 5]])
    tt = np.array([[True, True, False, False], [False] * 4, [False, False, True, True]])
    noise = np.zeros((3, 4))
    assert choose_positive(counts, tt, noise).tolist() == [1, NO_TAG, 2]
    assert choose_negative(counts, tt, noise).tolist() == [2, NO_TAG, 0]


def case_dataset():
    cat = tiny_catalogue()
    seqs = [np.array([1, 2, 3, 5, 7]),   # test: hist 1 2 3 5 -> 7; valid: hist 1 2 3 -> 5
            np.array([1, 1, 3, 3]),      # test target 3 (a, b); recent a x4, b x2: positive b, negative None
            np.array([2, 6]),            # too short: not evaluated
            np.array([4, 2, 2, 6]),      # test target 6 has no tags: positive None, negative b (2) > c (1)
            np.array([5, 5, 4, 1])]      # test target 1 (a); recent a x2, c x3 -> positive a, negative c
    return Dataset("cases", cat, [f"u{k}" for k in range(5)], seqs)


def test_build_eval_cases_hand_computed():
    ds = case_dataset()
    std = build_eval_cases(ds, task="standard")
    assert std.users.tolist() == [0, 1, 3, 4] and (std.pos_tag == -1).all() and (std.neg_tag == -1).all()
    pos = build_eval_cases(ds, task="positive")
    assert pos.users.tolist() == [0, 1, 4]
    assert pos.targets.tolist() == [7, 3, 1]
    assert pos.pos_tag.tolist() == [3, 1, 0] and (pos.neg_tag == -1).all()
    assert pos.histories[0].tolist() == [1, 2, 3, 5]
    assert pos.padded(3).tolist() == [[2, 3, 5], [1, 1, 3], [5, 5, 4]]
    assert pos.tag_names == ["a", "b", "c", "d"]
    neg = build_eval_cases(ds, task="negative")
    assert neg.users.tolist() == [3, 4] and neg.neg_tag.tolist() == [1, 2] and (neg.pos_tag == -1).all()
    comp = build_eval_cases(ds, task="compound")
    assert comp.users.tolist() == [4]
    assert comp.pos_tag.tolist() == [0] and comp.neg_tag.tolist() == [2]
    val = build_eval_cases(ds, split="valid", task="positive")
    assert val.targets.tolist()[0] == 5 and val.histories[0].tolist() == [1, 2, 3]
    assert val.pos_tag.tolist()[0] == 2                       # target 5: a (2) vs c (0) -> c
    assert len(build_eval_cases(ds, task="positive", max_users=2)) == 2
    sub = pos.subset([2, 0])
    assert sub.users.tolist() == [4, 0] and sub.pos_tag.tolist() == [0, 3]
    with pytest.raises(ValueError):
        build_eval_cases(ds, task="sideways")
    with pytest.raises(ValueError):
        build_eval_cases(ds, split="train")


def test_build_eval_cases_synthetic_invariants_and_seed():
    ds = make_synthetic(num_users=300, seed=4)
    m = ds.catalogue.item_tags
    a = build_eval_cases(ds, task="compound", seed=1)
    b = build_eval_cases(ds, task="compound", seed=1)
    c = build_eval_cases(ds, task="compound", seed=2)
    assert np.array_equal(a.pos_tag, b.pos_tag) and np.array_equal(a.neg_tag, b.neg_tag)
    assert not (np.array_equal(a.pos_tag, c.pos_tag) and np.array_equal(a.neg_tag, c.neg_tag))
    assert m[a.targets, a.pos_tag].all() and not m[a.targets, a.neg_tag].any()
    assert (a.pos_tag != a.neg_tag).all()
    for h, t, p, n in zip(a.histories, a.targets, a.pos_tag, a.neg_tag):
        recent = m[h[-10:]].sum(0)
        assert recent[p] == recent[m[t]].min()                # least frequent target tag
        assert recent[n] == recent[~m[t]].max() >= 1          # most frequent absent tag
    # a user's tie-breaking does not depend on max_users
    short = build_eval_cases(ds, task="compound", seed=1, max_users=50)
    k = len(short)
    assert np.array_equal(short.pos_tag, a.pos_tag[:k]) and np.array_equal(short.neg_tag, a.neg_tag[:k])


# ---------------------------------------------------------------------------------------------
# stage-3 sampler
# ---------------------------------------------------------------------------------------------

def test_sampler_shapes_and_invariants():
    ds = make_synthetic(num_users=400, seed=7)
    m = ds.catalogue.item_tags
    rng = np.random.default_rng(0)
    users = rng.integers(0, ds.num_users, 512)
    b = sample_steering_batch(ds, users, rng, mix=(0.4, 0.4, 0.2), max_len=30)
    B = len(b)
    assert B == 512 and b.histories.shape == (B, 30)
    for arr in (b.users, b.histories, b.lengths, b.targets, b.kind, b.pos_tag, b.neg_tag):
        assert arr.dtype == np.int64
    for j in range(B):
        train = ds.train_sequence(int(b.users[j]))
        n = int(b.lengths[j])
        assert 1 <= n <= len(train) - 1
        assert b.targets[j] == train[n]                                # target = next item
        tail = train[:n][-30:]
        assert b.histories[j, 30 - len(tail):].tolist() == tail.tolist()
        assert (b.histories[j, :30 - len(tail)] == 0).all()
    kinds = np.bincount(b.kind, minlength=4)
    assert kinds[KIND_POSITIVE] > 150 and kinds[KIND_NEGATIVE] > 150 and kinds[KIND_COMPOUND] > 60
    has_pos = (b.kind == KIND_POSITIVE) | (b.kind == KIND_COMPOUND)
    has_neg = (b.kind == KIND_NEGATIVE) | (b.kind == KIND_COMPOUND)
    assert (b.pos_tag[~has_pos] == NO_TAG).all() and (b.neg_tag[~has_neg] == NO_TAG).all()
    assert m[b.targets[has_pos], b.pos_tag[has_pos]].all()          # pos tag is a tag of the target
    assert not m[b.targets[has_neg], b.neg_tag[has_neg]].any()      # neg tag is one the target lacks


def test_sampler_prefers_rare_and_frequent_recent_tags():
    ds = make_synthetic(num_users=300, seed=8)
    m = ds.catalogue.item_tags
    rng = np.random.default_rng(1)
    b = sample_steering_batch(ds, np.arange(300), rng, mix=(0, 0, 1), prefer=1.0, window=10, max_len=200)
    hist = b.histories
    for j in np.flatnonzero(b.kind == KIND_COMPOUND):
        recent = m[hist[j][hist[j] > 0][-10:]].sum(0)
        assert recent[b.pos_tag[j]] == recent[m[b.targets[j]]].min()
        assert recent[b.neg_tag[j]] == recent[~m[b.targets[j]]].max()
    # prefer=0: tags spread over every valid choice, not only the rare / frequent ones
    b0 = sample_steering_batch(ds, np.repeat(np.arange(300), 4), np.random.default_rng(1), mix=(1, 0, 0),
                               prefer=0.0, max_len=200)
    rarest = []
    for j in range(len(b0)):
        recent = m[b0.histories[j][b0.histories[j] > 0][-10:]].sum(0)
        rarest.append(recent[b0.pos_tag[j]] == recent[m[b0.targets[j]]].min())
    assert np.mean(rarest) < 0.95


def test_sampler_mix_fallbacks_and_short_users():
    cat = tiny_catalogue()
    # user 0: every target has tags; user 1: targets without tags (6); user 2: too short (1 item)
    ds = Dataset("s", cat, ["a", "b", "c"], [np.array([1, 2, 4, 3]), np.array([1, 6, 6, 6, 6]),
                                             np.array([2])])
    rng = np.random.default_rng(0)
    b = sample_steering_batch(ds, [0, 1, 2] * 20, rng, mix=(1, 0, 0))
    assert len(b) == 40 and 2 not in b.users.tolist()               # a 1-item user is dropped
    assert (b.kind[b.users == 0] == KIND_POSITIVE).all()
    assert (b.kind[b.users == 1] == KIND_NONE).all()                # no tag on the target: no prompt
    b = sample_steering_batch(ds, [1] * 20, rng, mix=(0, 0, 1))
    assert (b.kind == KIND_NEGATIVE).all() and (b.neg_tag >= 0).all()  # compound degrades to negative
    b = sample_steering_batch(ds, [0] * 50, rng, mix=(0, 0, 0, 1))
    assert (b.kind == KIND_NONE).all() and (b.pos_tag == -1).all() and (b.neg_tag == -1).all()
    with pytest.raises(ValueError):
        sample_steering_batch(ds, [0], rng, mix=(1, 1))
    with pytest.raises(ValueError):
        sample_steering_batch(ds, [0], rng, mix=(0, 0, 0))


def test_sampler_is_seeded_and_fast():
    ds = make_synthetic(num_users=1000, seed=0)
    users = np.arange(128)
    a = sample_steering_batch(ds, users, np.random.default_rng(3))
    b = sample_steering_batch(ds, users, np.random.default_rng(3))
    assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in
               ("histories", "targets", "kind", "pos_tag", "neg_tag"))
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for _ in range(20):
        sample_steering_batch(ds, rng.integers(0, 1000, 128), rng)
    per_batch = (time.perf_counter() - t0) / 20
    assert per_batch < 0.02, f"{per_batch * 1e3:.1f} ms per batch of 128"


def test_sampler_cut_covers_every_prefix_length():
    cat = tiny_catalogue()
    ds = Dataset("c", cat, ["a"], [np.array([1, 2, 3, 4, 5, 7, 1])])   # train sequence: 1 2 3 4 5
    b = sample_steering_batch(ds, [0] * 400, np.random.default_rng(0), mix=(1, 0, 0))
    assert set(b.lengths.tolist()) == {1, 2, 3, 4}
    assert {(n, t) for n, t in zip(b.lengths.tolist(), b.targets.tolist())} == {(1, 2), (2, 3), (3, 4), (4, 5)}


@pytest.mark.parametrize("num_tags", [1, 2, 3])
def test_synthetic_few_tags_and_tiny_catalogue(num_tags):
    ds = make_synthetic(num_users=20, num_items=4, num_tags=num_tags, seq_len=(1, 4), seed=num_tags)
    assert ds.catalogue.num_tags == num_tags
    assert all(1 <= len(t) <= min(3, num_tags) for t in ds.catalogue.tags)
    assert all(len(np.unique(s)) == len(s) and 1 <= len(s) <= 4 for s in ds.sequences)
