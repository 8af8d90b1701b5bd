"""The lean path of the two inference routes, in front of FastAPI (``http_app.ServeApp``): ``POST /recommend``
with a body the FastAPI route would accept, checked by hand in a few microseconds, and ``POST
/v2/models/{model}/infer``, whose route reads its raw body anyway. A call there skips FastAPI's own per-call
layers (its telemetry check, body-limit middleware, routing, dependency solving) and, for /recommend, pydantic.

Why: a single-request call cost 0.77-0.94 ms of server CPU, over half of it the HTTP stack around the engine's
share (docs/LOAD_TEST.md). Semantics stay the routes' exactly: the same functions answer (``_recommend`` and
``_infer`` in ``http_app``), and the /recommend checker only ever *accepts*: a body it is not sure of (any type,
key, encoding or content type outside the plain valid case) returns ``None`` and goes down the FastAPI route,
whose strict pydantic model (``http_app.RecommendRequest``) and error messages are unchanged. So every refusal
of a malformed body is still worded by that route, and an accepted body yields the values the model would (same
defaults, ``hard_filter`` as ``model_dump()`` writes it). ``tests/test_serve_load.py`` checks both.
"""

from __future__ import annotations

import json
import re
import time

from starlette.responses import Response

FIELDS = frozenset(("history", "prompt", "negative_prompt", "k", "exclude_history", "hard_filter"))
FILTER_KEYS = ("include_tags", "exclude_tags", "exclude_items")
_FILTER_SET = frozenset(FILTER_KEYS)
_I64 = 2 ** 63


class Req:
    """One request's fields, as the route's pydantic model holds them (``hard_filter``: a dict or None)."""

    __slots__ = ("history", "prompt", "negative_prompt", "k", "exclude_history", "hard_filter")

    def __init__(self, history, prompt=None, negative_prompt=None, k=10, exclude_history=True, hard_filter=None):
        self.history = history
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.k = k
        self.exclude_history = exclude_history
        self.hard_filter = hard_filter

    @classmethod
    def from_model(cls, m) -> "Req":
        return cls(m.history, m.prompt, m.negative_prompt, m.k, m.exclude_history,
                   m.hard_filter.model_dump() if m.hard_filter is not None else None)


def _text(s) -> bool:
    """A str pydantic takes: a lone surrogate (json.loads reads "\\ud800" as one) cannot become Rust text there."""
    if type(s) is not str:
        return False
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _texts(v) -> bool:
    return type(v) is list and all(map(_text, v))


def _plain_texts(v) -> bool:
    """``_texts`` for a body with no ``\\uD800``-``\\uDFFF`` escape (so json.loads made no lone surrogate and
    every str encodes): only the element types are checked, in one C loop (a 512-request body holds ~21,000 ids)."""
    return type(v) is list and (not v or set(map(type, v)) == _STR_ONLY)


_STR_ONLY = {str}
# a JSON escape that can decode to a lone surrogate (json.loads keeps one); also matches an escaped backslash
# followed by "ud8..", which only sends such a body down the slower, exact per-string check
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _one(d, texts=_texts) -> Req | None:
    if type(d) is not dict or not FIELDS.issuperset(d):
        return None
    history = d.get("history")
    if history is None or not texts(history):         # required; no null
        return None
    prompt = d.get("prompt")
    neg = d.get("negative_prompt")
    if (prompt is not None and not _text(prompt)) or (neg is not None and not _text(neg)):
        return None
    k = d.get("k", 10)
    if type(k) is not int or not -_I64 <= k < _I64:    # strict: no bool, float or str; a huge one to the route
        return None
    ex = d.get("exclude_history", True)
    if type(ex) is not bool:
        return None
    hf = d.get("hard_filter")
    if hf is not None:
        if type(hf) is not dict or not _FILTER_SET.issuperset(hf):
            return None
        out = {}
        for key in FILTER_KEYS:                       # model_dump()'s keys, order and defaults
            v = hf.get(key, [])
            if not _texts(v):
                return None
            out[key] = list(v)
        hf = out
    return Req(history, prompt, neg, k, ex, hf)


