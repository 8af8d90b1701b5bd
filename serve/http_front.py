"""The batching HTTP front of ``POST /recommend`` and ``POST /v2/models/<model>/infer``: uvicorn's own HTTP/1.1
protocol, with the plain valid calls of both inference routes taken out of ASGI and answered a batch at a time.

Why: with 64 single-request clients the service's event loop was the bottleneck, at ~190 us of Python per call
(py-spy, docs/LOAD_TEST.md): an asyncio task, an ASGI scope and two ``send`` messages (two socket writes), a
batcher future, the parts and the answer per call. Here a call costs its parse and one socket write; the rest runs
once per event-loop turn for every call that arrived in it ("columns, not objects": one Part, one batcher
submission, one rendering with each call's rows cut out of it).

What takes the fast path: ``POST /recommend`` with ``Content-Type: application/json``, a ``Content-Length`` within
``max_body_bytes``, no ``Expect: 100-continue`` and a body :func:`dpr.serve.lean.parse` vouches for; and ``POST
/v2/models/<this model>/infer`` with a ``Content-Length`` within ``max_body_bytes`` whose tensors (JSON, or Triton's
binary extension) the route's own reader turns into one Part (``v2_columns.read_call``), answered by the route's
own encoder (``v2_columns.response``; 64 single-request v2 clients: 258 -> 213 us of server CPU per call,
docs/LOAD_TEST.md). Everything else (other routes, other bodies, any refusal: a limit, an unknown id, a list mixing k
values) goes down the ASGI app exactly as before (``http_app.ServeApp``: the lean route, then FastAPI), so every
status code and message stays the one the routes give; a batch refused for one call's input is answered call by call there, so only the culprit
fails. Errors of the batch itself (overload, a closed or timed-out batcher, an engine fault) get the routes'
answers (``error_response``). Keep-alive, pipelining (answers in order), ``Connection: close``, HTTP/1.0, drain on
shutdown and the keep-alive timeout stay uvicorn's: a fast call is a cycle in uvicorn's own pipeline
(:class:`FastCycle` carries the attributes uvicorn reads).

It subclasses uvicorn's ``HttpToolsProtocol`` and so depends on its internals (``cycle``, ``pipeline``,
``flow``, ``_start_asgi_task``, ``on_response_complete``): the version is pinned by the lock, :func:`protocol_for`
checks that they are there and falls back to plain uvicorn with a warning, and tests/test_serve_http_front.py
runs it on the real server (pipelining, HTTP/1.0, fallbacks, a bad call among good ones).
"""

from __future__ import annotations

import asyncio
import logging
import time
from itertools import chain

from dpr.errors import InputError

from . import body_columns, lean, v2_columns
from .columns import join, slice_result
from .render import recommend_rows

log = logging.getLogger("dpr.serve")

_FAST = object()            # the "app" of a fast cycle queued in uvicorn's pipeline
_ROUTE = "/recommend"
_V2_ROUTE = "/v2/models/{model}/infer"     # the metrics label the v2 route counts its calls under
_JSON_HEADERS = b"content-type: application/json\r\n"


class _NoEvent:
    """uvicorn's ``connection_lost`` sets the cycle's message event; a fast cycle has nobody waiting on it."""

    @staticmethod
    def set() -> None:
        pass


