"""A hand-written gRPC client for the load test: unary calls over one cleartext HTTP/2 connection, as many at once
as the server allows (one stream each, as a gRPC channel multiplexes its calls), requests prepared once as
serialized protobuf bytes.

Why: on the 2-core VM the load client shares the cores with the server it measures. grpcio's Python client
(grpc.aio, or a sync channel with futures) cost 67-85 us of client CPU per single-request call against Triton;
the hand-written HTTP/1.1 client of the HTTP targets (``dpr.serve.load.RawHTTP``) costs about 25. So gRPC
targets measured the client as much as the server. This one costs about the same as RawHTTP: a call is its
prepared frames and a parse of the three frames that answer it. The frames of every call made in one event-loop turn
go out in one ``write`` (a call's ``write`` on loopback cost ~20 us of client CPU on the VM, most of it the kernel
waking the server), as a gRPC channel's transport buffers what its calls write and flushes it once.

What it speaks (RFC 9113 and the gRPC-over-HTTP/2 spec), and nothing more:

* the connection preface with our SETTINGS (no push; the largest stream window, so the server never waits on
  us) and a connection WINDOW_UPDATE, replenished as answers arrive;
* a request: HEADERS (a constant HPACK block, literals only, so our side keeps no table) and DATA frames cut to
  the peer's SETTINGS_MAX_FRAME_SIZE and held back by its connection and stream windows (WINDOW_UPDATE and
  SETTINGS_INITIAL_WINDOW_SIZE move them; requests held back go out oldest first as the windows open);
* concurrent calls: each on the next odd stream, never more open than the peer's SETTINGS_MAX_CONCURRENT_STREAMS
  (the others wait for a stream to end); a stream refused with REFUSED_STREAM, which the server did not process,
  is sent again on a new stream (gRPC's transparent retry);
* an answer: HEADERS (+ CONTINUATION), DATA (padding stripped), trailers, matched to its call by stream id; HPACK
  decoded by ``hpack`` (the server's dynamic table is followed on every block; a block that leaves the table as
  it was is cached by its bytes, so a steady stream of identical answers costs a dict lookup);
* SETTINGS and PING are acknowledged; RST_STREAM fails its call naming the code; GOAWAY fails the calls the
  server will not answer, the next call opens a new connection and the old one closes when its last call ends;
  a call that times out or whose task is cancelled resets its stream (RST_STREAM CANCEL), and the connection
  carries on.

A call returns ``(grpc_status, message, body)``: the status from the trailers (0 = OK), grpc-message
percent-decoded, and the response message's bytes (the 5-byte gRPC prefix removed). Anything the protocol does
not allow raises :class:`GrpcProtocolError` naming it in every open call, and the connection is dropped (a
half-read answer would desynchronise it).
"""

from __future__ import annotations

import asyncio
import struct
from urllib.parse import unquote_to_bytes

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
SET_ENABLE_PUSH, SET_MAX_STREAMS, SET_INITIAL_WINDOW, SET_MAX_FRAME = 0x2, 0x3, 0x4, 0x5
REFUSED_STREAM, CANCEL = 0x7, 0x8        # RST_STREAM error codes: not processed; the client no longer wants it
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