def parse(body: bytes, content_type: bytes | None) -> tuple[list, bool] | None:
    """``(requests, single)`` when the route would surely accept ``body``; None: let the route decide."""
    if content_type != b"application/json" or not body:
        return None
    try:
        data = json.loads(body)      # what Starlette's Request.json() runs: the same values, the same edge cases
    except (ValueError, RecursionError):
        return None
    if type(data) is dict:
        r = _one(data)
        return None if r is None else ([r], True)
    if type(data) is list and data:
        texts = _texts if _SURROGATE_ESCAPE.search(body) else _plain_texts
        reqs = [_one(d, texts) for d in data]
        return None if None in reqs else (reqs, False)
    return None


class LeanRoutes:
    """The ASGI handler of the inference routes in front of FastAPI (``http_app.ServeApp``): the body limit and
    the metrics of ``http_app.ServeMiddleware``, then the route's own function. ``POST /recommend`` runs only
    when :func:`parse` vouches for its body; the v2 infer route (``/v2/models/{model}/infer``, the path
    Starlette would match: a model name without ``/``) reads its raw body as the FastAPI route does. Anything
    else (another path, a body over the limit or one ``parse`` leaves alone) goes to ``fallback`` (FastAPI,
    whose ServeMiddleware answers and counts it) with the bytes read so far replayed."""

    def __init__(self, service, recommend, infer, fallback, count):
        self.svc = service
        self.recommend = recommend        # (reqs, single) -> Response (http_app's _recommend)
        self.infer = infer                # (model, body, inference-header-content-length) -> Response
        self.fallback = fallback          # FastAPI's own __call__
        self.count = count                # http_app.count(metrics, route, status, t0)

    async def __call__(self, scope, receive, send):
        path = scope["path"]
        if path == "/recommend":
            route, model = "/recommend", None
        elif path.startswith("/v2/models/") and path.endswith("/infer") and "/" not in path[11:-6] and path[11:-6]:
            route, model = "/v2/models/{model}/infer", path[11:-6]
        else:
            return await self.fallback(scope, receive, send)
        t0 = time.perf_counter()
        raw = scope.get("headers") or ()
        limit = self.svc.cfg.max_body_bytes
        declared = dict(raw).get(b"content-length")            # as ServeMiddleware reads it
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self.fallback(scope, receive, send)        # refused there with 413
        chunks, n, more = [], 0, True
        while more and n <= limit:
            msg = await receive()
            if msg["type"] != "http.request":
                return await self.fallback(scope, _replay(chunks, True, receive), send)
            chunks.append(msg.get("body", b""))
            n += len(chunks[-1])
            more = msg.get("more_body", False)
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if more or n > limit:
            return await self.fallback(scope, _replay([body], more, receive), send)
        if model is None:
            got = parse(body, _first(raw, b"content-type"))
            if got is None:
                return await self.fallback(scope, _replay([body], False, receive), send)
            call = self.recommend(*got)
        else:
            hl = _first(raw, b"inference-header-content-length")
            call = self.infer(model, body, None if hl is None else hl.decode("latin-1"))
        code = 500
        # as ServeMiddleware: an exception is counted as a 500 (uvicorn answers it), a cancelled call is not
        try:
            resp = await call
            if type(resp) is Response and resp.background is None:
                # what Response.__call__ sends, without its frames: the same two messages
                code = resp.status_code
                await send({"type": "http.response.start", "status": code, "headers": resp.raw_headers})
                await send({"type": "http.response.body", "body": resp.body})
            else:
                code_box = [500]

                async def send_counted(msg):
                    if msg["type"] == "http.response.start":
                        code_box[0] = msg["status"]
                    await send(msg)
                try:
                    await resp(scope, receive, send_counted)
                finally:
                    code = code_box[0]
        except Exception:
            self.count(self.svc.metrics, route, code, t0)
            raise
        self.count(self.svc.metrics, route, code, t0)


def _first(headers, name: bytes):
    """A header's first value, as Starlette's ``Request.headers.get`` gives it (None when absent)."""
    for k, v in headers:
        if k == name:
            return v
    return None


def _replay(chunks: list, more: bool, receive):
    """``receive`` again from the start: the bytes read so far, then (if the body goes on) the rest."""
    state = [False]

    async def replay():
        if not state[0]:
            state[0] = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": more}
        return await receive()
    return replay
