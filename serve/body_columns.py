"""A large ``POST /recommend`` body read straight into columns by the native parser
(:mod:`dpr.kernels.recommend_parse`), for the batching front (``http_front``).

Why: a 512-request body (250 KB) cost the event loop about 2 ms holding the GIL (json.loads, the route's checks
per request, a Part built from 21,000 id strings), and the engine's threads, which need the GIL between their
steps, ran each batch 20-40% slower beside it (docs/LOAD_TEST.md). The parser reads the body, checks it and
maps its ids to catalogue indices in one call without the GIL: about 0.5 ms on the 2-core VM, and the Part it
gives is already in indices (``form="indices"``: the engine maps nothing).

Semantics stay the Python path's: :func:`read` returns columns only for a body that path would accept with the
same values, every id in the catalogue and every limit of the service kept; anything else (a decline, an unknown
id, a limit crossed, k or exclude_history differing between the requests of one call) returns None, and the
front takes the Python path (``lean.parse``, then the routes for a refusal), which answers exactly as before.
Small bodies stay on that path too: below :data:`MIN_BYTES` json.loads is as fast (one request: 5 against 19 us)
and a call that drops the GIL then waits to get it back behind the engine's threads.
"""

from __future__ import annotations

import numpy as np

from .columns import Part, rows_within_limits
from .render import tables

# The body size from which the native parser reads a call (measured on the 2-core VM, load-test bodies: 8 requests,
# 4 KB: 23 us by lean.parse, 27 native; 64 requests, 33 KB: 171 against 92; 512, 250 KB: 1,594 against 505).
MIN_BYTES = 8192


class Cols:
    """One call's rows, read natively: a Part's columns plus what the front needs to answer the call."""

    __slots__ = ("part", "single")

    def __init__(self, part: Part, single: bool):
        self.part = part
        self.single = single

    def __len__(self) -> int:
        return len(self.part)


def read(body: bytes, engine, cfg) -> Cols | None:
    """``body`` as one Part in catalogue indices of ``engine``, or None: let the Python path read it."""
    if len(body) < MIN_BYTES:
        return None
    ix = tables(engine).id_index()           # built with the engine's render tables (Service._build)
    if ix is None:
        return None
    from dpr.kernels import recommend_parse

    p = recommend_parse.parse(ix, body)
    if p is None:
        return None
    ks, lens = p.ks, np.diff(p.offsets)
    # every limit the Python path checks (http_app._parts_from_requests, columns.check_limits): crossing one
    # sends the call there, which words the refusal
    k = int(ks[0])
    ex = bool(p.exclude[0])
    if not (ks == k).all() or not (p.exclude == ex).all():
        return None                         # a call mixing k or exclude_history is split by the Python path
    if not rows_within_limits(lens, k, cfg):
        return None
    if p.texts and (int(p.text_bytes.max()) > cfg.max_prompt_bytes or not all(t.strip() for t in p.texts)):
        return None
    part = Part(p.items, lens, p.prompts, p.negatives, k, ex, None, form="indices", origin=engine)
    return Cols(part, p.single)
