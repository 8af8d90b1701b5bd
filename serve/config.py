"""``ServeConfig``: every ``dpr-serve`` flag is one of its fields (``max_queue_delay_us`` ->
``--max-queue-delay-us``). Batching fields carry Triton's names so a Triton user reads them as they are."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dpr import util
from dpr.errors import InputError


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000                      # HTTP (the dpr service, or Triton's HTTP endpoint with --triton)
    grpc_port: int = 8001                 # Triton only
    metrics_port: int = 8002              # Triton only (the dpr service serves /metrics on --port)
    model_name: str = "dpr"
    # engine
    backend: str = "auto"
    retriever: str = "auto"
    unknown_items: str = "error"          # "ignore": unknown history ids are skipped instead of a 422
    # batching, with Triton's names (dynamic_batching { preferred_batch_size, max_queue_delay_microseconds })
    max_batch_size: int = 512             # rows per engine call
    preferred_batch_size: int = 512       # Triton: the batch size the scheduler tries to form
    # how long the first queued request waits for company. 0 (Triton's default too): a batch starts as soon as the
    # engine is free, with whatever is queued; requests that arrive while it runs form the next batch. With 64
    # single-request clients on the 2-core VM, 0 served 4,214-4,414 requests/s against 3,162-3,793 at 2,000 us
    # (docs/LOAD_TEST.md): waiting kept the engine idle while requests queued.
    max_queue_delay_us: int = 0
    instances: int = 1                    # Triton: instance_group count (each an engine)
    # Triton: which backend runs the model. "native": libtriton_dpr.so inside tritonserver, one Python call per batch
    # (serve/triton_native.py; 64 single-request clients: docs/LOAD_TEST.md); "python": Triton's Python backend (a
    # stub process per instance; portable to NVIDIA's container as written); "auto": native where it builds (g++ and
    # this Python's headers and libpython), else python, saying why.
    triton_backend: str = "auto"
    # Triton: its HTTP front end's threads (tritonserver --http-thread-count; Triton's own default is 8). 0: one per
    # two physical cores, at least 1 and at most 8. With one model instance the front's threads only parse and
    # answer: on the 2-core VM, 64 single-request clients got 0.34-0.39 of the in-process engine with 1 thread
    # against 0.32-0.35 with 8, 5 rounds of 5 alternated (docs/LOAD_TEST.md)
    http_thread_count: int = 0
    max_queue: int = 4096                 # rows waiting beyond this: 503 + Retry-After (back-pressure)
    # limits on one HTTP call (each refusal names the limit)
    max_body_bytes: int = 8 << 20         # 413 beyond this
    max_requests_per_call: int = 4096     # rows in one /recommend list or one v2 infer call (422)
    max_history: int = 4096               # item ids in one history (422)
    max_k: int = 1000                     # (422; k is also capped by the catalogue)
    max_prompt_bytes: int = 16384         # UTF-8 bytes of one prompt (422)
    # the HTTP service's front for POST /recommend and the v2 infer route: "batched" answers plain valid calls a batch
    # per event-loop turn ahead of ASGI (serve/http_front.py; 64 single-request clients: docs/LOAD_TEST.md), "asgi"
    # sends every call through the ASGI app (uvicorn's own protocol). Same answers, byte for byte.
    http_front: str = "batched"
    # how a body of body_columns.MIN_BYTES or more is read: "native" (the history ids mapped to catalogue indices in
    # one C call without the GIL: a /recommend body by the batching front, serve/body_columns.py, and a v2 infer call
    # in binary tensors, serve/v2_columns.py; 512-request calls: docs/LOAD_TEST.md) or "python" (json.loads or the
    # v2 decoder, then per-request checks, as smaller bodies always are). Same answers, byte for byte.
    http_body_parser: str = "native"
    # the serving process's GIL switch interval (sys.setswitchinterval), in microseconds; 0 keeps Python's 5,000. The
    # event loop drops the GIL on every poll and then waits up to the interval for the engine's threads to give it
    # back: with 64 single-request clients, 2,000 served 7-11% more requests/s than 5,000 (docs/LOAD_TEST.md)
    switch_interval_us: int = 2000
    # lifecycle
    warmup: bool = True                   # one small batch before /v2/health/ready says yes
    drain_timeout_s: float = 30.0         # SIGTERM: how long in-flight requests may take to finish
    # faults: a batch the engine has not answered in this time fails (504) and its worker thread is replaced,
    # so a hung backend or retriever cannot stall the service (generous: a big batch on a loaded CPU takes ~1 s)
    batch_timeout_s: float = 30.0
    retry_after_s: int = 1                # the Retry-After header on 503

    def check(self) -> "ServeConfig":
        if self.unknown_items not in ("error", "ignore"):
            raise InputError(f"unknown_items must be 'error' or 'ignore', got {self.unknown_items!r}")
        if self.triton_backend not in ("auto", "native", "python"):
            raise InputError(f"triton_backend must be 'auto', 'native' or 'python', got {self.triton_backend!r}")
        if self.http_front not in ("batched", "asgi"):
            raise InputError(f"http_front must be 'batched' or 'asgi', got {self.http_front!r}")
        if self.http_body_parser not in ("native", "python"):
            raise InputError(f"http_body_parser must be 'native' or 'python', got {self.http_body_parser!r}")
        for name in ("max_batch_size", "preferred_batch_size", "max_queue", "max_body_bytes",
                     "max_requests_per_call", "max_history", "max_k", "max_prompt_bytes", "instances"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.http_thread_count < 0:
            raise InputError(f"http_thread_count must be >= 0 (0: one per two cores, at most 8), got "
                             f"{self.http_thread_count}")
        if self.switch_interval_us < 0:
            raise InputError(f"switch_interval_us must be >= 0 (0: Python's default), got {self.switch_interval_us}")
        if self.max_queue_delay_us < 0:
            raise InputError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        t = self.batch_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise InputError(f"batch_timeout_s must be a finite number of seconds > 0, got {t!r}")
        if self.preferred_batch_size > self.max_batch_size:
            raise InputError(f"preferred_batch_size ({self.preferred_batch_size}) exceeds max_batch_size "
                             f"({self.max_batch_size})")
        return self

    def triton_http_threads(self) -> int:
        """tritonserver's --http-thread-count: ``http_thread_count``, or for 0 one per two physical cores (1..8)."""
        if self.http_thread_count:
            return self.http_thread_count
        return max(1, min(8, util.physical_cores() // 2))
