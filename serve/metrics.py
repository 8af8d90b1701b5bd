"""Prometheus metrics of the HTTP service (the official ``prometheus_client``), one registry per app so two
apps in one process (the tests) never share counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .075, .1, .25, .5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("dpr_http_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("dpr_http_request_duration_seconds", "HTTP request latency by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.rows = Counter("dpr_recommendations", "recommendation rows answered", registry=r)
        self.batch_rows = Histogram("dpr_batch_size", "rows per engine call", buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("dpr_batch_duration_seconds", "seconds per engine call",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("dpr_queue_depth", "rows waiting for the batcher", registry=r)
        self.cache_hit_rate = Gauge("dpr_prompt_cache_hit_rate", "prompt cache hits / lookups since load",
                                    registry=r)
        self.cache_hits = Gauge("dpr_prompt_cache_hits", "prompt cache hits since load", registry=r)
        self.ready = Gauge("dpr_ready", "1 when the engine is loaded and warmed up", registry=r)
        # faults: requests failed inside the engine (not by their input), by kind ("exception": the backend or
        # retriever raised; "timeout": the batch ran past batch_timeout_s), and worker threads replaced after a hang
        self.engine_errors = Counter("dpr_engine_errors", "requests failed by an engine fault, by kind "
                                     "(exception, timeout)", ["kind"], registry=r)
        self.workers_replaced = Counter("dpr_batcher_workers_replaced", "batcher worker threads replaced after a "
                                        "batch hung past batch_timeout_s", registry=r)
        self.reloads = Counter("dpr_reloads", "hot reloads by outcome", ["outcome"], registry=r)
        self.backend = Info("dpr_backend", "the engine in use: backend, retriever, device, model hash", registry=r)
        self._children: dict = {}       # (route, status) -> the labelled children of requests and latency

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        """One HTTP request: its count by (route, status) and its latency by route. The labelled children are kept
        per (route, status): ``labels()`` builds and validates its key under a lock on every call."""
        kids = self._children.get((route, status))
        if kids is None:
            kids = self._children[(route, status)] = (self.requests.labels(route, str(status)),
                                                      self.latency.labels(route))
        kids[0].inc()
        kids[1].observe(seconds)

    def on_batch(self, rows: int, seconds: float) -> None:
        self.batch_rows.observe(rows)
        self.batch_seconds.observe(seconds)
        self.rows.inc(rows)

    def on_error(self, kind: str, requests: int) -> None:
        self.engine_errors.labels(kind).inc(requests)
        if kind == "timeout":
            self.workers_replaced.inc()

    def set_engine(self, engine) -> None:
        d = engine.describe()
        be = d.get("backend") or {}
        self.backend.info({"backend": str(be.get("backend", be) if isinstance(be, dict) else be),
                           "retriever": str(d.get("retriever")), "device": str(d.get("device")),
                           "model_hash": str(d.get("model_hash")), "export": str(d.get("export"))})

    def render(self, batcher=None, engine=None) -> tuple[bytes, str]:
        if batcher is not None:
            self.queue_depth.set(batcher.queued_rows)
        if engine is not None:
            st = engine.prompt_cache.stats()
            self.cache_hit_rate.set(st["hit_rate"])
            self.cache_hits.set(st["hits"])
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
