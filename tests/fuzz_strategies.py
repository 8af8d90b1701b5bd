"""Fuzz values shared by the fuzz test files (the engine's, the HTTP service's, Triton's). Not a test module: pytest
runs with ``--import-mode=importlib``, which puts no test folder on ``sys.path``, so conftest.py registers this
file as the module ``dpr_tests_fuzz_strategies`` and the test files import it under that name.
"""

from __future__ import annotations

import os
from datetime import timedelta

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

LONG = os.environ.get("DPR_FUZZ") == "long"
SCALE = int(os.environ.get("DPR_FUZZ_SCALE", "25")) if LONG else 1


def fuzz_settings(n: int, deadline_s: float = 10.0):
    """``n`` examples (times ``DPR_FUZZ_SCALE`` under ``make fuzz``), derandomized in CI (the same examples every
    run, no example database), a per-example deadline that detects a hang (not a speed assertion)."""
    return settings(max_examples=n * SCALE, derandomize=not LONG, database=None,
                    deadline=timedelta(seconds=deadline_s),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much], print_blob=True)


ANY_CODEPOINTS = st.lists(st.integers(0, 0x10FFFF), max_size=10).map(lambda cps: "".join(map(chr, cps)))
WEIRD_TEXT = st.one_of(st.text(max_size=10), ANY_CODEPOINTS,
                       st.sampled_from(["", "\x00", "i1\x00", " i1", "I1", "i01", "i-1", "\ud800", "i1\udfff"]))
BLANK = st.text(st.sampled_from(" \t\n\r\x0b\x0c\x1c\x1f\x85\xa0\u1680\u2003\u2028\u3000"), max_size=8)
LONE_SURROGATE = st.tuples(st.text(max_size=5), st.integers(0xD800, 0xDFFF), st.text(max_size=5)).map(
    lambda t: t[0] + chr(t[1]) + t[2])


def decodes(b: bytes) -> bool:
    try:
        bytes(b).decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


BAD_UTF8 = st.one_of(st.binary(min_size=1, max_size=16).filter(lambda b: not decodes(b)),
                     st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"ok \xe2\x82", bytearray(b"\x80x")]))

# ---- JSON: what a body can carry -------------------------------------------------------------------------

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
                         st.floats(allow_nan=False, allow_infinity=False), WEIRD_TEXT)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)), max_leaves=6)
NOT_A_LIST = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=6),
                       st.dictionaries(st.text(max_size=3), JSON_SCALARS, max_size=2))
NOT_A_STRING = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=False),
                         st.lists(JSON_SCALARS, max_size=2), st.dictionaries(st.text(max_size=2), JSON_SCALARS,
                                                                             max_size=2))
NOT_A_BOOL = st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), st.text(max_size=4),
                       st.lists(st.booleans(), max_size=2))


def bad_json_k(max_k: int):
    """JSON values no k can be: not an integer (2.0 and true too: never coerced), or out of 1..max_k (up to a
    100-digit number)."""
    return st.one_of(st.integers(max_value=0), st.integers(min_value=max_k + 1, max_value=10 ** 100),
                     st.booleans(), st.floats(allow_nan=False), st.text(max_size=3), st.none(),
                     st.lists(st.integers(1, 3), max_size=2), st.sampled_from([2.0, "10", 10 ** 15, 2 ** 64]))


# v2 tensors: a drawn bad value for one field of an input must differ from that field's valid value
V2_DATATYPES = {"history": "BYTES", "prompt": "BYTES", "k": "INT32"}


def never_valid(inp: dict, part: str, value):
    """``value`` for ``inp[part]`` (a v2 input's datatype or shape), moved off the valid one when the draw hit it."""
    if part == "datatype" and value == V2_DATATYPES[inp["name"]]:
        return "FP64"
    if part == "shape" and value == inp["shape"]:
        return value + [1]
    return value
