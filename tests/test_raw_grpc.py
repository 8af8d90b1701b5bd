"""The load test's hand-written gRPC client (dpr.serve.raw_grpc) against a real gRPC server: grpcio's C-core
server on 127.0.0.1, with raw-bytes handlers. Each answer is checked byte for byte, and so are the status codes,
messages and trailers the server's HPACK encoder sends (its dynamic table changes under the client's cache)."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from concurrent import futures

import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("hpack")

from dpr.serve.raw_grpc import GrpcProtocolError, RawGRPC, request_header_block, status_name  # noqa: E402

PATH = "/test.Raw/Call"


def handler(request: bytes, context) -> bytes:
    """``request``: a command byte, then the payload.
    e: echo; d: sha256 digest; b: 1 MiB answer; a: abort with the payload as message (status in byte 1);
    s: sleep 3 s; t: echo with a trailer x-n = payload (varying values move the server's HPACK table)."""
    cmd, rest = request[:1], request[1:]
    if cmd == b"e":
        return rest
    if cmd == b"d":
        return hashlib.sha256(rest).digest()
    if cmd == b"b":
        return bytes(range(256)) * 4096
    if cmd == b"a":
        context.abort(grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == rest[0]).value),
                      rest[1:].decode())
    if cmd == b"s":
        time.sleep(3)
        return b"late"
    if cmd == b"t":
        context.set_trailing_metadata((("x-n", rest.decode()),))
        return rest
    context.abort(grpc.StatusCode.UNIMPLEMENTED, f"unknown command {cmd!r}")


def start_server(fn, workers: int, options=()) -> tuple:
    """grpcio's server on 127.0.0.1 answering PATH with ``fn`` (raw bytes in and out): (server, port)."""
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=list(options))
    srv.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Raw", {"Call": grpc.unary_unary_rpc_method_handler(fn)}),))
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    return srv, port


@pytest.fixture(scope="module")
def server():
    srv, port = start_server(handler, 4, [("grpc.max_receive_message_length", 64 << 20),
                                          ("grpc.max_send_message_length", 64 << 20)])
    try:
        yield port
    finally:
        srv.stop(grace=None)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))      # a hang fails the test instead of blocking it


def test_header_block_is_valid_hpack():
    from hpack import Decoder

    fields = dict(Decoder().decode(request_header_block("127.0.0.1:8001", PATH), raw=True))
    assert fields == {b":method": b"POST", b":scheme": b"http", b":path": PATH.encode(),
                      b":authority": b"127.0.0.1:8001", b"content-type": b"application/grpc", b"te": b"trailers"}
    long_path = "/" + "x" * 300                          # a length past the 7-bit prefix
    assert dict(Decoder().decode(request_header_block("h:1", long_path), raw=True))[b":path"] == long_path.encode()


def test_calls_on_one_connection_answer_exactly(server):
    async def go():
        c = RawGRPC("127.0.0.1", server, PATH, timeout_s=30)
        try:
            got = [await c.call(b"e" + str(i).encode() * (i % 7)) for i in range(300)]
            return got, c.conn.stream
        finally:
            c.close()
    got, last_stream = run(go())
    assert got == [(0, "", str(i).encode() * (i % 7)) for i in range(300)]
    assert last_stream == 2 * 300 - 1, "every call should be a new stream on the same connection"


def test_large_messages_both_ways_respect_flow_control(server):
    """3 MiB out (past the peer's 64 KiB windows and 16 KiB frames) and 1 MiB back."""
    big = bytes((i * 7919) % 251 for i in range(3 << 20))

    async def go():
        c = RawGRPC("127.0.0.1", server, PATH, timeout_s=30)
        try:
            return [await c.call(b"d" + big), await c.call(b"b"), await c.call(b"e" + big[:70000])]
        finally:
            c.close()
    digest, large, echo = run(go())
    assert digest == (0, "", hashlib.sha256(big).digest())
    assert large == (0, "", bytes(range(256)) * 4096)
    assert echo == (0, "", big[:70000])


