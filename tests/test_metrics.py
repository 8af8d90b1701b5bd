"""Metrics and ranking against hand-computed rankings."""

import math

import numpy as np
import torch

from dpr.eval.metrics import ndcg_at_k, recall_at_k, tag_share_at_k, target_ranks
from dpr.eval.ranking import filter_candidates, topk_full


def test_ndcg_recall_hand_computed():
    top = np.array([[5, 3, 9], [1, 2, 4], [7, -1, -1]])
    tgt = np.array([3, 8, 7])
    assert target_ranks(top, tgt).tolist() == [1, -1, 0]
    nd = ndcg_at_k(top, tgt, 3)
    assert math.isclose(nd[0], 1 / math.log2(3)) and nd[1] == 0 and nd[2] == 1.0
    assert recall_at_k(top, tgt, 3).tolist() == [1, 0, 1]
    assert recall_at_k(top, tgt, 1).tolist() == [0, 0, 1]      # cut-off honoured


def test_tag_share():
    tags = np.zeros((6, 2), dtype=bool)
    tags[[1, 2, 3], 0] = True
    tags[[4], 1] = True
    top = np.array([[1, 2, 4, 5], [4, -1, -1, -1]])
    share = tag_share_at_k(top, tags, np.array([0, 1]), 4)
    assert share.tolist() == [0.5, 0.25]


def test_topk_full_masks_history_padding_and_filters():
    items = torch.tensor([[0.0, 0.0], [1, 0], [2, 0], [3, 0], [4, 0]])
    users = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    hist = torch.tensor([[0, 4], [0, 0]])
    top = topk_full(users, items, 3, hist)
    assert top.tolist() == [[3, 2, 1], [4, 3, 2]]
    allowed = torch.tensor([[True, True, False, True, True], [False, True, True, False, False]])
    top = topk_full(users, items, 3, hist, allowed=allowed)
    assert top.tolist() == [[3, 1, -1], [2, 1, -1]]          # fewer eligible than k -> -1


def test_filter_candidates_keeps_order():
    cand = np.array([[9, 8, 7, 6], [1, 2, 3, 4]])
    keep = np.array([[False, True, False, True], [True, True, True, True]])
    assert filter_candidates(cand, keep, 3).tolist() == [[8, 6, -1], [1, 2, 3]]
