"""The small HTTP/1.1 client: keep-alive reuse, one retry on a stale connection, streams, closing."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest

from rbee.wire import http1

# -- the HTTP/1.1 client against a scripted server ---------------------------------------------------------


class Scripted:
    """A TCP server that answers each request with the next scripted reply (then closes if told)."""

    def __init__(self, replies: list[tuple[bytes, bool]]) -> None:
        self.replies = replies
        self.requests: list[bytes] = []
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.replies:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    ),
                    0,
                )
                self.requests.append(head + (await reader.readexactly(length) if length else b""))
                reply, close = self.replies.pop(0)
                writer.write(reply)
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[tuple[str, int]]:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        try:
            yield ("127.0.0.1", self.server.sockets[0].getsockname()[1])
        finally:
            self.server.close()
            await self.server.wait_closed()


def reply(status: int, body: bytes, *, chunked: bool = False, close: bool = False) -> tuple[bytes, bool]:
    head = f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
    if chunked:
        payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:3], body[3:]) if p) + b"0\r\n\r\n"
        return (head + "transfer-encoding: chunked\r\n\r\n").encode() + payload, close
    return (head + f"content-length: {len(body)}\r\n\r\n").encode() + body, close


async def test_keep_alive_connections_are_reused_for_content_length_and_chunked_answers() -> None:
    server = Scripted([reply(201, b'{"a":1}'), reply(200, b'{"b":2}', chunked=True), reply(200, b"{}")])
    async with server.running() as key:
        pool = http1.Pool()
        first = await pool.request(key, "POST", "/v1/jobs", {"Content-Type": "application/json"}, b'{"x":1}')
        second = await pool.request(key, "GET", "/two", {})
        third = await pool.request(key, "GET", "/three", {})
        pool.close()
    assert (first.status, first.body, second.body, third.body) == (201, b'{"a":1}', b'{"b":2}', b"{}")
    assert server.connections == 1
    assert server.requests[0].startswith(b"POST /v1/jobs HTTP/1.1\r\n") and server.requests[0].endswith(b'{"x":1}')


async def test_a_pooled_connection_the_server_closed_is_replaced_once() -> None:
    server = Scripted([reply(200, b"1", close=True), reply(200, b"2")])
    async with server.running() as key:
        pool = http1.Pool()
        assert (await pool.request(key, "GET", "/", {})).body == b"1"
        await asyncio.sleep(0.05)  # the server has closed the kept connection by now
        assert (await pool.request(key, "GET", "/", {})).body == b"2"
        pool.close()
    assert server.connections == 2


async def test_a_refused_connection_is_a_wire_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pool = http1.Pool(connect_timeout_s=2)
    with pytest.raises(http1.WireError):
        await pool.request(("127.0.0.1", port), "GET", "/", {})


async def test_a_stream_left_before_its_end_closes_its_connection() -> None:
    body = b"id: 1\nevent: token\ndata: a\n\n"
    server = Scripted([reply(200, body, chunked=True), reply(200, b"{}")])
    async with server.running() as key:
        pool = http1.Pool()
        async with pool.stream(key, "GET", "/s", {}) as answer:
            assert answer.chunks is not None
            await answer.chunks.__anext__()  # one piece, then leave
        assert (await pool.request(key, "GET", "/", {})).body == b"{}"
        pool.close()
    assert server.connections == 2


async def test_a_closed_pool_closes_its_idle_connections_and_makes_no_new_ones() -> None:
    server = Scripted([reply(200, b"1"), reply(200, b"2")])
    async with server.running() as key:
        pool = http1.Pool()
        assert (await pool.request(key, "GET", "/", {})).body == b"1"
        idle = [conn for conns in pool._idle.values() for conn in conns]
        assert len(idle) == 1
        await pool.aclose()
        assert pool.closed and idle[0].writer.is_closing()
        with pytest.raises(http1.WireError, match="closed"):
            await pool.request(key, "GET", "/", {})


async def test_a_pool_used_from_another_event_loop_forgets_the_first_loops_connections() -> None:
    server = Scripted([reply(200, b"1"), reply(200, b"2")])
    async with server.running() as key:
        pool = http1.Pool()
        assert (await pool.request(key, "GET", "/", {})).body == b"1"
        pool.loop = object()  # type: ignore[assignment]  # as if another loop had used it since
        assert (await pool.request(key, "GET", "/", {})).body == b"2"
        await pool.aclose()
    assert server.connections == 2


async def test_one_connection_sends_requests_in_turn_and_reads_bodies_as_they_arrive() -> None:
    server = Scripted([reply(200, b'{"a":1}', chunked=True), reply(201, b"{}")])
    async with server.running() as (host, port):
        conn = await http1.Connection.open(host, port, timeout_s=2)
        conn.writer.write(http1.request_head(host, port, "GET", "/one", {"X-A": "1"}, None))
        status, headers = await conn.head()
        pieces = [piece async for piece in conn.pieces(headers)]
        conn.writer.write(http1.request_head(host, port, "POST", "/two", {}, b"xy") + b"xy")
        second, _ = await conn.head()
        await conn.aclose()
    assert (status, pieces, second) == (200, [b'{"a', b'":1}'], 201)
    assert server.connections == 1
    assert server.requests[0] == f"GET /one HTTP/1.1\r\nHost: {host}:{port}\r\nX-A: 1\r\n\r\n".encode()
    assert server.requests[1].endswith(b"Content-Length: 2\r\n\r\nxy")


async def test_an_answer_that_is_not_http_is_a_wire_error() -> None:
    server = Scripted([(b"SSH-2.0-OpenSSH\r\n\r\n", True)])
    async with server.running() as key:
        pool = http1.Pool()
        with pytest.raises(http1.WireError, match=r"not an HTTP/1\.1 answer"):
            await pool.request(key, "GET", "/", {})
        pool.close()
