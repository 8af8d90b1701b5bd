"""``dpr.serve.ray``: the engine as a Ray Serve deployment (replicas behind one endpoint, on Ray's cluster).

Each replica holds one :class:`~dpr.serve.service.Service` (the HTTP service's engine loading, warm-up, id
check and hot reload) and answers the HTTP service's ``POST /recommend`` schema, its ``/v2/health/*`` routes
and ``/v2/models/dpr``, with the same JSON and the same error statuses (the request models, limit checks and
rendering are imported from :mod:`dpr.serve.http_app`, :mod:`.columns` and :mod:`.render`, not copied).
Batching is Ray Serve's: ``@serve.batch`` gathers the calls waiting on a replica and one
:func:`~dpr.serve.columns.run_parts` feeds them to ``Engine.recommend_batch`` (one call per (k,
exclude_history) group, a failing call isolated).

* ``num_replicas``, ``autoscaling_config``, ``ray_actor_options`` (CPUs, GPUs) go to ``serve.deployment``
  as they are (:func:`build_app`).
* Ray Serve's health check calls :meth:`DPRDeployment.check_health`: it raises until the engine has loaded
  and run its warm-up batch, so the replica is not routed to before then (and is replaced if the engine
  closes).
* A new export: ``user_config={"export_dir": PATH}`` (an absolute path; a config-only update: each replica
  builds the new engine aside and swaps it in between two batches; no replica restarts, no request fails).

Launch: ``dpr-serve --ray EXPORT_DIR [--num-replicas 2]`` (starts or joins a Ray cluster) or ``serve run``
with a config file whose ``import_path`` is ``dpr.serve.ray:app_builder`` (README "Serving on Ray").
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import asdict, fields
from typing import Any, Union

from pydantic import TypeAdapter, ValidationError

from dpr.errors import InputError, require

from .columns import LimitError, run_parts
from .config import ServeConfig
from .http_app import RecommendRequest, _parts_from_requests
from .lean import Req
from .render import recommend_body, recommend_json
from .service import Service

log = logging.getLogger("dpr.serve.ray")
serve = require("ray.serve", "dpr.serve.ray (pip install 'dpr[scale]')")
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, Response  # noqa: E402

_BODY = TypeAdapter(Union[RecommendRequest, list[RecommendRequest]])
#: serve.batch's defaults here: the ServeConfig's max_batch_size / max_queue_delay_us set them per app
BATCH_WAIT_S = 0.002


def _error(status: int, message: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class DPRDeployment:
    """One replica: a Service (engine + ids + reload) and Ray Serve's batching in front of it."""

    def __init__(self, export_dir: str, config: dict | None = None, engine_options: dict | None = None):
        self.cfg = ServeConfig(**(config or {})).check()
        self.svc = Service(export_dir, self.cfg, engine_options)
        self.svc.load()                   # blocking: Serve waits for __init__, then health-checks
        if not self.svc.ready:
            raise RuntimeError(f"the export {export_dir!r} did not load: {self.svc.load_error}")
        self._batched.set_max_batch_size(self.cfg.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.cfg.max_queue_delay_us / 1e6)

    # ---- Ray Serve hooks ------------------------------------------------------------------------
    def check_health(self) -> None:
        """Serve calls this every health_check_period_s; raising marks the replica unhealthy."""
        if not self.svc.ready:
            raise RuntimeError(f"engine not ready: {self.svc.load_error or 'closed'}")

    async def reconfigure(self, user_config: dict) -> None:
        """``user_config={"export_dir": PATH}``: roll the replica onto a new export in place."""
        path = (user_config or {}).get("export_dir")
        if path and path != self.svc.export_dir:
            await self.svc.reload_async(path)

    # ---- batching ---------------------------------------------------------------------------------
    @serve.batch(max_batch_size=512, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _batched(self, parts: list) -> list:
        engine = self.svc.engine
        # the engine releases the GIL in its kernels; off the event loop, health checks and new calls go on
        results = await asyncio.to_thread(run_parts, engine, parts)
        return [(engine, r) for r in results]

    # ---- HTTP ---------------------------------------------------------------------------------------
    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/")
        if path.endswith("/v2/health/live"):
            return JSONResponse({"live": True})
        if path.endswith("/v2/health/ready") or path.endswith(f"/v2/models/{self.cfg.model_name}/ready"):
            if self.svc.ready:
                return JSONResponse({"ready": True})
            return _error(503, f"model {self.cfg.model_name!r} is not ready", self.cfg.retry_after_s)
        if path.endswith(f"/v2/models/{self.cfg.model_name}") and request.method == "GET":
            d = self.svc.engine.describe()
            return JSONResponse({"name": self.cfg.model_name, "versions": ["1"], "platform": "dpr",
                                 "parameters": {"export": self.svc.export_dir, "model_hash": d["model_hash"],
                                                "num_items": d["num_items"], "backend": d["backend"],
                                                "retriever": d["retriever"], "last_reload": self.svc.last_reload}})
        if path.endswith("/recommend") and request.method == "POST":
            return await self._recommend(await request.body())
        return _error(404, f"no route {request.method} {request.url.path}; this deployment serves POST /recommend "
                           "and the /v2 health and metadata routes")

    async def _recommend(self, body: bytes) -> Response:
        if len(body) > self.cfg.max_body_bytes:
            return _error(413, f"request body is {len(body)} bytes; the limit is {self.cfg.max_body_bytes} "
                               "(--max-body-bytes)")
        try:
            reqs = _BODY.validate_json(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first.get("loc", ())) or "body"
            return _error(422, f"invalid request: {where}: {first.get('msg')}")
        single = not isinstance(reqs, list)
        reqs = [reqs] if single else reqs
        if not reqs:
            return _error(422, "the list of requests is empty")
        label = (lambda r: "request") if single else (lambda r: f"request {r}")
        try:
            parts = _parts_from_requests([Req.from_model(m) for m in reqs], self.svc, label)
        except LimitError as exc:
            return _error(exc.status, str(exc))
        except InputError as exc:
            return _error(422, str(exc))
        got = await asyncio.gather(*(self._batched(p) for p, _ in parts))
        if len(parts) == 1 and not isinstance(got[0][1], BaseException):   # the call's rows, in order
            body = recommend_body(*got[0])
            return Response(body if single else b"[" + body + b"]", media_type="application/json")
        out: list = [None] * len(reqs)
        for (_, rows), (engine, res) in zip(parts, got):
            if isinstance(res, InputError):
                return _error(getattr(res, "status", 422), str(res))
            if isinstance(res, BaseException):
                return _error(500, f"{type(res).__name__}: {res}")
            for r, text in zip(rows, recommend_json(engine, res)):
                out[r] = text
        text = out[0] if single else "[" + ", ".join(out) + "]"
        return Response(text.encode(), media_type="application/json")


def build_app(export_dir: str, config: dict | ServeConfig | None = None, *, engine_options: dict | None = None,
              num_replicas: int | str | None = None, autoscaling_config: dict | None = None,
              ray_actor_options: dict | None = None, **deployment_options: Any):
    """The bound Serve application: pass it to ``serve.run``. ``config``: ServeConfig fields (a dict or the
    dataclass). ``num_replicas`` / ``autoscaling_config`` / ``ray_actor_options`` and any other
    ``serve.deployment`` option (``max_ongoing_requests``, ``health_check_period_s``, ...) pass through."""
    if isinstance(config, ServeConfig):
        config = asdict(config)
    config = dict(config or {})
    known = {f.name for f in fields(ServeConfig)}
    bad = sorted(set(config) - known)
    if bad:
        raise InputError(f"unknown ServeConfig field(s) {bad}; known: {', '.join(sorted(known))}")
    ServeConfig(**config).check()         # a bad config fails here, not in every replica
    opts = dict(deployment_options)
    if num_replicas is not None and autoscaling_config is not None:
        raise InputError("pass num_replicas or autoscaling_config, not both")
    if num_replicas is not None:
        opts["num_replicas"] = num_replicas
    if autoscaling_config is not None:
        opts["autoscaling_config"] = autoscaling_config
    if ray_actor_options is not None:
        opts["ray_actor_options"] = ray_actor_options
    # absolute here: a replica's working directory is not the caller's (init_ray gives the job its own)
    export_dir = os.path.abspath(export_dir)
    opts.setdefault("user_config", {"export_dir": export_dir})
    dep = serve.deployment(DPRDeployment, name="dpr", **opts)
    return dep.bind(export_dir, config, engine_options)


def app_builder(args: dict):
    """``serve run`` / config-file entry point (``import_path: dpr.serve.ray:app_builder``). ``args``:
    ``export_dir`` (required), ``config`` (ServeConfig fields), ``engine_options``, and the deployment options
    of :func:`build_app`."""
    args = dict(args or {})
    if "export_dir" not in args:
        raise InputError("the application's args need export_dir (the dpr-export folder)")
    return build_app(args.pop("export_dir"), args.pop("config", None), **args)


def init_ray(**kwargs):
    """``ray.init(**kwargs)`` that keeps the caller's working directory off the workers' ``sys.path``.

    Ray puts the driver's current directory on every worker's ``sys.path`` unless the job has a runtime_env
    ``working_dir`` (``ray/_private/worker.py``; measured: started in the repository root, a replica's path held
    the root, so engine/, kernels/, ... stood ahead of installed modules). An empty ``working_dir`` (uploaded at
    init, so the local folder can go) stops that; a ``working_dir`` the caller gives is kept."""
    import tempfile

    ray = require("ray", "a Ray cluster")
    env = dict(kwargs.pop("runtime_env", None) or {})
    if "working_dir" in env:
        return ray.init(runtime_env=env, **kwargs)
    with tempfile.TemporaryDirectory(prefix="dpr-ray-") as empty:
        return ray.init(runtime_env={**env, "working_dir": empty}, **kwargs)


def run(export_dir: str, cfg: ServeConfig, num_replicas: int = 1, ray_address: str | None = None) -> None:
    """``dpr-serve --ray``: start (or join, ``ray_address``) a Ray cluster and serve on cfg.host:cfg.port until
    SIGINT or SIGTERM; then the application is deleted and a cluster this call started is stopped."""
    import signal
    import time

    ray = require("ray", "dpr-serve --ray")
    init_ray(address=ray_address, ignore_reinit_error=True)

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        config = {k: v for k, v in asdict(cfg).items() if k not in ("host", "port", "grpc_port", "metrics_port")}
        serve.run(build_app(export_dir, config, num_replicas=num_replicas), name="dpr", route_prefix="/")
        log.info("dpr-serve --ray: %s on http://%s:%d (%d replicas)", export_dir, cfg.host, cfg.port, num_replicas)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if ray_address is None:              # our own cluster: take it down with us
            serve.shutdown()
            ray.shutdown()
        else:                                # a shared cluster: remove only our application
            serve.delete("dpr")
