"""The state behind the HTTP service: the engine, its batcher, readiness, hot reload. No HTTP here.

Loading runs on a thread after the server starts, so ``/v2/health/live`` answers at once and
``/v2/health/ready`` says yes only once the engine has loaded and run one warm-up batch. A reload (the v2
repository ``load`` call or SIGHUP) builds and warms the new engine aside while the old one serves, then
swaps it in between two batches; a broken export leaves the old engine serving and the error is returned
and kept in ``last_reload``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time

from dpr.engine import Engine, RequestBatch
from dpr.errors import InputError

from .batcher import Batcher
from .columns import IdCheck, relabel_rows
from .metrics import Metrics
from .render import tables

log = logging.getLogger("dpr.serve")


class NotReady(Exception):
    pass


class Service:
    def __init__(self, export_dir: str, cfg, engine_options: dict | None = None):
        self.export_dir = str(export_dir)
        self.cfg = cfg
        self.engine_options = dict(engine_options or {})
        self.metrics = Metrics()
        self.engine = None
        self.batcher: Batcher | None = None
        self.ids: IdCheck | None = None
        self.load_error: str | None = None
        self.last_reload: dict | None = None
        self._reload_lock = threading.Lock()
        self.freeze_gc = True        # see _freeze_gc

    def _freeze_gc(self, unfreeze: bool = False) -> None:
        """Move the loaded engine's objects out of the cyclic collector's reach (``gc.freeze``). With the
        default 100,000-item export ~250,000 tracked objects live from start-up on, and every full collection
        walked them all: a ~200 ms pause of every call in flight on the 2-core VM, about once per 10,000
        single-request calls (enough to set a run's p99). Collected first, so no garbage is frozen; a reload
        unfreezes, collects (one pause, with the old engine's cycles gone) and freezes the new engine."""
        if not self.freeze_gc:
            return
        if unfreeze:
            gc.unfreeze()
        gc.collect()
        gc.freeze()

    # ---- loading --------------------------------------------------------------------------------
    def _build(self, export_dir: str):
        engine = Engine.load(export_dir, backend=self.cfg.backend, retriever=self.cfg.retriever,
                             unknown_items=self.cfg.unknown_items, max_prompt_bytes=self.cfg.max_prompt_bytes,
                             **self.engine_options)
        try:
            if self.cfg.warmup:    # first-call costs (sessions, kernels, pools) are paid before "ready"
                ex = engine.item_ids[:2] or ["?"]
                engine.recommend_batch(RequestBatch.from_histories([ex, ex[:1]], prompts=["warm up", None], k=1))
            # /recommend's render tables and the id index its native body parser maps through: built here, not on
            # the first request
            tables(engine).id_index()
        except BaseException:
            engine.close()
            raise
        return engine

    def _batcher(self, engine) -> Batcher:
        c = self.cfg
        return Batcher(engine, c.max_batch_size, c.preferred_batch_size, c.max_queue_delay_us, c.max_queue,
                       on_batch=self.metrics.on_batch, batch_timeout_s=c.batch_timeout_s,
                       on_error=self.metrics.on_error)

    def load(self) -> None:
        """First load (on a thread at start-up)."""
        t0 = time.perf_counter()
        try:
            engine = self._build(self.export_dir)
        except Exception as exc:  # noqa: BLE001 - reported by /v2/health/ready and the log
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("dpr-serve: the export %s did not load: %s", self.export_dir, self.load_error)
            return
        self.engine = engine
        self.ids = IdCheck(engine, self.cfg.unknown_items)
        self._freeze_gc()              # before the batcher: the service is ready (serves) once it exists
        self.batcher = self._batcher(engine)
        self.metrics.set_engine(engine)
        self.metrics.ready.set(1)
        log.info("dpr-serve: ready in %.1f s (%s)", time.perf_counter() - t0, engine.choice_reason)

    @property
    def ready(self) -> bool:
        return self.batcher is not None and not self.batcher._closed   # noqa: SLF001

    def reload(self, export_dir: str | None = None) -> dict:
        """Build ``export_dir`` (default: the current one) aside and swap it in; raises on failure with the
        old engine still serving. Blocking: call it on a thread."""
        path = str(export_dir or self.export_dir)
        with self._reload_lock:
            t0 = time.perf_counter()
            try:
                engine = self._build(path)
            except Exception as exc:
                self.metrics.reloads.labels("failed").inc()
                self.last_reload = {"export": path, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
                log.error("dpr-serve: reload of %s failed, the old engine keeps serving: %s", path, exc)
                raise
            if self.batcher is None:           # the first load had failed: this is the first engine
                self.export_dir = path
                self.load_error = None
                self.engine = engine
                self.ids = IdCheck(engine, self.cfg.unknown_items)
                self.batcher = self._batcher(engine)
                old = None
            else:
                # parts are checked against self.ids before they queue; the engine re-checks, so a part
                # checked against the old catalogue and run on the new one still gets a precise 422
                self.ids = IdCheck(engine, self.cfg.unknown_items)
                old = self.batcher.swap(engine)
                self.engine = engine
                self.export_dir = path
            if old is not None:
                old.close()
            self._freeze_gc(unfreeze=True)
            self.metrics.set_engine(engine)
            self.metrics.ready.set(1)
            self.metrics.reloads.labels("ok").inc()
            self.last_reload = {"export": path, "ok": True, "seconds": round(time.perf_counter() - t0, 3),
                                "model_hash": engine.model_hash}
            log.info("dpr-serve: reloaded %s in %.1f s", path, time.perf_counter() - t0)
            return self.last_reload

    async def reload_async(self, export_dir: str | None = None) -> dict:
        return await asyncio.to_thread(self.reload, export_dir)

    # ---- serving --------------------------------------------------------------------------------
    async def run_parts(self, parts, label=None) -> tuple:
        """Await every Part of one call (usually one): ``(engine, [ResultBatch per Part])``. Parts queued
        together run on one engine (a swap happens between batches; a call whose Parts straddle a swap is
        rare and is run again on the new engine so that one catalogue renders it). An engine InputError about
        a Part's row j names the call's own row (``label(row)``, default "row N")."""
        if not self.ready:
            raise NotReady(self.load_error or "the engine is loading")
        b = self.batcher
        futs = [b.submit_async(p) for p, _ in parts]      # all queued at once: they may share a batch
        got = []
        for f, (_, rows) in zip(futs, parts):
            try:
                got.append(await f)
            except InputError as exc:
                raise InputError(relabel_rows(str(exc), rows, label)) from None
        engines = {id(e) for e, _ in got}
        if len(engines) > 1:
            return await self.run_parts(parts, label)
        return got[0][0], [r for _, r in got]

    def close(self) -> None:
        """Finish the queued requests, then release the engine (SIGTERM's last step)."""
        self.metrics.ready.set(0)
        if self.batcher is not None:
            self.batcher.close(self.cfg.drain_timeout_s)
        if self.engine is not None:
            if self.batcher is not None and self.batcher.hung_on(self.engine):
                # a timed-out batch is still inside it: closing its sessions under that thread could crash the
                # process; the process is ending, so leave it to the exit
                log.warning("dpr-serve: a hung batch is still inside the engine; not closing it")
                return
            self.engine.close()
