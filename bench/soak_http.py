"""The soak's HTTP target: the pool's requests posted to ``dpr-serve``'s ``/recommend`` (a uvicorn subprocess on
127.0.0.1), each answer turned into an :class:`~dpr.bench.soak.Answer` the soak checks as it checks the
batcher's.

A 200 is ``Answer(True, ids, scores)``; a 4xx is an error ``Answer`` with the service's message. The service
words its refusals itself (pydantic's "k: Input should be a valid integer" where the engine says "k must be an
integer"), so :meth:`HttpTarget.same_error` accepts a 4xx that names the same field as the engine's error (a
prompt of invalid UTF-8 cannot be named: its body is not UTF-8 JSON, and the 4xx must say so). A 5xx is an
error Answer that matches nothing (``error_mismatch`` or ``unexpected``); a timeout or a dropped connection
raises in the future, which the soak counts as ``lost`` (and ``stats()`` counts by exception type).

Keep-alive: uvicorn closes a connection idle for ``timeout_keep_alive`` (5 s), and httpx's default keep-alive expiry
is also 5 s, counted from when the client finished reading the response (later than the server's timer started).
A request sent on a connection about 5 s idle meets the server's close: the connection is closed before the
request is read (under uvloop expired timers run before the loop reads its sockets), and the client gets
``ReadError: Connection reset by peer`` or ``RemoteProtocolError: Server disconnected without sending a
response``; httpx never retries a POST. Under the soak, connections at the end of httpcore's list idle for seconds
between peaks: 9 answers lost in 40,000 (8 threads x 5,000, 2026-12-05), the 1 in 54,686 of the first HTTP soak.
The client now drops a connection after ``keepalive_expiry_s`` (1 s) idle, well inside the server's 5 s. A reset is
still a lost answer (no retry), so a server that drops connections is still caught.
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


class HttpStatusBooks:
    """What the HTTP-speaking soak targets share: their books (answers per status, transport errors) and the
    first test of ``same_error``: only a 4xx with a message can be a refusal."""

    status: dict
    transport_errors: dict

    @staticmethod
    def is_refusal(got: Answer) -> bool:
        return not got.ok and bool(re.fullmatch(r"HTTP 4\d\d", got.error_type)) and bool(got.message)

    def stats(self) -> dict:
        return {"http_status": {str(k): v for k, v in sorted(self.status.items())},
                "transport_errors": dict(self.transport_errors)}


class HttpTarget(HttpStatusBooks):
    """Posts each request to ``url``/recommend from ``workers`` client threads (one connection each)."""
    name = "http"

    def __init__(self, url: str, workers: int = 32, timeout_s: float = 60.0, keepalive_expiry_s: float = 1.0):
        import httpx

        # keep-alive expiry well under uvicorn's timeout_keep_alive (5 s): see the module docstring
        self.client = httpx.Client(base_url=url, timeout=timeout_s,
                                   limits=httpx.Limits(max_connections=workers, max_keepalive_connections=workers,
                                                       keepalive_expiry=keepalive_expiry_s))
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="soak-http")
        self.status: dict = {}
        self.transport_errors: dict = {}

    def submit(self, request) -> Future:
        return self.pool.submit(self._post, request)

    def _post(self, request) -> Answer:
        try:
            r = self.client.post("/recommend", content=encode_body(request),
                                 headers={"content-type": "application/json"})
        except Exception as exc:  # noqa: BLE001 - counted by type, then lost (raised in the future)
            key = f"{type(exc).__name__}: {exc}"[:120]
            self.transport_errors[key] = self.transport_errors.get(key, 0) + 1
            raise
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
        if not self.is_refusal(got):
            return False
        if "UTF-8" in expected.message and "cannot be parsed as JSON" in got.message:
            return True                           # raw invalid bytes: the body is not UTF-8 JSON text
        want = error_field(expected.message)
        return want is not None and error_field(got.message) == want

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