class FastCycle:
    """A fast call in uvicorn's pipeline: the attributes uvicorn's protocol reads of a cycle (``response_complete``,
    ``keep_alive``, ``disconnected``, ``message_event``, ``body``, ``more_body``) and the parsed call."""

    __slots__ = ("scope", "keep_alive", "body", "more_body", "response_complete", "disconnected", "started",
                 "reqs", "cols", "n", "single", "t0", "v2", "header_length", "form", "part")
    message_event = _NoEvent

    def __init__(self, scope, keep_alive: bool):
        self.scope = scope
        self.keep_alive = keep_alive
        self.body = bytearray()
        self.more_body = True
        self.response_complete = False
        self.disconnected = False
        self.started = False            # its turn on the connection has come (the calls before it are answered)
        self.reqs = None                # the call's requests (lean.Req) read by the Python path, or
        self.cols = None                # its rows read natively (body_columns.Cols: a large body)
        self.n = 0                      # its rows
        self.single = True
        self.t0 = 0.0
        self.v2 = False                 # a KServe v2 infer call (else /recommend)
        self.header_length = None       # its Inference-Header-Content-Length (binary tensors), or None
        self.form = None                # its answer's form (v2.InferRequest: id, outputs, which are binary)
        self.part = None                # its one Part


class BatchFront:
    """Collects the fast calls of one event-loop turn and answers them as one batch (see the module doc).

    ``build_parts(reqs) -> [(Part, rows)]`` checks a call's requests against the service's limits
    (``http_app._parts_from_requests``); ``error_response(exc) -> Response`` is the routes' answer to a failed
    engine call; ``count(metrics, route, code, t0)`` records a call."""

    def __init__(self, service, build_parts, error_response, count):
        self.svc = service
        self.build_parts = build_parts
        self.error_response = error_response
        self.count = count
        self.pending: list = []
        self.scheduled = False
        self.native_bodies = service.cfg.http_body_parser == "native"
        self.v2_path = f"/v2/models/{service.cfg.model_name}/infer".encode()
        self._dh_src = None            # uvicorn's default headers (date, server): rebuilt when it replaces them
        self._dh = b""

    # ---- intake (the protocol calls these) ------------------------------------------------------
    def _headers(self, headers) -> tuple | None:
        """(Content-Type, Inference-Header-Content-Length), each the first given or None, of a call whose body may
        take the fast path (decided before the body): one Content-Length within ``max_body_bytes``, no
        Transfer-Encoding; None otherwise."""
        ctype = clen = hl = None
        for name, value in headers:
            if name == b"content-type":
                if ctype is None:
                    ctype = value
            elif name == b"content-length":
                if clen is not None:
                    return None
                clen = value
            elif name == b"inference-header-content-length":
                if hl is None:                    # the route reads the first too
                    hl = value.decode("latin-1")
            elif name == b"transfer-encoding":
                return None
        if clen is None or not clen.isdigit() or int(clen) > self.svc.cfg.max_body_bytes:
            return None
        return ctype, hl

    def takes(self, headers) -> bool:
        """Whether a POST /recommend with these headers may take the fast path: a JSON body (see ``_headers``)."""
        h = self._headers(headers)
        return h is not None and h[0] == b"application/json"

    def takes_v2(self, headers) -> tuple[bool, str | None]:
        """Whether a POST to this model's v2 infer route may take the fast path (any content type, as the route
        takes), and its Inference-Header-Content-Length."""
        h = self._headers(headers)
        return (False, None) if h is None else (True, h[1])

    def dispatch(self, proto, cycle: FastCycle) -> None:
        """A fast call's body is complete and its turn has come: parse it and queue it for this turn's batch."""
        cycle.t0 = time.perf_counter()
        if not self.svc.ready:
            proto.to_asgi(cycle)
            return
        body = bytes(cycle.body)
        if cycle.v2:
            if not self._read_v2(cycle, body):
                proto.to_asgi(cycle)
                return
            self._pend(proto, cycle)
            return
        cols = (body_columns.read(body, self.svc.engine, self.svc.cfg) if len(body) >= body_columns.MIN_BYTES
                and self.native_bodies else None)
        if cols is not None:
            cycle.cols, cycle.single, cycle.n = cols, cols.single, len(cols)
        else:
            got = lean.parse(body, b"application/json")
            if got is None:
                proto.to_asgi(cycle)
                return
            cycle.reqs, cycle.single = got
            cycle.n = len(cycle.reqs)
        self._pend(proto, cycle)

    def _read_v2(self, cycle: FastCycle, body: bytes) -> bool:
        """A v2 infer call as one Part and its answer's form, read as the route reads it (``v2_columns.read_call``);
        False for anything the route should answer itself: a refusal (it words it), or a call its tensors split
        into several Parts (mixed k). One Part holds every row of the call, in order."""
        svc = self.svc
        try:
            parts, req = v2_columns.read_call(body, cycle.header_length, svc.engine, svc.cfg, self.native_bodies)
        except InputError:
            return False
        if len(parts) != 1:
            return False
        cycle.part, cycle.form = parts[0][0], req
        cycle.n = len(cycle.part)
        return True

    def _pend(self, proto, cycle: FastCycle) -> None:
        self.pending.append((proto, cycle))
        if not self.scheduled:
            self.scheduled = True
            # runs once this turn's I/O callbacks are done: every call read in the turn joins the batch
            proto.loop.call_soon(self.flush)

    # ---- one batch per event-loop turn ----------------------------------------------------------
    def flush(self) -> None:
        calls, self.pending = self.pending, []
        self.scheduled = False
        if not self.svc.ready:                    # a reload failing under it: the routes say why
            for proto, cycle in calls:
                proto.to_asgi(cycle)
            return
        limit = self.svc.cfg.max_requests_per_call
        groups: dict = {}
        for call in calls:
            if call[1].v2:                        # one Part per call, its form and origin in the key
                part = call[1].part
                groups.setdefault(("v2", part.key, id(part.origin)), []).append(call)
                continue
            cols = call[1].cols
            if cols is not None:                  # read natively: one k, within the limits (body_columns.read)
                part = cols.part
                groups.setdefault((part.k, part.exclude_history, id(part.origin)), []).append(call)
                continue
            reqs = call[1].reqs
            key = (reqs[0].k, reqs[0].exclude_history)
            if len(reqs) > limit or (len(reqs) > 1 and any(r.k != key[0] or r.exclude_history is not key[1]
                                                           for r in reqs)):
                call[0].to_asgi(call[1])          # over the call limit, or one call mixing k: the routes split it
                continue
            groups.setdefault(key, []).append(call)
        # calls merged into one Part stop at max_batch_size rows (and the call limit): the batcher's rule, only one
        # call alone may be bigger, so an engine call stays within the bound the operator set
        cap = min(limit, self.svc.cfg.max_batch_size)
        for members in groups.values():
            chunk, rows = [], 0
            for call in members:
                n = call[1].n
                if chunk and rows + n > cap:
                    self._submit(chunk)
                    chunk, rows = [], 0
                chunk.append(call)
                rows += n
            self._submit(chunk)

    def _submit(self, calls: list) -> None:
        first = calls[0][1]
        if first.cols is not None or first.v2:    # calls read into Parts (flush grouped them: one key, one engine)
            try:
                part = join([c.part if c.v2 else c.cols.part for _, c in calls])
            except Exception as exc:  # noqa: BLE001 - a bug of ours: answered (500), never left hanging
                self._fail(calls, exc)
                return
            self._queue(calls, part)
            return
        reqs = calls[0][1].reqs if len(calls) == 1 else list(chain.from_iterable(c.reqs for _, c in calls))
        try:
            parts = self.build_parts(reqs)
        except InputError:                        # one call over a limit: each call answered by the routes
            for proto, cycle in calls:
                proto.to_asgi(cycle)
            return
        except Exception as exc:  # noqa: BLE001 - a bug of ours: answered (500), never left hanging
            self._fail(calls, exc)
            return
        self._queue(calls, parts[0][0])           # one (k, exclude_history): one Part (flush grouped them)

    def _queue(self, calls: list, part) -> None:
        try:
            fut = self.svc.batcher.submit_async(part)
        except Exception as exc:  # noqa: BLE001 - overloaded or closing: every call gets the routes' answer
            self._fail(calls, exc)
            return
        fut.add_done_callback(lambda f: self._answer(calls, f))

    def _answer(self, calls: list, fut: asyncio.Future) -> None:
        exc = fut.exception() if not fut.cancelled() else asyncio.CancelledError("the batch was cancelled")
        if exc is not None:
            if isinstance(exc, InputError):       # an unknown id in some call: the routes isolate the culprit
                for proto, cycle in calls:
                    proto.to_asgi(cycle)
            else:
                self._fail(calls, exc)
            return
        if calls[0][1].v2:
            self._answer_v2(calls, fut.result())
            return
        try:
            engine, res = fut.result()
            body, ends = recommend_rows(engine, res)
            dh = self._default_headers(calls[0][0])
            metrics, count = self.svc.metrics, self.count
            start = row = 0
            for proto, cycle in calls:
                row += cycle.n
                end = ends[row - 1]
                text = body[start:end] if cycle.single else b"[" + body[start:end] + b"]"
                start = end + 2
                proto.finish(cycle, b"%scontent-length: %d\r\n%s" % (dh, len(text), _JSON_HEADERS), text, 200)
                count(metrics, _ROUTE, 200, cycle.t0)
        except Exception as exc:  # noqa: BLE001 - a call left unanswered would hang its client: a 500 names why
            log.exception("dpr-serve: answering a batch of /recommend calls failed")
            self._fail([c for c in calls if not c[1].response_complete], exc)

    def _answer_v2(self, calls: list, got) -> None:
        """Each v2 call's answer from its rows of the batch, encoded as the route encodes it (same bytes)."""
        engine, res = got
        dh = self._default_headers(calls[0][0])
        metrics, count, model = self.svc.metrics, self.count, self.svc.cfg.model_name
        start = 0
        for proto, cycle in calls:
            try:
                n = cycle.n
                rows = slice_result(res, start, start + n)
                start += n
                try:
                    resp = v2_columns.response(model, engine, cycle.form, [(cycle.part, range(n))], [rows])
                except InputError:                # an output it asks for that the model lacks: the route words it
                    proto.to_asgi(cycle)
                    continue
                proto.finish(cycle, dh + b"".join(b"%s: %s\r\n" % kv for kv in resp.raw_headers), resp.body, 200)
                count(metrics, _V2_ROUTE, 200, cycle.t0)
            except Exception as exc:  # noqa: BLE001 - a call left unanswered would hang its client: a 500 names why
                log.exception("dpr-serve: answering a v2 infer call failed")
                self._fail([(proto, cycle)], exc)

    def _fail(self, calls: list, exc: BaseException) -> None:
        resp = self.error_response(exc)
        head = b"".join(b"%s: %s\r\n" % kv for kv in resp.raw_headers)
        dh = self._default_headers(calls[0][0])
        for proto, cycle in calls:
            proto.finish(cycle, dh + head, resp.body, resp.status_code)
            self.count(self.svc.metrics, _V2_ROUTE if cycle.v2 else _ROUTE, resp.status_code, cycle.t0)

    def _default_headers(self, proto) -> bytes:
        src = proto.server_state.default_headers
        if src is not self._dh_src:
            self._dh_src = src
            self._dh = b"".join(b"%s: %s\r\n" % kv for kv in src)
        return self._dh