def test_status_and_message_are_decoded(server):
    cases = [(grpc.StatusCode.INVALID_ARGUMENT, "row 0: unknown item id 'é' at position 3 (100% sure)"),
             (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full, retry"),
             (grpc.StatusCode.INVALID_ARGUMENT, "row 0: unknown item id 'é' at position 3 (100% sure)"),
             (grpc.StatusCode.INTERNAL, "x" * 1000)]

    async def go():
        c = RawGRPC("127.0.0.1", server, PATH, timeout_s=30)
        try:
            out = []
            for code, msg in cases:
                out.append(await c.call(b"a" + bytes([code.value[0]]) + msg.encode()))
                out.append(await c.call(b"eok"))               # the connection stays usable after a refusal
            return out
        finally:
            c.close()
    got = run(go())
    for (code, msg), refused, ok in zip(cases, got[::2], got[1::2]):
        assert refused == (code.value[0], msg, b"")
        assert status_name(refused[0]) == code.name
        assert ok == (0, "", b"ok")


def test_trailers_stay_right_while_the_server_table_moves(server):
    """Values that repeat and values that are new: the server's HPACK encoder adds and evicts dynamic-table
    entries, so a header block cached by its bytes would be read wrong unless the cache follows the table."""
    values = [str(i % 5) for i in range(40)] + ["v" * (i * 37 % 900) for i in range(1, 60)] + ["3", "4", "0"] * 5

    async def go():
        c = RawGRPC("127.0.0.1", server, PATH, timeout_s=30)
        try:
            out = []
            for v in values:
                code, _, body = await c.call(b"t" + v.encode())
                out.append((code, body, c.conn.trailers.get(b"x-n")))
            return out
        finally:
            c.close()
    assert run(go()) == [(0, v.encode(), v.encode()) for v in values]


def test_a_timeout_fails_its_call_only_and_resets_its_stream(server):
    """The late call ends in TimeoutError and its stream is reset (RST_STREAM CANCEL); the connection, and a
    call in flight beside it, carry on."""
    async def go():
        c = RawGRPC("127.0.0.1", server, PATH, timeout_s=0.5)
        try:
            late = asyncio.ensure_future(c.call(b"s"))
            await asyncio.sleep(0.05)
            conn = c.conn
            c.timeout_s = 30
            beside = asyncio.ensure_future(c.call(b"d" + b"x" * 200_000))
            with pytest.raises(TimeoutError, match="no answer within 0.5 s"):
                await late
            assert 1 not in conn.calls, "the timed-out stream should be closed on our side"
            got = [await beside, await c.call(b"eagain")]
            return got, c.conn is conn, conn.stream
        finally:
            c.close()
    got, same_conn, last_stream = run(go())
    assert got == [(0, "", hashlib.sha256(b"x" * 200_000).digest()), (0, "", b"again")]
    assert same_conn and last_stream == 5


def test_concurrent_calls_share_one_connection_and_get_their_own_answers(server):
    """300 calls at once on one connection (echoes, digests of requests past the windows, 1 MiB answers,
    refusals): each gets its own answer, on streams 1, 3, ... of the same connection."""
    big = bytes((i * 31) % 253 for i in range(150_000))

    def case(i):
        kind = i % 4
        if kind == 0:
            return b"e" + str(i).encode() * (i % 9), (0, "", str(i).encode() * (i % 9))
        if kind == 1:
            return b"d" + big[i:], (0, "", hashlib.sha256(big[i:]).digest())
        if kind == 2:
            return b"b", (0, "", bytes(range(256)) * 4096)
        return (b"a" + bytes([grpc.StatusCode.NOT_FOUND.value[0]]) + f"no {i}".encode(),
                (grpc.StatusCode.NOT_FOUND.value[0], f"no {i}", b""))
    cases = [case(i) for i in range(300)]

    async def go():
        c = RawGRPC("127.0.0.1", server, PATH, timeout_s=30)
        try:
            first = await c.call(b"efirst")                 # open the connection, then all at once
            conn = c.conn
            got = await asyncio.gather(*(c.call(req) for req, _ in cases))
            return first, got, c.conn is conn, conn.stream, len(conn.calls)
        finally:
            c.close()
    first, got, same_conn, last_stream, still_open = run(go())
    assert first == (0, "", b"first")
    assert got == [want for _, want in cases]
    assert same_conn and last_stream == 2 * 301 - 1 and still_open == 0


def test_the_calls_of_one_turn_go_out_in_one_write(server):
    """The frames of the calls made in one event-loop turn are written once, in order (as a gRPC channel's
    transport flushes what its calls wrote), and the answers are still each call's own; a call made in a later
    turn gets its own write."""
    async def go():
        c = RawGRPC("127.0.0.1", server, PATH, timeout_s=30)
        try:
            assert await c.call(b"efirst") == (0, "", b"first")
            conn = c.conn
            writes, real = [], conn.transport.write

            def counting(data):
                writes.append(bytes(data))
                real(data)
            conn.transport.write = counting
            got = await asyncio.gather(*(c.call(b"e" + str(i).encode()) for i in range(20)))
            together = len(writes)
            alone = await c.call(b"elast")
            return got, alone, together, writes, len(writes) - together
        finally:
            c.close()
    got, alone, together, writes, later = run(go())
    assert got == [(0, "", str(i).encode()) for i in range(20)] and alone == (0, "", b"last")
    # the 20 requests in one write (window updates the answers cause may follow in writes of their own)
    first = writes[0]
    streams = []
    i = 0
    while i < len(first):
        length, ftype, stream = int.from_bytes(first[i:i + 3], "big"), first[i + 3], \
            int.from_bytes(first[i + 5:i + 9], "big") & 0x7FFFFFFF
        if ftype == 1:                                     # HEADERS: a call's start, streams in order
            streams.append(stream)
        i += 9 + length
    assert streams == [3 + 2 * j for j in range(20)], streams
    assert together <= 3 and later >= 1


def test_calls_made_before_the_connection_is_open_share_it(server):
    """Calls made at once on a new client wait for the one connection the first of them opens."""
    async def go():
        c = RawGRPC("127.0.0.1", server, PATH, timeout_s=30)
        try:
            got = await asyncio.gather(*(c.call(b"e" + bytes([65 + i])) for i in range(20)))
            return got, c.conn.stream
        finally:
            c.close()
    got, last_stream = run(go())
    assert got == [(0, "", bytes([65 + i])) for i in range(20)]
    assert last_stream == 2 * 20 - 1


def test_calls_wait_for_the_servers_stream_limit():
    """A server that allows 3 concurrent streams (SETTINGS_MAX_CONCURRENT_STREAMS): 12 calls at once all
    succeed, never more than 3 in the handler at a time."""
    lock, state = threading.Lock(), {"now": 0, "peak": 0}

    def slowish(request, context):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.1)
        with lock:
            state["now"] -= 1
        return request
    srv, port = start_server(slowish, 8, [("grpc.max_concurrent_streams", 3)])

    async def go():
        c = RawGRPC("127.0.0.1", port, PATH, timeout_s=30)
        try:
            await c.call(b"open")
            limit = c.conn.max_streams
            return limit, await asyncio.gather(*(c.call(str(i).encode()) for i in range(12)))
        finally:
            c.close()
    try:
        limit, got = run(go())
    finally:
        srv.stop(grace=None)
    assert limit == 3
    assert got == [(0, "", str(i).encode()) for i in range(12)]
    assert state["peak"] == 3, state


