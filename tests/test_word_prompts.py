"""Vocabulary words as stand-in prompts (dpr.train.word_prompts): which words are kept, how rows are replaced,
how titles and words share the rows, and what training records."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpr.data.prompts import PromptBank
from dpr.eval.protocol import build_context
from dpr.train.title_prompts import TitlePrompts
from dpr.train.word_prompts import StandIns, WordPrompts, tag_prototypes, vocabulary


class _Tok:
    def __init__(self, words):
        self.words = words

    def get_vocab(self):
        return {w: i for i, w in enumerate(self.words)}


def test_vocabulary_keeps_whole_lower_case_words_in_id_order():
    tok = _Tok(["[PAD]", "[CLS]", "##ing", "the", "of", "comedy", "42", "Paris", "don't", "laugh", "a"])
    assert vocabulary(tok) == ["the", "comedy", "laugh"]


def test_words_are_nearest_their_own_tag_by_the_margin(small_dataset, text_encoder):
    cat = small_dataset.catalogue
    ctx = build_context(text_encoder, cat, PromptBank())
    titles = TitlePrompts(text_encoder, cat)
    wp = WordPrompts(text_encoder, ctx, cat.num_tags, titles=titles, per_tag=7, margin=0.01)
    proto = tag_prototypes(ctx, cat.num_tags, titles)
    assert len(wp.words) == cat.num_tags and (wp.count <= 7).all() and wp.count.sum() > 0
    vocab = set(vocabulary(text_encoder.tokenizer))
    for t, words in enumerate(wp.words):
        if not words:
            continue
        assert set(words) <= vocab
        emb = text_encoder.encode(words).float()
        sim = emb @ proto.t()
        assert (sim.argmax(1) == t).all(), (t, words)
        second = sim.topk(2, dim=1).values[:, 1] if cat.num_tags > 1 else sim[:, 0] - 1
        assert (sim[:, t] - second >= 0.01 - 1e-5).all()
        assert (sim[:, t][:-1] >= sim[:, t][1:] - 1e-5).all()            # nearest first
        rows = torch.from_numpy(wp.start[t] + np.arange(wp.count[t]))
        torch.testing.assert_close(wp.embeddings[rows], emb, atol=1e-5, rtol=1e-5)
    # a stricter margin keeps a subset
    strict = WordPrompts(text_encoder, ctx, cat.num_tags, titles=titles, per_tag=7, margin=0.2)
    assert all(set(s) <= set(w) or len(w) == 7 for s, w in zip(strict.words, wp.words))
    assert strict.count.sum() <= wp.count.sum()


def test_stand_ins_give_each_row_at_most_one_and_respect_the_shares(small_dataset, text_encoder):
    cat = small_dataset.catalogue
    ctx = build_context(text_encoder, cat, PromptBank())
    titles = TitlePrompts(text_encoder, cat)
    words = WordPrompts(text_encoder, ctx, cat.num_tags, titles=titles, per_tag=20, margin=0.0)
    have = np.flatnonzero((words.count > 0) & (titles.count > 0))
    assert have.size
    tags = np.concatenate([np.resize(have, 4000), [-1] * 100])
    emb = torch.full((len(tags), text_encoder.dim), 7.0)
    mix = StandIns([(titles, 0.3), (words, 0.2)])
    out = mix.mix(emb, tags, np.random.default_rng(0))
    assert torch.equal(out[tags < 0], emb[tags < 0])                     # no prompt stays no prompt
    title_emb = titles.embeddings
    kinds = []
    for r in range(len(tags) - 100):
        if torch.equal(out[r], emb[r]):
            kinds.append("kept")
            continue
        t = tags[r]
        w = words.embeddings[torch.from_numpy(words.start[t] + np.arange(words.count[t]))]
        is_word = bool(torch.isclose(w, out[r], atol=1e-6).all(1).any())
        items = titles.flat[titles.start[t]:titles.start[t] + titles.count[t]]
        is_title = bool(torch.isclose(title_emb[torch.from_numpy(items)], out[r], atol=1e-6).all(1).any())
        assert is_word or is_title, r                                     # a stand-in of the row's own tag
        kinds.append("word" if is_word else "title")
    kinds = np.array(kinds)
    assert abs((kinds == "title").mean() - 0.3) < 0.04
    assert abs((kinds == "word").mean() - 0.2) < 0.04
    assert not StandIns([(titles, 0.0), (None, 0.5)])                     # nothing to mix: falsy, untouched
    assert torch.equal(StandIns([]).mix(emb, tags, np.random.default_rng(0)), emb)
    with pytest.raises(ValueError, match="add up to"):
        StandIns([(titles, 0.7), (words, 0.5)])


def test_title_only_stand_ins_draw_as_title_prompts_did(small_dataset, text_encoder):
    """The title-only mix is the same random stream as TitlePrompts.mix (so earlier recipes train the same)."""
    cat = small_dataset.catalogue
    titles = TitlePrompts(text_encoder, cat)
    tags = np.array([k % cat.num_tags for k in range(300)] + [-1] * 7)
    emb = torch.randn(len(tags), text_encoder.dim, generator=torch.Generator().manual_seed(0))
    a = titles.mix(emb, tags, np.random.default_rng(5), 0.3)
    b = StandIns([(titles, 0.3)]).mix(emb, tags, np.random.default_rng(5))
    assert torch.equal(a, b)


def test_training_records_the_word_prompt_choice(small_dataset, text_encoder, tmp_path):
    from dpr.config import ModelConfig, TrainConfig
    from dpr.train.pipeline import train

    mcfg = ModelConfig(num_items=small_dataset.num_items, d=16, max_len=20, num_tags=small_dataset.catalogue.num_tags,
                       text_dim=text_encoder.dim)
    tcfg = TrainConfig(stage1_epochs=1, stage2_epochs=1, stage2_steps_per_epoch=3, stage3_epochs=1,
                       stage3_steps_per_epoch=3, pos_lambda=0.0, pos_keep_lambda=0.0, stage3_calibrate=False,
                       word_prompt_share=-1.0, title_prompt_share=0.0, batch_size=16)
    logs = []
    ck = train(small_dataset, mcfg, tcfg, text_encoder=text_encoder, log=logs.append)
    chosen = ck.meta["auto"]["chosen"]["word_prompt_share"]
    assert chosen["value"] in (0.0, 0.3) and "tags" in chosen["reason"]
    assert ck.train_config.word_prompt_share == chosen["value"]
    assert any(m.startswith("auto: word_prompt_share") for m in logs)
    assert set(ck.meta["word_prompts"]) == set(small_dataset.catalogue.tag_names)