class _Refused(GrpcProtocolError):
    """RST_STREAM REFUSED_STREAM: the server did not process the stream, so the call may be sent again."""


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
    """Unary calls to ``path`` on ``host:port`` over one HTTP/2 connection, as many at once as the server's
    SETTINGS_MAX_CONCURRENT_STREAMS allows (each on its own stream; the rest wait for a stream to end), as a gRPC
    channel multiplexes its calls. The connection is opened on the first call, and again after one was dropped.
    ``await call(message)`` -> ``(grpc_status, message, body)``."""

    def __init__(self, host: str, port: int, path: str, timeout_s: float = 120.0):
        self.host, self.port, self.path, self.timeout_s = host, int(port), path, timeout_s
        self.block = request_header_block(f"{host}:{port}", path)
        self.conn: _Connection | None = None
        self._opening: asyncio.Future | None = None

    async def _connection(self) -> "_Connection":
        conn = self.conn
        if conn is not None and conn.usable():
            return conn
        if self._opening is not None:                      # another call is opening it: share that connection
            return await asyncio.shield(self._opening)
        if conn is not None and not conn.calls:           # one still answering calls (GOAWAY lets it finish them)
            conn.close()                                  # closes when its last call ends (call, below)
        self.conn = None
        loop = asyncio.get_running_loop()
        self._opening = opening = loop.create_future()
        try:
            conn = _Connection(self.block)
            await loop.create_connection(lambda: conn, self.host, self.port)
            self.conn = conn
            opening.set_result(conn)
            return conn
        except BaseException as exc:
            # the calls sharing this attempt fail with it (a cancelled opener's as a protocol error: they were not
            # cancelled themselves)
            opening.set_exception(exc if isinstance(exc, Exception)
                                  else GrpcProtocolError("the connection attempt was cancelled"))
            opening.exception()                           # retrieved here: no "never retrieved" warning
            raise
        finally:
            self._opening = None

    async def call(self, message: bytes) -> tuple[int, str, bytes]:
        conn = await self._connection()
        try:
            return await conn.call(message, self.timeout_s)
        finally:
            if conn.closed and self.conn is conn:          # broken or lost: the next call starts afresh
                self.conn = None
            elif conn is not self.conn and not conn.calls and not conn.closed:
                conn.close()                              # a replaced connection's last call has ended

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None


