"""The soak's HTTP target: the pool's requests posted to ``dpr-serve``'s ``/recommend`` (a uvicorn subprocess on
127.0.0.1), each answer turned into an :class:`~dpr.bench.soak.Answer` the soak checks as it checks the
batcher's.

A 200 is ``Answer(True, ids, scores)``; a 4xx is an error ``Answer`` with the service's message. The service
words its refusals itself (pydantic's "k: Input should be a valid integer" where the engine says "k must be an
integer"), so :meth:`HttpTarget.same_error` accepts a 4xx that names the same field as the engine's error (a
prompt of invalid UTF-8 cannot be named: its body is not UTF-8 JSON, and the 4xx must say so). A 5xx is an
error Answer that matches nothing (``error_mismatch`` or ``unexpected``); a timeout or a dropped connection
raises in the future, which the soak counts as ``lost``.
"""

from __future__ import annotations

import json
import re
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from .soak import Answer

# the request fields an error can be about, as the engine and the service word them ("_" read as " ")
_FIELDS = ("negative prompt", "hard filter", "exclude history", "history", "prompt", "k")


def error_field(message: str) -> str | None:
    """The request field an error message is about: an unknown field's own name, the field pydantic's location
    starts with, else the field word that comes first in the message."""
    m = re.search(r"unknown field\(s\) \['([^']*)'", message) or \
        re.match(r"invalid request: ([A-Za-z_]\w*)[.:]", message)           # pydantic's location: the field first
    if m:
        return m.group(1).lower().replace("_", " ")
    text = message.lower().replace("_", " ")
    hits = [(mt.start(), f) for f in _FIELDS for mt in [re.search(rf"(^|[^a-z]){re.escape(f)}([^a-z]|$)", text)] if mt]
    return min(hits)[1] if hits else None


def encode_body(request: dict) -> bytes:
    """The request as a client's JSON body. A ``bytes`` value (the pool's prompt of invalid UTF-8) goes in raw,
    as a hostile client would send it; other values as ``json.dumps`` writes them (NaN as the bare word NaN,
    lone surrogates escaped)."""
    raw: dict = {}

    def default(v):
        if isinstance(v, (bytes, bytearray)):
            token = f"@@raw{len(raw)}@@"
            raw[token] = bytes(v)
            return token
        raise TypeError(f"{type(v).__name__} is not JSON")
    body = json.dumps(request, default=default).encode()
    for token, b in raw.items():
        body = body.replace(token.encode(), b)
    return body


class HttpTarget:
    """Posts each request to ``url``/recommend from ``workers`` client threads (one connection each)."""
    name = "http"

    def __init__(self, url: str, workers: int = 32, timeout_s: float = 60.0):
        import httpx

        self.client = httpx.Client(base_url=url, timeout=timeout_s,
                                   limits=httpx.Limits(max_connections=workers, max_keepalive_connections=workers))
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="soak-http")
        self.status: dict = {}

    def submit(self, request) -> Future:
        return self.pool.submit(self._post, request)

    def _post(self, request) -> Answer:
        r = self.client.post("/recommend", content=encode_body(request),
                             headers={"content-type": "application/json"})
        self.status[r.status_code] = self.status.get(r.status_code, 0) + 1   # one key per status: GIL-safe
        if r.status_code == 200:
            data = r.json()
            return Answer(True, [i["id"] for i in data["items"]], [float(i["score"]) for i in data["items"]])
        try:
            msg = r.json().get("error", "")
        except ValueError:
            msg = r.text[:300]
        return Answer(False, error_type=f"HTTP {r.status_code}", message=str(msg))

    def same_error(self, expected: Answer, got: Answer) -> bool:
        if got.ok or not re.fullmatch(r"HTTP 4\d\d", got.error_type) or not got.message:
            return False
        if "UTF-8" in expected.message and "cannot be parsed as JSON" in got.message:
            return True                           # raw invalid bytes: the body is not UTF-8 JSON text
        want = error_field(expected.message)
        return want is not None and error_field(got.message) == want

    def stats(self) -> dict:
        return {"http_status": {str(k): v for k, v in sorted(self.status.items())}}

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.client.close()


@contextmanager
def http_server(export_dir, backend: str = "onnxruntime", retriever: str = "auto", max_batch: int = 64,
                max_delay_ms: float = 2.0, log_path=None):
    """``dpr-serve`` on ``export_dir`` at a free 127.0.0.1 port, ready; yields the :class:`Server` (``.url``,
    ``.proc.pid``) and stops it (SIGTERM, bounded wait) on exit."""
    from dpr.serve.procs import Server, free_port

    port = free_port()
    cmd = [sys.executable, "-P", "-m", "dpr.serve.cli", str(export_dir), "--port", str(port), "--log-level", "warning",
           "--backend", backend, "--retriever", retriever, "--max-batch-size", str(max_batch),
           "--preferred-batch-size", str(max_batch), "--max-queue-delay-us", str(int(max_delay_ms * 1000))]
    s = Server(cmd, port, log_path=log_path or Path(export_dir).parent / f"soak-server-{port}.log").start()
    try:
        yield s
    finally:
        s.stop()
