"""Vectors in: the stages that take arrays (``Engine.retrieve`` takes user vectors, ``Engine.encode_users`` takes
prompt vectors, presence flags and padded item indices). NaN, Inf, wrong shapes, wrong dtypes and impossible
values must be an InputError naming the input, never a silently wrong answer or another exception type.

The tests at the end were strict xfails documenting engine bugs found here (encode_users took NaN prompt
vectors, presence flags other than 0/1 and indices outside 0..N; an enormous k was a MemoryError); fixed in
engine/pipeline.py and engine/retrieval/base.py, they now assert the InputError.
"""

from __future__ import annotations

import os
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dpr.errors import InputError

LONG = os.environ.get("DPR_FUZZ") == "long"
SCALE = int(os.environ.get("DPR_FUZZ_SCALE", "25")) if LONG else 1


def _fuzz(n: int):
    return settings(max_examples=n * SCALE, derandomize=not LONG, database=None, deadline=timedelta(seconds=10),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], print_blob=True)


def test_retrieve_refuses_non_finite_or_misshapen_queries(engine):
    dim = engine.retrieval_dim
    probe = np.random.default_rng(0).standard_normal((2, dim)).astype(np.float32)
    want = engine.retrieve(probe, 5)
    non_finite = st.sampled_from([np.nan, np.inf, -np.inf])

    @_fuzz(150)
    @given(rows=st.integers(1, 4), bad=st.one_of(
        st.tuples(st.just("nan"), st.integers(0, 10 ** 6), non_finite),
        st.tuples(st.just("shape"), hnp.array_shapes(min_dims=1, max_dims=3, max_side=dim + 2)
                  .filter(lambda s: len(s) != 2 or s[1] != dim), st.just(0.0)),
        st.tuples(st.just("dtype"), st.sampled_from(["U3", "O", "S2", "c8"]), st.just(0.0))))
    def run(rows, bad):
        kind, arg, value = bad
        if kind == "nan":
            q = np.zeros((rows, dim), np.float32)
            q.flat[arg % q.size] = value
            pat = r"NaN or infinite"
        elif kind == "shape":
            q, pat = np.zeros(arg, np.float32), r"queries must"
        else:
            q, pat = np.zeros((rows, dim)).astype(arg), r"queries"
        with pytest.raises(InputError, match=pat):
            engine.retrieve(q, 5)
        got = engine.retrieve(probe, 5)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])

    run()


# ---- engine bugs, fixed and asserted ---------------------------------------------------------------------------------

def _prompt_inputs(engine, value):
    b = 2
    p = np.zeros((b, engine.dim), np.float32)
    p[1, 3] = value
    return [[engine.item_ids[0]], [engine.item_ids[1], engine.item_ids[2]]], p, np.array([[0, 0], [1, 0]])


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_encode_users_refuses_non_finite_prompt_vectors(engine, value):
    hist, p, presence = _prompt_inputs(engine, value)
    with pytest.raises(InputError, match=r"p_pos"):
        engine.encode_users(hist, p, None, presence)


def test_encode_users_refuses_presence_flags_other_than_0_or_1(engine):
    hist, p, _ = _prompt_inputs(engine, 0.5)
    with pytest.raises(InputError, match=r"presence"):
        engine.encode_users(hist, p, None, np.array([[5, 0], [-1, 7]]))


@pytest.mark.parametrize("index", [-5, "N+1"])
def test_encode_users_refuses_item_indices_out_of_range(engine, index):
    seq = np.zeros((1, engine.max_len), np.int64)
    seq[0, -1] = engine.num_items + 1 if index == "N+1" else index
    with pytest.raises(InputError, match=r"item_seq"):
        try:
            engine.encode_users(seq)
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - another type is the bug this documents
            pytest.fail(f"{type(exc).__name__} instead of an InputError: {exc}")


def test_retrieve_refuses_an_enormous_k(engine):
    q = np.zeros((1, engine.retrieval_dim), np.float32)
    try:
        engine.retrieve(q, 10 ** 15)
    except InputError as exc:
        assert "k" in str(exc)
        return
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"{type(exc).__name__} instead of an InputError: {str(exc)[:200]}")
    pytest.fail("k=10**15 was accepted")