def test_a_cancelled_call_resets_its_stream_and_the_connection_goes_on(server):
    async def go():
        c = RawGRPC("127.0.0.1", server, PATH, timeout_s=30)
        try:
            slow = asyncio.ensure_future(c.call(b"s"))
            await asyncio.sleep(0.1)
            conn = c.conn
            slow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await slow
            assert not conn.calls
            return await c.call(b"eafter"), c.conn is conn
        finally:
            c.close()
    assert run(go()) == ((0, "", b"after"), True)


def test_a_server_that_goes_away_mid_call_fails_the_call():
    started = threading.Event()

    def slow(request, context):
        started.set()
        time.sleep(5)
        return b"never"
    srv, port = start_server(slow, 2)

    async def go():
        c = RawGRPC("127.0.0.1", port, PATH, timeout_s=30)
        try:
            call = asyncio.ensure_future(c.call(b"x"))
            while not started.is_set():
                await asyncio.sleep(0.02)
            await asyncio.get_running_loop().run_in_executor(None, lambda: srv.stop(grace=None).wait())
            try:
                return await call
            except GrpcProtocolError as exc:
                return exc
        finally:
            c.close()
    t0 = time.monotonic()
    got = run(go())
    assert time.monotonic() - t0 < 4, "the call should end when the server goes, not wait for its timeout"
    # grpcio cancels the call (a status in the trailers) or drops the connection: either way, named
    assert isinstance(got, GrpcProtocolError) or (got[0] != 0 and got[2] == b""), got


