"""The HTTP service: FastAPI routes over :class:`~dpr.serve.service.Service`.

Routes: the KServe v2 / Open Inference Protocol routes Triton serves (``/v2``, ``/v2/health/live``,
``/v2/health/ready``, ``/v2/models/dpr``, ``/v2/models/dpr/ready``, ``POST /v2/models/dpr/infer``,
``POST /v2/repository/index``, ``POST /v2/repository/models/dpr/load``), the friendly ``POST /recommend``,
``/metrics`` (Prometheus) and FastAPI's ``/docs`` + ``/openapi.json``.

Errors are ``{"error": "..."}`` (the v2 protocol's form) naming the problem: 413 over the body or a call-size
limit, 422 for a request the model cannot take (unknown id, over a limit, bad shape or type), 404 for another
model name, 503 + ``Retry-After`` while loading or when the batcher's queue is full, 500 when the engine failed
(a fault, not the input: counted in ``dpr_engine_errors_total``), 504 when its batch ran past ``batch_timeout_s``.

The two inference routes are served first by :mod:`dpr.serve.lean` in front of FastAPI (``ServeApp``): the same
functions, status codes and messages, without FastAPI's per-call layers (a single-request ``/recommend`` call
cost 0.58 ms of server CPU through FastAPI + pydantic, 0.40 ms this way, docs/LOAD_TEST.md). Ahead of both, a plain
valid ``/recommend`` call never becomes an ASGI request at all: :mod:`dpr.serve.http_front` answers it inside
uvicorn's protocol, a batch per event-loop turn (``ServeApp.batch_front``; ``--http-front asgi`` turns it off).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from contextlib import asynccontextmanager
from itertools import chain
from typing import Optional, Union

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from dpr.engine import ClosedError, OverloadedError
from dpr.errors import InputError

from .batcher import BatchTimeoutError
from . import lean, v2_columns
from .columns import LimitError, Part, check_limits, split_rows
from .http_front import BatchFront
from .render import recommend_body, recommend_json
from .service import NotReady, Service
from .tensors import INPUTS, OUTPUTS

# ---- the /recommend schema (OpenAPI documents it) ----------------------------------------------------
# strict: every field type-checked, never coerced, as the engine checks its options (lax pydantic would take
# k="5", k=5.0 and k=true as 5, 5 and 1, and exclude_history="yes" or 1 as true)
class HardFilter(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_tags: list[str] = Field(default_factory=list, description="only items with one of these tags")
    exclude_tags: list[str] = Field(default_factory=list, description="no item with any of these tags")
    exclude_items: list[str] = Field(default_factory=list, description="item ids never returned")


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "examples": [{"history": ["i12", "i7", "i93"], "prompt": "something funny", "k": 10}]})
    history: list[str] = Field(description="item ids, oldest first")
    prompt: Optional[str] = Field(None, description="what the user wants now")
    negative_prompt: Optional[str] = Field(None, description="what to avoid")
    k: int = Field(10, description="items to return")
    exclude_history: bool = True
    hard_filter: Optional[HardFilter] = None


class Item(BaseModel):
    rank: int
    id: str
    title: str
    tags: list[str]
    score: float


class RecommendResponse(BaseModel):
    k: int
    count: int = Field(description="items returned: fewer than k only when fewer are eligible")
    short_reason: Optional[str] = Field(None, description="why count < k")
    items: list[Item]


def _error(status: int, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


# ---- middleware: body limit and metrics (plain ASGI: no per-request task or copy) -------------------
class ServeMiddleware:
    def __init__(self, app, service: Service):
        self.app = app
        self.svc = service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = {"code": 500}
        limit = self.svc.cfg.max_body_bytes

        async def send_wrapped(msg):
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            await send(msg)

        # an exception that escapes a route (Starlette answers it 500) is counted as a 500 too; a cancelled call
        # (the server stopping under it: CancelledError is no Exception) has no status and is not counted
        try:
            declared = dict(scope.get("headers") or ()).get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                await _error(413, f"request body is {int(declared)} bytes; the limit is {limit} (--max-body-bytes)")(
                    scope, receive, send_wrapped)
            elif scope["method"] in ("POST", "PUT", "PATCH"):
                # read the body here, counting (a chunked body has no Content-Length), and replay it to the app
                chunks, n, more = [], 0, True
                while more:
                    msg = await receive()
                    if msg["type"] != "http.request":
                        break
                    chunks.append(msg.get("body", b""))
                    n += len(chunks[-1])
                    more = msg.get("more_body", False)
                    if n > limit:
                        break
                if n > limit:
                    await _error(413, f"request body is over {limit} bytes; the limit is {limit} (--max-body-bytes)")(
                        scope, receive, send_wrapped)
                else:
                    body, sent = b"".join(chunks), [False]

                    async def replay():
                        if not sent[0]:
                            sent[0] = True
                            return {"type": "http.request", "body": body, "more_body": False}
                        return await receive()      # http.disconnect

                    await self.app(scope, replay, send_wrapped)
            else:
                await self.app(scope, receive, send_wrapped)
        except Exception:
            self._count(scope, status["code"], t0)
            raise
        self._count(scope, status["code"], t0)

    def _count(self, scope, code: int, t0: float) -> None:
        route = scope.get("route")
        path = getattr(route, "path", None) or "other"     # templates only: bounded label set
        count(self.svc.metrics, path, code, t0)


def count(m, path: str, code: int, t0: float) -> None:
    m.observe_request(path, code, time.perf_counter() - t0)


class ServeApp(FastAPI):
    """FastAPI, with the two inference routes (``POST /recommend``, ``POST /v2/models/{model}/infer``) taken
    first by ``lean_routes`` (:class:`~dpr.serve.lean.LeanRoutes`): a call there never pays FastAPI's own per-call
    layers (its telemetry check, body-limit middleware, routing, dependency solving; for /recommend, pydantic
    too when the body is plain valid); every other call goes through FastAPI unchanged."""

    lean_routes = None
    batch_front = None       # http_front.BatchFront: plain valid /recommend calls batched ahead of ASGI, or None

    async def __call__(self, scope, receive, send):
        if self.lean_routes is not None and scope["type"] == "http" and scope["method"] == "POST":
            return await self.lean_routes(scope, receive, send)
        return await super().__call__(scope, receive, send)


def create_app(service: Service, load_in_background: bool = True) -> ServeApp:
    svc = service
    native_bodies = svc.cfg.http_body_parser == "native"      # large bodies read natively (body_columns, v2_columns)
    name = svc.cfg.model_name

    @asynccontextmanager
    async def lifespan(app):
        loop = asyncio.get_running_loop()
        task = loop.run_in_executor(None, svc.load) if load_in_background else None
        if task is None:
            svc.load()
        try:
            loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(_sighup()))
        except (NotImplementedError, RuntimeError, ValueError):   # not the main thread / not POSIX
            pass
        yield
        if task is not None:
            await task
        await asyncio.to_thread(svc.close)      # uvicorn drained the connections; finish the queue

    async def _sighup():
        try:
            await svc.reload_async()
        except Exception:  # noqa: BLE001 - logged and kept in last_reload; the old engine serves
            pass

    app = ServeApp(title="dpr", version="1", lifespan=lifespan,
                  description="Promptable sequential recommendation: a user's item history + a prompt -> "
                              "top-k items. KServe v2 routes, a JSON /recommend route, Prometheus /metrics.")
    app.add_middleware(ServeMiddleware, service=svc)
    app.state.service = svc

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return _error(422, _validation_message(exc), detail=_jsonable_errors(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        # FastAPI answers a body json.loads cannot take for another reason than bad syntax (not UTF-8, an
        # integer of over 4,300 digits, nesting too deep) with a bare 400 "error parsing the body"; say why
        cause = exc.__cause__
        if exc.status_code == 400 and cause is not None:
            why = f"{type(cause).__name__}: {cause}"
            return _error(400, f"the request body cannot be parsed as JSON text: {why[:300]}")
        return await http_exception_handler(request, exc)

    def _check_model(model: str):
        if model != name:
            return _error(404, f"unknown model {model!r}; this server serves {name!r}")
        return None

    def _not_ready(why: str) -> JSONResponse:
        return _error(503, f"model {name!r} is not ready: {why}", {"Retry-After": str(svc.cfg.retry_after_s)})

    def _error_response(exc: BaseException) -> JSONResponse:
        """The answer to an engine call that raised ``exc`` (also the batching front's, ``http_front``)."""
        if isinstance(exc, NotReady):
            return _not_ready(str(exc))
        if isinstance(exc, (OverloadedError, ClosedError)):
            return _error(503, str(exc), {"Retry-After": str(svc.cfg.retry_after_s)})
        if isinstance(exc, LimitError):
            return _error(exc.status, str(exc))
        if isinstance(exc, InputError):
            return _error(422, str(exc))
        if isinstance(exc, BatchTimeoutError):     # counted in /metrics by the batcher (dpr_engine_errors_total)
            return _error(504, str(exc))
        # an engine fault: this call fails, the service keeps serving
        why = f"{type(exc).__name__}: {exc}"
        return _error(500, f"internal error in the engine while serving this request (not caused by its input; "
                           f"the service keeps serving): {why[:300]}")

    async def _run(parts, label=None):
        try:
            return await svc.run_parts(parts, label), None
        except Exception as exc:  # noqa: BLE001 - every failure is answered (_error_response says how)
            return None, _error_response(exc)

    async def _recommend(reqs: list, single: bool) -> Response:
        """/recommend once its body is checked, by pydantic (the route) or by ``lean.parse`` (``ServeApp``)."""
        if not reqs:
            return _error(422, "the list of requests is empty")
        if not svc.ready:
            return _not_ready(svc.load_error or "the engine is loading")
        label = (lambda r: "request") if single else _request_label
        try:
            parts = _parts_from_requests(reqs, svc, label, check_ids=False)
        except LimitError as exc:
            return _error(exc.status, str(exc))
        except InputError as exc:
            return _error(422, str(exc))
        results, err = await _run(parts, label)
        if err is not None:
            return err
        engine, results = results
        if len(parts) == 1:          # one (k, exclude_history): its rows are the call's, in order
            body = recommend_body(engine, results[0])
            return Response(body if single else b"[" + body + b"]", media_type="application/json")
        out: list = [None] * len(reqs)
        for (part, rows), res in zip(parts, results):
            for r, text in zip(rows, recommend_json(engine, res)):
                out[r] = text
        body = out[0] if single else "[" + ", ".join(out) + "]"
        return Response(body.encode(), media_type="application/json")

    # ---- health and metadata -------------------------------------------------------------------
    @app.get("/v2/health/live", tags=["v2"])
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready", tags=["v2"])
    async def ready():
        if svc.ready:
            return {"ready": True}
        return _not_ready(svc.load_error or "the engine is loading")

    @app.get("/v2", tags=["v2"])
    async def server_metadata():
        return {"name": "dpr", "version": "0.1.0", "extensions": ["model_repository"]}

    @app.get("/v2/models/{model}", tags=["v2"])
    async def model_metadata(model: str):
        if (bad := _check_model(model)) is not None:
            return bad
        meta = {"name": name, "versions": ["1"], "platform": "dpr",
                "inputs": [{"name": n, "datatype": d, "shape": [-1] + dims, "optional": opt}
                           for n, (d, dims, opt) in INPUTS.items()],
                "outputs": [{"name": n, "datatype": d, "shape": [-1] + dims} for n, (d, dims) in OUTPUTS.items()]}
        if svc.engine is not None:
            d = svc.engine.describe()
            meta["parameters"] = {"export": svc.export_dir, "model_hash": d["model_hash"],
                                  "num_items": d["num_items"], "backend": d["backend"], "retriever": d["retriever"],
                                  "max_batch_size": svc.cfg.max_batch_size,
                                  "preferred_batch_size": svc.cfg.preferred_batch_size,
                                  "max_queue_delay_microseconds": svc.cfg.max_queue_delay_us,
                                  "last_reload": svc.last_reload}
        elif svc.load_error:
            meta["parameters"] = {"export": svc.export_dir, "load_error": svc.load_error}
        return meta

    @app.get("/v2/models/{model}/ready", tags=["v2"])
    async def model_ready(model: str):
        if (bad := _check_model(model)) is not None:
            return bad
        return await ready()

    # ---- inference -----------------------------------------------------------------------------
    @app.post("/v2/models/{model}/infer", tags=["v2"],
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
                  "type": "object", "required": ["inputs"], "properties": {
                      "id": {"type": "string"}, "inputs": {"type": "array", "items": {"type": "object"}},
                      "outputs": {"type": "array", "items": {"type": "object"}}}}}}}})
    async def infer(model: str, request: Request):
        """KServe v2 inference: the tensors of ``dpr.serve.tensors`` (JSON, or the binary tensor extension)."""
        if (bad := _check_model(model)) is not None:
            return bad
        return await _infer(await request.body(), request.headers.get("inference-header-content-length"))

    async def _infer(body: bytes, header_length) -> Response:
        """The v2 infer route once its model name is checked (reached from the route, or from ``ServeApp``)."""
        if not svc.ready:
            return _not_ready(svc.load_error or "the engine is loading")
        try:
            parts, req = v2_columns.read_call(body, header_length, svc.engine, svc.cfg, native_bodies)
        except LimitError as exc:
            return _error(exc.status, str(exc))
        except InputError as exc:
            return _error(422, str(exc))
        results, err = await _run(parts)
        if err is not None:
            return err
        engine, results = results
        try:
            return v2_columns.response(name, engine, req, parts, results)
        except InputError as exc:
            return _error(422, str(exc))

    @app.post("/recommend", tags=["recommend"],
              responses={200: {"model": Union[RecommendResponse, list[RecommendResponse]]},
                         422: {"description": "the request cannot be served; `error` says why"},
                         503: {"description": "loading or overloaded; retry after `Retry-After` seconds"}})
    async def recommend(body: Union[RecommendRequest, list[RecommendRequest]]):
        """One request, or a list of them (answered in order)."""
        single = not isinstance(body, list)
        return await _recommend([lean.Req.from_model(m) for m in ([body] if single else body)], single)

    async def lean_infer(model: str, body: bytes, header_length):
        if (bad := _check_model(model)) is not None:
            return bad
        return await _infer(body, header_length)

    app.lean_routes = lean.LeanRoutes(svc, _recommend, lean_infer, super(ServeApp, app).__call__, count)
    # plain valid /recommend calls, batched per event-loop turn ahead of ASGI (``http_front.protocol_for``)
    if svc.cfg.http_front == "batched":
        app.batch_front = BatchFront(svc, lambda reqs: _parts_from_requests(reqs, svc, _request_label, check_ids=False),
                                     _error_response, count)

    # ---- model repository (hot reload) -----------------------------------------------------------
    @app.post("/v2/repository/index", tags=["v2"])
    async def repository_index():
        state = "READY" if svc.ready else ("UNAVAILABLE" if svc.load_error else "LOADING")
        entry = {"name": name, "version": "1", "state": state}
        if svc.load_error and not svc.ready:
            entry["reason"] = svc.load_error
        return [entry]

    @app.post("/v2/repository/models/{model}/load", tags=["v2"])
    async def repository_load(model: str, request: Request):
        """Hot reload: ``{"parameters": {"export_dir": PATH}}`` (or no body: the current folder again). The new
        engine is built and warmed aside, then swapped in between two batches; on failure the old one keeps
        serving and the answer says why."""
        if (bad := _check_model(model)) is not None:
            return bad
        body = await request.body()
        path = None
        if body.strip():
            try:
                data = json.loads(body)
                params = data.get("parameters") or {}
                path = params.get("export_dir")
            except (ValueError, AttributeError):
                return _error(422, 'the load body must be JSON like {"parameters": {"export_dir": "PATH"}}')
            if path is not None and not isinstance(path, str):
                return _error(422, f"parameters.export_dir must be a string, got {type(path).__name__}")
        try:
            info = await svc.reload_async(path)
        except Exception as exc:  # noqa: BLE001 - the old engine keeps serving; say why
            return _error(400, f"failed to load {path or svc.export_dir!r}, the previous engine keeps "
                               f"serving: {type(exc).__name__}: {exc}")
        return info

    @app.get("/metrics", tags=["metrics"])
    async def metrics():
        body, ctype = svc.metrics.render(svc.batcher, svc.engine)
        return Response(body, media_type=ctype)

    return app