def protocol_for(app):
    """The uvicorn ``http`` protocol class for ``app`` (an ``http_app.ServeApp``): the batching front bound to
    its ``batch_front``, or ``"auto"`` (plain uvicorn) when httptools or the uvicorn internals it needs are
    missing, or the app has no front."""
    front = getattr(app, "batch_front", None)
    if front is None:
        return "auto"
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle, STATUS_LINE
    except ImportError as exc:
        log.warning("dpr-serve: the batching HTTP front needs uvicorn's httptools protocol (%s); serving through "
                    "plain uvicorn", exc)
        return "auto"
    needed = ("_start_asgi_task", "on_response_complete", "on_headers_complete", "on_body", "on_message_complete")
    if not all(hasattr(HttpToolsProtocol, n) for n in needed):
        log.warning("dpr-serve: this uvicorn's HttpToolsProtocol lacks %s; serving through plain uvicorn",
                    [n for n in needed if not hasattr(HttpToolsProtocol, n)])
        return "auto"

    class BatchingHttpProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol, with plain valid ``POST /recommend`` calls answered by ``front``."""

        def on_headers_complete(self) -> None:
            parser = self.parser
            url = self.url
            if (parser.get_method() != b"POST" or self.expect_100_continue or self.root_path
                    or self.limit_concurrency is not None or parser.should_upgrade()):
                return super().on_headers_complete()
            if url == b"/recommend":
                v2, header_length = False, None
                if not front.takes(self.headers):
                    return super().on_headers_complete()
            elif url == front.v2_path:
                v2 = True
                ok, header_length = front.takes_v2(self.headers)
                if not ok:
                    return super().on_headers_complete()
            else:
                return super().on_headers_complete()
            version = parser.get_http_version()
            scope = self.scope             # as uvicorn fills it: the ASGI route may still get this call
            scope["method"] = "POST"
            if version != "1.1":
                scope["http_version"] = version
            path = url.decode("ascii")
            scope["path"] = path
            scope["raw_path"] = url
            scope["query_string"] = b""
            cycle = FastCycle(scope, version != "1.0" and parser.should_keep_alive())
            cycle.v2, cycle.header_length = v2, header_length
            existing, self.cycle = self.cycle, cycle
            if existing is None or existing.response_complete:
                cycle.started = True
            else:                          # pipelined behind an unanswered call: uvicorn starts it in turn
                self.flow.pause_reading()
                self.pipeline.appendleft((cycle, _FAST))

        def on_body(self, body: bytes) -> None:
            cycle = self.cycle
            if type(cycle) is FastCycle:   # bounded: its Content-Length is within max_body_bytes
                cycle.body += body
                return
            super().on_body(body)

        def on_message_complete(self) -> None:
            cycle = self.cycle
            if type(cycle) is FastCycle:
                cycle.more_body = False
                if cycle.started:
                    front.dispatch(self, cycle)
                return
            super().on_message_complete()

        def _start_asgi_task(self, cycle, app) -> None:
            if app is _FAST:               # a pipelined fast call's turn
                cycle.started = True
                if not cycle.more_body:
                    front.dispatch(self, cycle)
                return
            super()._start_asgi_task(cycle, app)

        def to_asgi(self, cycle: FastCycle) -> None:
            """Hand a fast call to the ASGI app (its body complete), as uvicorn would have from the start."""
            if cycle.disconnected:
                return
            real = RequestResponseCycle(
                scope=cycle.scope, transport=self.transport, flow=self.flow, logger=self.logger,
                access_logger=self.access_logger, access_log=self.access_log,
                default_headers=self.server_state.default_headers, message_event=asyncio.Event(),
                expect_100_continue=False, keep_alive=cycle.keep_alive, on_response=self.on_response_complete)
            real.body = cycle.body
            real.more_body = False
            real.message_event.set()
            if self.cycle is cycle:
                self.cycle = real
            super()._start_asgi_task(real, self.app)

        def finish(self, cycle: FastCycle, head: bytes, body: bytes, status: int) -> None:
            """Answer a fast call: status line, ``head`` (header lines), then ``body``, in one write; then what
            uvicorn does when a response completes (close unless keep-alive, start the next pipelined call)."""
            if cycle.response_complete or cycle.disconnected:
                cycle.response_complete = True
                return
            cycle.response_complete = True
            end = b"\r\n" if cycle.keep_alive else b"connection: close\r\n\r\n"
            self.transport.write(b"".join((STATUS_LINE[status], head, end, body)))
            if not cycle.keep_alive:
                self.transport.close()
            self.on_response_complete()

    return BatchingHttpProtocol