def test_a_graceful_goaway_lets_the_calls_in_flight_finish():
    """The server stops gracefully (GOAWAY) while calls are in flight: a new call opens another connection (here
    refused: the server has stopped listening) without closing the old one, whose calls are all answered."""
    from dpr.serve.raw_grpc import MAX_STREAM_ID

    def slow_echo(request, context):
        time.sleep(1.0)
        return request
    srv, port = start_server(slow_echo, 8)

    async def go():
        c = RawGRPC("127.0.0.1", port, PATH, timeout_s=30)
        try:
            calls = [asyncio.ensure_future(c.call(b"m%d" % i)) for i in range(5)]
            while c.conn is None or len(c.conn.calls) < 5:
                await asyncio.sleep(0.01)
            old = c.conn
            stopping = asyncio.get_running_loop().run_in_executor(None, lambda: srv.stop(grace=10).wait())
            t0 = time.monotonic()
            while old.last_stream_allowed == MAX_STREAM_ID and time.monotonic() - t0 < 10:
                await asyncio.sleep(0.01)
            assert old.last_stream_allowed < MAX_STREAM_ID, "no GOAWAY with a last stream came"
            with pytest.raises((OSError, GrpcProtocolError)):
                await c.call(b"late")                   # a new connection, which the stopped server refuses
            got = await asyncio.gather(*calls)
            await stopping
            return got, old.closed
        finally:
            c.close()
    got, old_closed = run(go())
    assert got == [(0, "", b"m%d" % i) for i in range(5)]
    assert old_closed, "the replaced connection should close once its last call ended"


def test_a_connection_dropped_mid_call_is_named():
    """A listener that reads the call and closes the socket without answering."""
    import socket

    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)

    def drop():
        conn, _ = lst.accept()
        conn.recv(65536)
        time.sleep(0.2)
        conn.close()
    t = threading.Thread(target=drop, daemon=True)
    t.start()

    async def go():
        c = RawGRPC("127.0.0.1", lst.getsockname()[1], PATH, timeout_s=30)
        try:
            with pytest.raises(GrpcProtocolError, match="lost mid-call"):
                await c.call(b"e")
            assert c.conn is None
        finally:
            c.close()
    try:
        run(go())
    finally:
        lst.close()
        t.join(5)


def test_a_port_with_no_server_is_a_clear_error():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def go():
        c = RawGRPC("127.0.0.1", port, PATH, timeout_s=5)
        with pytest.raises(OSError):
            await c.call(b"e")
    run(go())


class _Wire:
    """The socket side of a connection under test: what the client writes is kept (a test double for the
    transport only; the frames fed back are made by hpack's own encoder)."""

    def __init__(self):
        self.out = bytearray()

    def write(self, data):
        self.out += data

    def close(self):
        pass


def test_header_cache_follows_a_moving_hpack_table():
    """grpc core's encoder keeps its dynamic table still after the first answer; hpack's indexes every field,
    so the same bytes (an index) mean another field once a new entry has shifted the table. The client must
    read each trailer as the encoder meant it."""
    from hpack import Encoder, NeverIndexedHeaderTuple as Literal

    from dpr.serve.raw_grpc import DATA, END_HEADERS, END_STREAM, HEADERS, _Connection, _frame

    enc = Encoder()
    values = ["a", "a", "b", "b", "a", "c", "a", "c", "b"] * 3

    async def go():
        conn = _Connection(request_header_block("h:1", PATH))
        conn.connection_made(_Wire())
        got, blocks = [], []
        for v in values:
            call = asyncio.ensure_future(conn.call(b"q", 10))
            await asyncio.sleep(0)
            # only x-n is indexed, so a repeated value is one index whose meaning moves with each new value
            head = enc.encode([(":status", "200"), Literal("content-type", "application/grpc")])
            trail = enc.encode([Literal("grpc-status", "0"), ("x-n", v)])
            blocks.append(trail)
            msg = b"\x00" + len(v).to_bytes(4, "big") + v.encode()
            conn.data_received(_frame(HEADERS, END_HEADERS, conn.stream, head) + _frame(DATA, 0, conn.stream, msg)
                               + _frame(HEADERS, END_HEADERS | END_STREAM, conn.stream, trail))
            code, _, body = await call
            got.append((code, body, conn.trailers[b"x-n"]))
        return got, blocks
    got, blocks = asyncio.run(go())
    assert got == [(0, v.encode(), v.encode()) for v in values]
    # the test means something only if one block's bytes stood for two different values
    meaning: dict[bytes, set] = {}
    for b, v in zip(blocks, values):
        meaning.setdefault(b, set()).add(v)
    assert any(len(vs) > 1 for vs in meaning.values()), meaning