def _request_label(r: int) -> str:
    """How an error names request ``r`` of a /recommend list."""
    return f"request {r}"


def _parts_from_requests(reqs: list, svc: Service, label, check_ids: bool = True) -> list:
    """Checked requests (``lean.Req``) as Parts, one per (k, exclude_history) (usually one). ``check_ids=False``
    leaves the item ids to the engine, which checks every batch anyway: a merged batch that fails on one
    call's unknown id is split by ``columns.run_parts`` (the culprit alone gets the 422, worded as here once
    ``Service.run_parts`` names its row), and the check here cost 2.2 ms of the event loop per 512-request call
    (hashing 21,000 fresh strings)."""
    groups = split_rows([r.k for r in reqs], [r.exclude_history for r in reqs])
    out = []
    for (k, ex), rows in groups:
        sub = [reqs[i] for i in rows] if len(groups) > 1 else reqs
        rl = (lambda r, rows=rows: label(rows[r]))
        if k < 1:
            raise InputError(f"{rl(0)}: k must be >= 1, got {k}")
        flat = list(chain.from_iterable(r.history for r in sub))
        lens = [len(r.history) for r in sub]
        prompts = [r.prompt for r in sub]
        negs = [r.negative_prompt for r in sub]
        prompts = prompts if any(p is not None for p in prompts) else None
        negs = negs if any(p is not None for p in negs) else None
        filters = [r.hard_filter for r in sub]
        filters = filters if any(f is not None for f in filters) else None
        check_limits(lens, prompts, negs, k, svc.cfg, rl)
        if check_ids:
            svc.ids.check(flat, lens, rl)
        out.append((Part(flat, lens, prompts, negs, k, ex, filters), rows))
    if len(reqs) > svc.cfg.max_requests_per_call:
        raise LimitError(f"{len(reqs)} requests in one call; the limit is {svc.cfg.max_requests_per_call} "
                         f"(--max-requests-per-call)", 413)
    return out


def _validation_message(exc: RequestValidationError) -> str:
    errs = _relevant(exc)
    parts = []
    for e in errs[:5]:
        loc = [str(x) for x in e.get("loc", ())]
        if loc[:1] == ["body"]:                  # then the union branch's tag, never a field of the request
            loc = loc[1:]
            if loc and (loc[0] == "RecommendRequest" or loc[0].startswith("list[")):
                loc = loc[1:]
        where = ".".join(loc) or "body"
        parts.append(f"{where}: {e.get('msg')}")
    more = f" (and {len(errs) - 5} more)" if len(errs) > 5 else ""
    return "invalid request: " + "; ".join(parts) + more


def _relevant(exc: RequestValidationError) -> list:
    """The union body reports both branches; keep the one that matches what was sent (object or list)."""
    errs = list(exc.errors())
    body = getattr(exc, "body", None)
    want_list = isinstance(body, list)
    picked = [e for e in errs if len(e.get("loc", ())) < 2 or
              (str(e["loc"][1]).startswith("list[") == want_list)]
    return picked or errs


def _jsonable_errors(exc) -> list:
    return [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg")), "type": e.get("type")}
            for e in _relevant(exc)]
