"""The native /recommend body parser (kernels/recommend_parse_cpu.cc) against its specification, the Python path it
stands in for: ``dpr.serve.lean.parse`` (json.loads and the route's checks), then every history id looked up in
the catalogue. Where the parser accepts a body, its columns must equal that path's values; where it declines one
the path accepts, the body must be one of the documented declines (a key written twice or with an escape, a k of
more than 18 digits, a UTF-8 byte-order mark). Random valid bodies (any field order, optional fields, whitespace,
escapes, non-ASCII ids and prompts) must all be accepted, and byte-level mutations of them must never be accepted
with other values than the Python path reads."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest

from dpr.kernels import id_index, recommend_parse
from dpr.serve import lean

pytestmark = pytest.mark.skipif(recommend_parse.library() is None,
                                reason="libdpr_id_index.so is not built (python -m dpr.kernels.build)")

IDS = ["i1", "i2", "i3", "item-42", "é", "日本", "x\"y", "back\\slash", "tab\there", "😀", "", "a/b",
       "a" * 9, "b" * 70, "  spaced  "] + [f"m{i}" for i in range(300)]
TO_INDEX = {x: i + 1 for i, x in enumerate(IDS)}


@pytest.fixture(scope="module")
def index():
    ix = id_index.IdIndex(IDS)
    yield ix
    ix.close()


def reference(body: bytes):
    """What the Python path makes of ``body``: the columns, or None where it leaves the body to the route or an
    id is not in the catalogue (the service then answers through the Python path)."""
    got = lean.parse(body, b"application/json")
    if got is None:
        return None
    reqs, single = got
    if any(r.hard_filter is not None for r in reqs):
        return None
    flat = [TO_INDEX.get(x, 0) for r in reqs for x in r.history]
    if 0 in flat:
        return None
    lens = [len(r.history) for r in reqs]
    prompts = [r.prompt for r in reqs]
    negs = [r.negative_prompt for r in reqs]
    return {"offsets": np.concatenate([[0], np.cumsum(lens)]).tolist(), "items": flat, "ks": [r.k for r in reqs],
            "exclude": [r.exclude_history for r in reqs],
            "prompts": prompts if any(p is not None for p in prompts) else None,
            "negatives": negs if any(p is not None for p in negs) else None, "single": single}


def native(index, body: bytes):
    p = recommend_parse.parse(index, body)
    if p is None:
        return None
    return {"offsets": p.offsets.tolist(), "items": p.items.tolist(), "ks": p.ks.tolist(),
            "exclude": p.exclude.tolist(), "prompts": p.prompts, "negatives": p.negatives, "single": p.single}


_KEY = rb'"(history|prompt|negative_prompt|k|exclude_history|hard_filter)"\s*:'


def documented_decline(body: bytes) -> bool:
    """A body the Python path accepts that the parser declines by design."""
    if body.startswith(b"\xef\xbb\xbf"):
        return True
    if re.search(rb'"[^"\\]*\\[^"]*"\s*:', body):             # a key with an escape
        return True
    if re.search(rb'"k"\s*:\s*-?\d{19,}', body):
        return True
    for obj in re.findall(rb"\{[^{}]*\}", body):               # a key twice in one object
        keys = re.findall(_KEY, obj)
        if len(keys) != len(set(keys)):
            return True
    return False


def check(index, body: bytes, must_accept: bool = False):
    ref, got = reference(body), native(index, body)
    if got is not None:
        assert got == ref, (body, got, ref)
    elif ref is not None:
        assert documented_decline(body), ("declined a plain body", body, ref)
    if must_accept:
        assert got is not None and got == ref, (body, got, ref)
    return got


def random_request(rng: random.Random) -> dict:
    d = {"history": [rng.choice(IDS) for _ in range(rng.randint(0, 12))]}
    texts = ["something funny", "no horror tonight", "é à 日本 😀", "quote \" and \\ slash", "line\nbreak\ttab",
             "\u0000nul", "  ", "a" * 300]
    if rng.random() < 0.6:
        d["prompt"] = rng.choice(texts + [None])
    if rng.random() < 0.3:
        d["negative_prompt"] = rng.choice(texts + [None])
    if rng.random() < 0.5:
        d["k"] = rng.choice([1, 3, 10, 0, -5, 1000, 10 ** 17, -(10 ** 17)])
    if rng.random() < 0.3:
        d["exclude_history"] = rng.random() < 0.5
    if rng.random() < 0.1:
        d["hard_filter"] = None
    keys = list(d)
    rng.shuffle(keys)
    return {k: d[k] for k in keys}


def dumps(rng: random.Random, value) -> bytes:
    """JSON text as clients write it: ASCII-escaped or raw UTF-8, compact or spaced, sometimes more whitespace."""
    text = json.dumps(value, ensure_ascii=rng.random() < 0.5,
                      separators=rng.choice([(",", ":"), (", ", ": "), (" ,\n", " :\t")]))
    if rng.random() < 0.3:
        text = "\r\n " + text + " \n\t"
    return text.encode("utf-8")


def test_random_valid_bodies_are_read_as_the_python_path_reads_them(index):
    rng = random.Random(0)
    for _ in range(1500):
        value = random_request(rng) if rng.random() < 0.3 else [random_request(rng)
                                                                 for _ in range(rng.randint(1, 20))]
        body = dumps(rng, value)
        check(index, body, must_accept=True)


def test_mutated_bodies_are_never_read_differently(index):
    rng = random.Random(1)
    alphabet = b'{}[]",:\\ \t\n\r0123456789-+.eEtrufalsn\x00\x1f\x7f\x80\xbf\xc0\xc3\xa9\xed\xa0\xf0\xf4\xff/ubU'
    accepted = declined = 0
    for _ in range(6000):
        value = random_request(rng) if rng.random() < 0.4 else [random_request(rng) for _ in range(rng.randint(1, 4))]
        body = bytearray(dumps(rng, value))
        for _ in range(rng.randint(1, 3)):
            op, at = rng.random(), rng.randrange(len(body) + 1)
            if op < 0.4 and at < len(body):
                body[at] = rng.choice(alphabet)
            elif op < 0.7:
                body[at:at] = bytes([rng.choice(alphabet)])
            elif at < len(body):
                del body[at]
        got = check(index, bytes(body))
        accepted += got is not None
        declined += got is None
    assert accepted > 300 and declined > 3000, (accepted, declined)   # the fuzz reached both sides


EDGE_BODIES = [
    # (body, accepted?)
    (b'{"history": ["i1"]}', True),
    (b'[{"history": ["i1"]}, {"history": []}]', True),                  # empty history: the route refuses it
    (b'{"history": ["i1"], "k": -0}', True),
    (b'{"history": ["i1"], "k": 0}', True),
    (b'{"history": ["i1"], "k": 999999999999999999}', True),
    (b'{"history": ["i1"], "k": 1000000000000000000}', False),         # 19 digits: declined by design
    (b'{"history": ["i1"], "k": 01}', False),
    (b'{"history": ["i1"], "k": 1.0}', False),
    (b'{"history": ["i1"], "k": 1e1}', False),
    (b'{"history": ["i1"], "k": NaN}', False),
    (b'{"history": ["i1"], "k": -Infinity}', False),
    (b'{"history": ["i1"], "k": true}', False),
    (b'{"history": ["i1"], "k": null}', False),
    (b'{"history": ["i1"], "k": "3"}', False),
    (b'{"history": ["i1"], "exclude_history": 1}', False),
    (b'{"history": ["i1"], "exclude_history": True}', False),
    (b'{"history": ["i1"], "exclude_history": false}', True),
    (b'{"history": ["i1"], "prompt": null, "negative_prompt": null}', True),
    (b'{"history": ["i1"], "prompt": 3}', False),
    (b'{"history": ["i1"], "prompt": ["a"]}', False),
    (b'{"history": ["i1"], "hard_filter": null}', True),
    (b'{"history": ["i1"], "hard_filter": {}}', False),
    (b'{"history": ["i1"], "hard_filter": {"include_tags": ["x"]}}', False),
    (b'{"history": ["i1"], "other": 1}', False),
    (b'{"history": ["i1"], "history": ["i2"]}', False),                 # twice: declined by design
    (b'{"hist\\u006fry": ["i1"]}', False),                              # escaped key: declined by design
    (b'{"history": null}', False),
    (b'{"history": "i1"}', False),
    (b'{"history": [1]}', False),
    (b'{"history": [["i1"]]}', False),
    (b'{"history": ["i1",]}', False),
    (b'[{"history": ["i1"]},]', False),
    (b'{"history": ["i1"]} x', False),
    (b'{"history": ["i1"]}{}', False),
    (b'{"history": ["i1"]', False),
    (b'{}', False),
    (b'[]', False),
    (b'[[]]', False),
    (b'"x"', False),
    (b'', False),
    (b'\xef\xbb\xbf{"history": ["i1"]}', False),                        # BOM: declined by design
    (b'\x0c{"history": ["i1"]}', False),                                # form feed is not JSON whitespace
    (b'{"history": ["i1"], "prompt": "a\\u00e9\\ud83d\\ude00"}', True),
    (b'{"history": ["i1"], "prompt": "\\ud800"}', False),               # lone surrogates
    (b'{"history": ["i1"], "prompt": "\\udc00x"}', False),
    (b'{"history": ["i1"], "prompt": "\\ud800\\u0041"}', False),
    (b'{"history": ["i1"], "prompt": "\xed\xa0\x80"}', False),          # a surrogate in UTF-8
    (b'{"history": ["i1"], "prompt": "\xc0\xaf"}', False),              # overlong
    (b'{"history": ["i1"], "prompt": "\xf4\x90\x80\x80"}', False),      # past U+10FFFF
    (b'{"history": ["i1"], "prompt": "\xc3"}', False),                  # truncated
    (b'{"history": ["i1"], "prompt": "\xc3\xa9\xe6\x97\xa5\xf0\x9f\x98\x80"}', True),
    (b'{"history": ["i1"], "prompt": "a\x01b"}', False),                # raw control character
    (b'{"history": ["i1"], "prompt": "a\x7fb"}', True),                 # DEL is not one
    (b'{"history": ["i1"], "prompt": "\\u0000"}', True),
    (b'{"history": ["i1"], "prompt": "\\x41"}', False),
    (b'{"history": ["i1"], "prompt": "\\u00G1"}', False),
    (b'{"history": ["i1"], "prompt": "\\/\\b\\f\\n\\r\\t\\"\\\\"}', True),
    (b'{"history": ["\\u00e9", "\\u65e5\\u672c", "x\\"y", "back\\\\slash", "\\ud83d\\ude00", ""]}', True),
    (b'{"history": ["i1", "no-such-id"]}', False),                      # unknown id: the Python path names it
    (b'{"history": ["i1\\u0000"]}', False),
]


@pytest.mark.parametrize("body,accepted", EDGE_BODIES, ids=[repr(b[:40]) for b, _ in EDGE_BODIES])
def test_edge_bodies(index, body, accepted):
    got = check(index, body)
    assert (got is not None) == accepted, (body, got, reference(body))


def test_decline_and_unknown_statuses_say_where(index):
    st, p, where = recommend_parse.parse_status(index, b'{"history": ["i1"], "k": 1.5}')
    assert (st, p) == (recommend_parse.DECLINED, None) and where == len(b'{"history": ["i1"], "k": 1')
    st, p, where = recommend_parse.parse_status(index, b'[{"history": ["i1", "i2"]}, {"history": ["nope"]}]')
    assert (st, p, where) == (recommend_parse.UNKNOWN_ID, None, 2)


def test_a_512_request_body_with_repeated_prompts_interns_them(index):
    rng = random.Random(2)
    prompts = ["funny", "no horror", None, "é"]
    value = [{"history": rng.sample(IDS[:100], 20), "prompt": rng.choice(prompts), "k": 10} for _ in range(512)]
    body = json.dumps(value).encode()
    got = check(index, body, must_accept=True)
    p = recommend_parse.parse(index, body)
    assert sorted(p.texts) == sorted({v["prompt"] for v in value if v["prompt"] is not None})
    assert p.text_bytes.tolist() == [len(t.encode()) for t in p.texts]
    assert len(got["items"]) == 512 * 20


def test_a_closed_index_is_refused():
    ix = id_index.IdIndex(["a"])
    ix.close()
    with pytest.raises(recommend_parse.KernelError, match="closed"):
        recommend_parse.parse(ix, b'{"history": ["a"]}')