class _Call:
    """One call's stream: what is still to send, and the answer so far."""

    __slots__ = ("stream", "waiter", "headers", "trailers", "body", "pending", "send_window")

    def __init__(self, stream: int, waiter: asyncio.Future, pending: memoryview, send_window: int):
        self.stream, self.waiter, self.pending, self.send_window = stream, waiter, pending, send_window
        self.headers: dict = {}
        self.trailers: dict | None = None
        self.body: list[bytes] = []


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection's state and its open calls, by stream id; a dropped connection is never reused (a
    new one is made)."""

    def __init__(self, block: bytes):
        from hpack import Decoder

        self.block = block
        self.transport = None
        self.decoder = Decoder()
        self._hcache: dict[bytes, dict] = {}           # header block -> its fields (see _on_headers)
        self.buf = bytearray()
        self.stream = -1                                  # the last stream opened (client streams are odd)
        self.last_stream_allowed = MAX_STREAM_ID         # lowered by GOAWAY
        self.send_conn = DEFAULT_WINDOW                   # what the peer lets us send
        self.peer_initial = DEFAULT_WINDOW
        self.max_frame = DEFAULT_MAX_FRAME
        self.max_streams = MAX_STREAM_ID                  # the peer's SETTINGS_MAX_CONCURRENT_STREAMS
        self.received = 0
        self.calls: dict[int, _Call] = {}                 # open streams
        self.blocked: list[_Call] = []                    # calls with request bytes the windows held back
        self.slot_waiters: list[asyncio.Future] = []      # calls waiting for a stream below max_streams
        self.trailers: dict | None = None                 # the last answered call's trailers
        self._continuing: bytearray | None = None
        self._continuing_end = False
        self._out: list[bytes] = []                       # frames to send at the end of this event-loop turn
        self.closed = False

    def usable(self) -> bool:
        return not self.closed and self.transport is not None and self.stream + 2 <= self.last_stream_allowed

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._loop = asyncio.get_running_loop()
        settings = struct.pack(">HI", SET_ENABLE_PUSH, 0) + struct.pack(">HI", SET_INITIAL_WINDOW, MAX_WINDOW)
        transport.write(PREFACE + _frame(SETTINGS, 0, 0, settings)
                        + _frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", MAX_WINDOW - DEFAULT_WINDOW)))

    def connection_lost(self, exc) -> None:
        self.closed = True
        self._fail_all(GrpcProtocolError("the connection was lost mid-call" + (f": {exc}" if exc else "")))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self._flush()                                 # a reset or a WINDOW_UPDATE written before the close
            self.transport.close()

    def _write(self, data: bytes) -> None:
        """Queue ``data`` for the one write of this event-loop turn (frames keep their order)."""
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out.append(data)

    def _flush(self) -> None:
        if self._out:
            data, self._out = b"".join(self._out), []
            if not self.transport.is_closing():
                self.transport.write(data)

    # ---- a call ---------------------------------------------------------------------------------------------
    async def call(self, message: bytes, timeout_s: float) -> tuple[int, str, bytes]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        framed = b"\x00" + struct.pack(">I", len(message)) + message
        while True:
            await self._stream_below(self.max_streams, loop)
            try:
                return await self._call_once(framed, deadline, timeout_s, loop)
            except _Refused:
                # RFC 9113 8.7: a refused stream was not processed, so it is sent again (gRPC's transparent
                # retry) once one of our open streams has ended; with none open, after a millisecond
                if loop.time() >= deadline:
                    raise TimeoutError(f"no answer within {timeout_s:g} s (the server kept refusing the stream)")
                if self.calls:
                    await self._stream_below(len(self.calls), loop)
                else:
                    await asyncio.sleep(0.001)

    async def _stream_below(self, limit: int, loop) -> None:
        """Wait until fewer than ``limit`` of our streams are open (the peer's SETTINGS_MAX_CONCURRENT_STREAMS)."""
        while len(self.calls) >= limit:
            slot = loop.create_future()
            self.slot_waiters.append(slot)
            try:
                await slot
            finally:
                if slot in self.slot_waiters:
                    self.slot_waiters.remove(slot)

    async def _call_once(self, framed: bytes, deadline: float, timeout_s: float, loop) -> tuple[int, str, bytes]:
        if not self.usable():
            raise GrpcProtocolError("the connection closed before the call could start")
        self.stream += 2
        waiter = loop.create_future()
        call = _Call(self.stream, waiter, memoryview(framed), self.peer_initial)
        self.calls[call.stream] = call
        # a timer on the loop, not asyncio.wait_for: that wraps every call in a task (~15 us of client CPU)
        timer = loop.call_at(deadline, self._fail, call, TimeoutError(f"no answer within {timeout_s:g} s"))
        self._send_data(call, _frame(HEADERS, END_HEADERS, call.stream, self.block))   # HEADERS and DATA together
        try:
            return await waiter
        finally:
            timer.cancel()
            if self.calls.pop(call.stream, None) is not None and not self.closed:
                # ended on our side (a timeout, a cancelled task): the server may stop working on it
                self._write(_frame(RST_STREAM, 0, call.stream, struct.pack(">I", CANCEL)))
            if call in self.blocked:
                self.blocked.remove(call)
            self._wake_one()

    def _wake_one(self) -> None:
        while self.slot_waiters:
            slot = self.slot_waiters.pop(0)
            if not slot.done():
                slot.set_result(None)
                return

    def _send_data(self, call: _Call, head: bytes = b"") -> None:
        """``head``, then as much of ``call``'s pending request as the peer's windows and frame size let
        through, queued together for this turn's write."""
        pending, out = call.pending, [head]
        while len(pending):
            n = min(len(pending), self.send_conn, call.send_window, self.max_frame)
            if n <= 0:
                break
            self.send_conn -= n
            call.send_window -= n
            out.append(_frame(DATA, END_STREAM if n == len(pending) else 0, call.stream, bytes(pending[:n])))
            pending = pending[n:]
        call.pending = pending
        if len(pending) and call not in self.blocked:
            self.blocked.append(call)
        elif not len(pending) and call in self.blocked:
            self.blocked.remove(call)
        if len(out) > 1 or head:
            self._write(b"".join(out))

    def _send_blocked(self) -> None:
        for call in list(self.blocked):                   # oldest first: the connection window is shared
            self._send_data(call)

    def _fail(self, call: _Call, exc: Exception) -> None:
        if not call.waiter.done():
            call.waiter.set_exception(exc)

    def _fail_all(self, exc: Exception) -> None:
        for call in list(self.calls.values()):
            self._fail(call, exc)
        for slot in self.slot_waiters:
            if not slot.done():
                slot.set_exception(exc)

    def _finish(self, call: _Call) -> None:
        self.calls.pop(call.stream, None)                 # answered: no RST_STREAM for it
        if call.waiter.done():
            return
        head = call.headers
        trailers = call.trailers if call.trailers is not None else head            # a trailers-only answer
        self.trailers = trailers
        if head.get(b":status") != b"200":
            return self._fail(call, GrpcProtocolError(
                f"HTTP status {head.get(b':status', b'?').decode()} on a gRPC call"))
        if b"grpc-status" not in trailers:
            return self._fail(call, GrpcProtocolError("the answer ended without a grpc-status trailer"))
        code = int(trailers[b"grpc-status"])
        msg = unquote_to_bytes(trailers.get(b"grpc-message", b"")).decode("utf-8", "replace")
        body = b"".join(call.body)
        if code == 0:
            if len(body) < 5 or body[0] != 0 or int.from_bytes(body[1:5], "big") != len(body) - 5:
                return self._fail(call, GrpcProtocolError(f"the answer is not one uncompressed gRPC message "
                                                          f"({len(body)} bytes, prefix {body[:5]!r})"))
            body = body[5:]
        call.waiter.set_result((code, msg, body))

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
        except Exception as exc:  # noqa: BLE001 - a broken answer fails every open call, and the connection goes
            self._fail_all(exc if isinstance(exc, GrpcProtocolError) else GrpcProtocolError(f"bad answer: {exc!r}"))
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
            call = self.calls.get(stream)                 # None: a stream we reset (its late frames are dropped)
            if call is not None:
                call.body.append(payload)
                if flags & END_STREAM:
                    self._finish(call)
            if self.received >= REPLENISH_AT:
                self._write(_frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self.received)))
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
                    for call in self.calls.values():      # RFC 9113 6.9.2: open streams' windows move by the change
                        call.send_window += value - self.peer_initial
                    self.peer_initial = value
                elif key == SET_MAX_FRAME:
                    self.max_frame = value
                elif key == SET_MAX_STREAMS:
                    self.max_streams = value
            self._write(_frame(SETTINGS, ACK, 0))
            self._send_blocked()
            for _ in range(min(len(self.slot_waiters), max(0, self.max_streams - len(self.calls)))):
                self._wake_one()
        elif ftype == WINDOW_UPDATE:
            inc = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            if stream == 0:
                self.send_conn += inc
                self._send_blocked()
            elif stream in self.calls:
                call = self.calls[stream]
                call.send_window += inc
                if len(call.pending):
                    self._send_data(call)
        elif ftype == PING:
            if not flags & ACK:
                self._write(_frame(PING, ACK, 0, payload))
        elif ftype == RST_STREAM:
            call = self.calls.pop(stream, None)
            if call is not None:
                code = int.from_bytes(payload[:4], "big")
                self._fail(call, _Refused("the server refused the stream (REFUSED_STREAM)") if code == REFUSED_STREAM
                           else GrpcProtocolError(f"the server reset the stream (HTTP/2 error code {code})"))
        elif ftype == GOAWAY:
            self.last_stream_allowed = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            code = int.from_bytes(payload[4:8], "big")
            for call in [c for c in self.calls.values() if c.stream > self.last_stream_allowed]:
                self.calls.pop(call.stream)
                self._fail(call, GrpcProtocolError(f"the server is going away (GOAWAY, error code {code}, last "
                                                   f"stream {self.last_stream_allowed}): the call was not processed"))
            if not self.usable():                         # calls waiting for a stream would never get one here
                for slot in self.slot_waiters:
                    if not slot.done():
                        slot.set_result(None)
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
        call = self.calls.get(stream)                       # every block is decoded: the HPACK table follows
        if call is None:
            return
        if call.headers and not end_stream:
            raise GrpcProtocolError("a second header block before the answer ended")
        if not call.headers:
            call.headers = fields
        else:
            call.trailers = fields
        if end_stream:
            self._finish(call)
