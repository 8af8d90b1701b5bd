"""The column checks the fast readers share (dpr.serve.tensors.padding_hole, dpr.serve.columns.prompt_texts)
against plain per-element specifications, on random and edge-case columns."""

from __future__ import annotations

import numpy as np
import pytest

from dpr.serve.columns import prompt_texts
from dpr.serve.tensors import padding_hole


def hole_by_scan(keep: np.ndarray):
    """The specification: the first (row, position) of an empty element with an id before and after it."""
    for r, row in enumerate(keep.tolist()):
        for c, here in enumerate(row):
            if not here and any(row[:c]) and any(row[c + 1:]):
                return r, c
    return None


def test_padding_hole_matches_the_scan_on_random_rows():
    rng = np.random.default_rng(7)
    seen_hole = seen_none = 0
    for trial in range(600):
        b, w = int(rng.integers(1, 9)), int(rng.integers(1, 12))
        lens = rng.integers(0, w + 1, b)
        lead = np.array([rng.integers(0, w - n + 1) for n in lens])
        keep = (np.arange(w)[None, :] >= lead[:, None]) & (np.arange(w)[None, :] < (lead + lens)[:, None])
        if trial % 2:                                         # punch holes into some rows
            keep &= rng.random((b, w)) > 0.15
        want = hole_by_scan(keep)
        assert padding_hole(keep) == want, keep.astype(int)
        seen_hole += want is not None
        seen_none += want is None
    assert seen_hole > 100 and seen_none > 100               # both answers were exercised


@pytest.mark.parametrize("rows, want", [
    ([[1, 0, 1]], (0, 1)),
    ([[0, 0, 0], [1, 1, 1], [0, 1, 1]], None),               # an empty row, a full row, leading padding
    ([[1, 1, 0], [1, 0, 0], [0, 0, 1]], None),               # trailing and leading padding
    ([[0, 1, 0, 0, 1, 0]], (0, 2)),                          # the first of two empties in the hole
    ([[1, 1, 1, 1], [0, 1, 0, 1], [1, 0, 1, 1]], (1, 2)),    # the first row that has one
    ([[1, 0], [0, 1]], None),                                # too narrow for a hole
])
def test_padding_hole_edge_cases(rows, want):
    keep = np.array(rows, dtype=bool)
    assert padding_hole(keep) == want == hole_by_scan(keep)


def texts_by_element(raw: list, max_bytes: int):
    """The specification of prompt_texts, one element at a time."""
    if any(len(x) > max_bytes for x in raw):
        return False
    try:
        out = [x.decode("utf-8") for x in raw]
    except UnicodeDecodeError:
        return False
    if not any(out):
        return None
    if any(x != "" and x.strip() == "" for x in out):
        return False
    return [x or None for x in out]


@pytest.mark.parametrize("raw", [
    [b"funny", b"", b"no horror"],
    [b"", b""],
    [],
    [b"  ", b"x"],                                           # blank
    [b"\t\n", b""],
    ["\u3000".encode(), b"x"],                               # ideographic space: blank too
    ["\u00a0x".encode()],                                    # a space then a letter: not blank
    [b"caf\xc3\xa9", b"\xff"],                               # not UTF-8
    [b"a\x00b", b"c"],                                       # a NUL inside: decoded one by one
    [b"x" * 9],                                              # over the limit
    [b"x" * 8, b" y "],
])
def test_prompt_texts_match_the_element_by_element_reading(raw):
    assert prompt_texts(raw, 8) == texts_by_element(raw, 8)
