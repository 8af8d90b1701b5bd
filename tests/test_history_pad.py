"""The native history padding (kernels/history_pad*) against its numpy reference and the engine's row-by-row
specification (``pad_histories``): random batches, odd widths, empty rows, rows longer than the width, and bad
offsets refused with a named reason instead of a stray read."""

from __future__ import annotations

import numpy as np
import pytest

from dpr.kernels import history_pad

needs_lib = pytest.mark.skipif(history_pad.library() is None,
                               reason="libdpr_id_index.so (history padding) is not built (python -m dpr.kernels.build)")


def _rows_reference(flat, offsets, width):
    """Row by row, the plainest form: the most recent ``width`` items right-aligned, zeros before them."""
    out = np.zeros((len(offsets) - 1, width), np.int64)
    for i in range(len(offsets) - 1):
        row = flat[offsets[i]:offsets[i + 1]][-width:]
        if len(row):
            out[i, width - len(row):] = row
    return out


def _batch(rng, rows, width):
    lens = rng.integers(0, 3 * width + 2, rows)
    lens[rng.random(rows) < 0.2] = 0                         # empty rows
    offsets = np.zeros(rows + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    return rng.integers(1, 10_000, int(offsets[-1])).astype(np.int64), offsets


@pytest.mark.parametrize("rows,width", [(0, 5), (1, 1), (3, 7), (17, 13), (64, 200), (513, 33)])
def test_reference_matches_rows(rows, width):
    rng = np.random.default_rng(rows * 31 + width)
    flat, offsets = _batch(rng, rows, width)
    np.testing.assert_array_equal(history_pad.pad_flat_reference(flat, offsets, width),
                                  _rows_reference(flat, offsets, width))


@needs_lib
@pytest.mark.parametrize("rows,width", [(0, 5), (1, 1), (3, 7), (17, 13), (64, 200), (513, 33), (5, 1000)])
def test_native_matches_reference(rows, width):
    rng = np.random.default_rng(rows * 17 + width)
    flat, offsets = _batch(rng, rows, width)
    got = history_pad.pad_flat(flat, offsets, width)
    assert got.dtype == np.int64 and got.shape == (rows, width) and got.flags.c_contiguous
    np.testing.assert_array_equal(got, _rows_reference(flat, offsets, width))


@needs_lib
def test_native_takes_other_integer_dtypes_and_views():
    rng = np.random.default_rng(3)
    flat, offsets = _batch(rng, 40, 9)
    wide = np.stack([flat, -flat], axis=1)[:, 0]              # a strided view (not C-contiguous)
    assert not wide.flags.c_contiguous
    np.testing.assert_array_equal(history_pad.pad_flat(wide, offsets.astype(np.int32), 9),
                                  _rows_reference(flat, offsets, 9))
    np.testing.assert_array_equal(history_pad.pad_flat(flat.astype(np.int32), offsets, 9),
                                  _rows_reference(flat, offsets, 9))


@needs_lib
@pytest.mark.parametrize("offsets,match", [
    ([1, 3], "start at 0"),                 # does not start at 0
    ([0, 4, 2], "never decrease"),         # decreasing
    ([0, 2, 9], "end within the flat array"),             # past the end of the flat array
])
def test_native_refuses_bad_offsets(offsets, match):
    flat = np.arange(1, 6, dtype=np.int64)
    with pytest.raises(ValueError, match=match):
        history_pad.pad_flat(flat, np.asarray(offsets, np.int64), 4)


@needs_lib
def test_native_refuses_a_zero_width():
    with pytest.raises(ValueError, match="width >= 1"):
        history_pad.pad_flat(np.arange(1, 4, dtype=np.int64), np.array([0, 3]), 0)
