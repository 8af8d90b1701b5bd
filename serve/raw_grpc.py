"""A hand-written gRPC client for the load test: unary calls over one cleartext HTTP/2 connection, one call in
flight at a time, requests prepared once as serialized protobuf bytes.

Why: on the 2-core VM the load client shares the cores with the server it measures. grpcio's Python client
(grpc.aio, or a sync channel with futures) cost 67-85 us of client CPU per single-request call against Triton;
the hand-written HTTP/1.1 client of the HTTP targets (``dpr.serve.load.RawHTTP``) costs about 25. So gRPC
targets measured the client as much as the server. This one costs about the same as RawHTTP: a call is one
``write`` of prepared frames and a parse of the three frames that answer it.

What it speaks (RFC 9113 and the gRPC-over-HTTP/2 spec), and nothing more:

* the connection preface with our SETTINGS (no push; the largest stream window, so the server never waits on
  us) and a connection WINDOW_UPDATE, replenished as answers arrive;
* a request: HEADERS (a constant HPACK block, literals only, so our side keeps no table) and DATA frames cut to
  the peer's SETTINGS_MAX_FRAME_SIZE and held back by its connection and stream windows (WINDOW_UPDATE and
  SETTINGS_INITIAL_WINDOW_SIZE move them);
* an answer: HEADERS (+ CONTINUATION), DATA (padding stripped), trailers; HPACK decoded by ``hpack`` (the
  server's dynamic table is followed on every block; a block that leaves the table as it was is cached by its
  bytes, so a steady stream of identical answers costs a dict lookup);
* SETTINGS and PING are acknowledged; RST_STREAM fails the call naming the code; GOAWAY fails a call the server
  will not answer and the next call reconnects.

A call returns ``(grpc_status, message, body)``: the status from the trailers (0 = OK), grpc-message
percent-decoded, and the response message's bytes (the 5-byte gRPC prefix removed). Anything the protocol does
not allow raises :class:`GrpcProtocolError` naming it, and the connection is dropped (a half-read answer would
desynchronise it).
"""

from __future__ import annotations

import asyncio
import struct
from urllib.parse import unquote_to_bytes

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
SET_ENABLE_PUSH, SET_INITIAL_WINDOW, SET_MAX_FRAME = 0x2, 0x4, 0x5
MAX_WINDOW = 2 ** 31 - 1
DEFAULT_WINDOW = 65535
DEFAULT_MAX_FRAME = 16384
REPLENISH_AT = 1 << 30            # received bytes after which the connection window is topped up again
MAX_STREAM_ID = 2 ** 31 - 1
STATUS_NAMES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
                "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
                "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")


class GrpcProtocolError(RuntimeError):
    """The server's answer broke HTTP/2 or gRPC framing, or the connection ended mid-call."""


def status_name(code: int) -> str:
    return STATUS_NAMES[code] if 0 <= code < len(STATUS_NAMES) else f"status {code}"


def _frame(ftype: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((ftype, flags)) + struct.pack(">I", stream) + payload


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    """RFC 7541 5.1: ``value`` with an N-bit prefix; ``first`` holds the pattern bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_str(s: bytes) -> bytes:
    return _hpack_int(len(s), 7, 0) + s                   # not Huffman-coded: the peer reads either


def request_header_block(authority: str, path: str) -> bytes:
    """The HPACK block of every call on a connection: ``:method POST`` and ``:scheme http`` indexed from the
    static table, the rest literals without indexing (the server's decoder table is never touched, so the block
    is the same bytes for every call)."""
    return (b"\x83\x86"                                               # :method POST, :scheme http
            + _hpack_int(4, 4, 0x00) + _hpack_str(path.encode())      # :path (static name 4)
            + _hpack_int(1, 4, 0x00) + _hpack_str(authority.encode())  # :authority (static name 1)
            + _hpack_int(31, 4, 0x00) + _hpack_str(b"application/grpc")  # content-type (static name 31)
            + b"\x00" + _hpack_str(b"te") + _hpack_str(b"trailers"))


class RawGRPC:
    """Unary calls to ``path`` on ``host:port``, one at a time, over one HTTP/2 connection (see the module doc),
    opened on the first call and again after one was dropped. ``await call(message)`` ->
    ``(grpc_status, message, body)``."""

    def __init__(self, host: str, port: int, path: str, timeout_s: float = 120.0):
        self.host, self.port, self.path, self.timeout_s = host, int(port), path, timeout_s
        self.block = request_header_block(f"{host}:{port}", path)
        self.conn: _Connection | None = None
        self.busy = False

    async def call(self, message: bytes) -> tuple[int, str, bytes]:
        if self.busy:
            raise RuntimeError("RawGRPC makes one call at a time; use one per concurrent client")
        self.busy = True
        try:
            conn = self.conn
            if conn is None or not conn.usable():
                self.close()
                conn = self.conn = _Connection(self.block)
                await asyncio.get_running_loop().create_connection(lambda: conn, self.host, self.port)
            try:
                return await conn.call(message, self.timeout_s)
            except BaseException:
                self.close()                              # a stream left half-answered: start afresh next call
                raise
        finally:
            self.busy = False

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection's state; a dropped connection is never reused (a new one is made)."""

    def __init__(self, block: bytes):
        from hpack import Decoder

        self.block = block
        self.transport = None
        self.decoder = Decoder()
        self._hcache: dict[bytes, dict] = {}           # header block -> its fields (see _on_headers)
        self.buf = bytearray()
        self.stream = -1                                  # next call uses stream + 2 (client streams are odd)
        self.last_stream_allowed = MAX_STREAM_ID         # lowered by GOAWAY
        self.send_conn = DEFAULT_WINDOW                   # what the peer lets us send
        self.peer_initial = DEFAULT_WINDOW
        self.max_frame = DEFAULT_MAX_FRAME
        self.received = 0
        self.waiter: asyncio.Future | None = None
        self._continuing: bytearray | None = None
        self._continuing_end = False
        self.closed = False

    def usable(self) -> bool:
        return not self.closed and self.transport is not None and self.stream + 2 <= self.last_stream_allowed

    def connection_made(self, transport) -> None:
        self.transport = transport
        settings = struct.pack(">HI", SET_ENABLE_PUSH, 0) + struct.pack(">HI", SET_INITIAL_WINDOW, MAX_WINDOW)
        transport.write(PREFACE + _frame(SETTINGS, 0, 0, settings)
                        + _frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", MAX_WINDOW - DEFAULT_WINDOW)))

    def connection_lost(self, exc) -> None:
        self.closed = True
        self._fail(GrpcProtocolError("the connection was lost mid-call" + (f": {exc}" if exc else "")))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # ---- a call ---------------------------------------------------------------------------------------------
    async def call(self, message: bytes, timeout_s: float) -> tuple[int, str, bytes]:
        self.stream += 2
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        # a timer on the loop, not asyncio.wait_for: that wraps every call in a task (~15 us of client CPU)
        timer = loop.call_later(timeout_s, self._fail, TimeoutError(f"no answer within {timeout_s:g} s"))
        self.headers: dict = {}
        self.trailers: dict | None = None
        self.body: list[bytes] = []
        self.send_stream = self.peer_initial
        self.pending = memoryview(b"\x00" + struct.pack(">I", len(message)) + message)
        self._send_data(_frame(HEADERS, END_HEADERS, self.stream, self.block))   # one write: one syscall
        try:
            return await self.waiter
        finally:
            timer.cancel()
            self.waiter = None

    def _send_data(self, head: bytes = b"") -> None:
        """``head``, then as much of the pending request as the peer's windows and frame size let through, in
        one write."""
        pending, out = self.pending, [head]
        while len(pending):
            n = min(len(pending), self.send_conn, self.send_stream, self.max_frame)
            if n <= 0:
                break
            self.send_conn -= n
            self.send_stream -= n
            out.append(_frame(DATA, END_STREAM if n == len(pending) else 0, self.stream, bytes(pending[:n])))
            pending = pending[n:]
        self.pending = pending
        if len(out) > 1 or head:
            self.transport.write(b"".join(out))

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def _finish(self) -> None:
        if self.waiter is None or self.waiter.done():
            return
        head = self.headers
        trailers = self.trailers if self.trailers is not None else head            # a trailers-only answer
        if head.get(b":status") != b"200":
            return self._fail(GrpcProtocolError(f"HTTP status {head.get(b':status', b'?').decode()} on a gRPC call"))
        if b"grpc-status" not in trailers:
            return self._fail(GrpcProtocolError("the answer ended without a grpc-status trailer"))
        code = int(trailers[b"grpc-status"])
        msg = unquote_to_bytes(trailers.get(b"grpc-message", b"")).decode("utf-8", "replace")
        body = b"".join(self.body)
        if code == 0:
            if len(body) < 5 or body[0] != 0 or int.from_bytes(body[1:5], "big") != len(body) - 5:
                return self._fail(GrpcProtocolError(f"the answer is not one uncompressed gRPC message "
                                                    f"({len(body)} bytes, prefix {body[:5]!r})"))
            body = body[5:]
        self.waiter.set_result((code, msg, body))

    # ---- what the server sends -------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos, n = 0, len(buf)
        try:
            while n - pos >= 9:
                length = int.from_bytes(buf[pos:pos + 3], "big")
                if n - pos < 9 + length:
                    break
                ftype, flags = buf[pos + 3], buf[pos + 4]
                stream = int.from_bytes(buf[pos + 5:pos + 9], "big") & 0x7FFFFFFF
                payload = bytes(buf[pos + 9:pos + 9 + length])
                pos += 9 + length
                self._on_frame(ftype, flags, stream, payload)
        except Exception as exc:  # noqa: BLE001 - a broken answer fails the call, and the connection goes
            self._fail(exc if isinstance(exc, GrpcProtocolError) else GrpcProtocolError(f"bad answer: {exc!r}"))
            self.close()
            return
        del buf[:pos]

    def _on_frame(self, ftype: int, flags: int, stream: int, payload: bytes) -> None:
        if self._continuing is not None and ftype != CONTINUATION:
            raise GrpcProtocolError(f"frame type {ftype} inside a header block (CONTINUATION expected)")
        if ftype == DATA:
            self.received += len(payload)
            if flags & PADDED:
                payload = payload[1:len(payload) - payload[0]]
            if stream == self.stream:
                self.body.append(payload)
                if flags & END_STREAM:
                    self._finish()
            if self.received >= REPLENISH_AT:
                self.transport.write(_frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self.received)))
                self.received = 0
        elif ftype == HEADERS:
            if flags & PADDED:
                payload = payload[1:len(payload) - payload[0]]
            if flags & PRIORITY_FLAG:
                payload = payload[5:]
            if flags & END_HEADERS:
                self._on_headers(stream, payload, bool(flags & END_STREAM))
            else:
                self._continuing, self._continuing_end, self._cont_stream = bytearray(payload), bool(flags & END_STREAM), stream
        elif ftype == CONTINUATION:
            if self._continuing is None:
                raise GrpcProtocolError("CONTINUATION without a header block")
            self._continuing += payload
            if flags & END_HEADERS:
                block, self._continuing = bytes(self._continuing), None
                self._on_headers(self._cont_stream, block, self._continuing_end)
        elif ftype == SETTINGS:
            if flags & ACK:
                return
            for i in range(0, len(payload) - 5, 6):
                key, value = struct.unpack(">HI", payload[i:i + 6])
                if key == SET_INITIAL_WINDOW:
                    if self.waiter is not None:
                        self.send_stream += value - self.peer_initial
                    self.peer_initial = value
                elif key == SET_MAX_FRAME:
                    self.max_frame = value
            self.transport.write(_frame(SETTINGS, ACK, 0))
            if self.waiter is not None:
                self._send_data()
        elif ftype == WINDOW_UPDATE:
            inc = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            if stream == 0:
                self.send_conn += inc
            elif stream == self.stream:
                self.send_stream += inc
            if self.waiter is not None and len(self.pending):
                self._send_data()
        elif ftype == PING:
            if not flags & ACK:
                self.transport.write(_frame(PING, ACK, 0, payload))
        elif ftype == RST_STREAM:
            if stream == self.stream:
                code = int.from_bytes(payload[:4], "big")
                self._fail(GrpcProtocolError(f"the server reset the stream (HTTP/2 error code {code})"))
        elif ftype == GOAWAY:
            self.last_stream_allowed = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            code = int.from_bytes(payload[4:8], "big")
            if self.stream > self.last_stream_allowed:
                self._fail(GrpcProtocolError(f"the server is going away (GOAWAY, error code {code}, last stream "
                                             f"{self.last_stream_allowed}): the call was not processed"))
        elif ftype == PUSH_PROMISE:
            raise GrpcProtocolError("PUSH_PROMISE although push was disabled")
        # PRIORITY and unknown frame types are ignored, as RFC 9113 requires

    def _on_headers(self, stream: int, block: bytes, end_stream: bool) -> None:
        fields = self._hcache.get(block)
        if fields is None:
            table = self.decoder.header_table
            before = (table.maxsize, tuple(table.dynamic_entries))
            fields = dict(self.decoder.decode(block, raw=True))
            if (table.maxsize, tuple(table.dynamic_entries)) == before:
                self._hcache[block] = fields                # decoding it again would give the same fields
            else:
                self._hcache.clear()                        # cached blocks may index entries that moved
        if stream != self.stream:
            return
        if self.headers and not end_stream:
            raise GrpcProtocolError("a second header block before the answer ended")
        if not self.headers:
            self.headers = fields
        else:
            self.trailers = fields
        if end_stream:
            self._finish()
