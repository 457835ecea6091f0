"""The job API on the wire: the client's SSE parser, its small HTTP/1.1 client, frames written in batches."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from rbee.contracts.operations import OperationBase
from rbee.http import install_edge
from rbee.jobs import JobRegistry, JobServer, _http1, emit_token, job_router
from rbee.jobs.client import JobClient, StreamBroken, parse_sse


async def chunks_of(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def parsed(*parts: bytes) -> list[tuple[str, str, str]]:
    return [event async for event in parse_sse(chunks_of(*parts))]


# -- the parser ---------------------------------------------------------------------------------


async def test_events_split_anywhere_across_chunks_parse_the_same() -> None:
    body = b'id: 1\nevent: token\ndata: {"t":"a"}\n\nid: 2\nevent: end\ndata: {"s":1}\n\ndata: [DONE]\n\n'
    whole = await parsed(body)
    assert whole == [("1", "token", '{"t":"a"}'), ("2", "end", '{"s":1}'), ("2", "message", "[DONE]")]
    for cut in range(1, len(body)):
        assert await parsed(body[:cut], body[cut:]) == whole
    assert await parsed(*[bytes([b]) for b in body]) == whole


async def test_crlf_and_cr_line_ends_are_line_ends_even_split_between_chunks() -> None:
    body = b"id: 5\r\nevent: token\r\ndata: x\r\n\r\nevent: end\rdata: y\r\r"
    assert await parsed(body) == [("5", "token", "x"), ("5", "end", "y")]
    cut = body.index(b"\r\n\r\n") + 1  # between a \r and its \n
    assert await parsed(body[:cut], body[cut:]) == [("5", "token", "x"), ("5", "end", "y")]


async def test_comments_and_blocks_without_data_are_never_events() -> None:
    # A keep-alive ping after an event with an id is not an empty "message" event.
    body = b"id: 1\nevent: token\ndata: a\n\n: ping\n\n: ping\n\nretry: 10\n\nid: 2\nevent: end\ndata: b\n\n"
    assert await parsed(body) == [("1", "token", "a"), ("2", "end", "b")]


async def test_data_lines_join_and_fields_follow_the_spec() -> None:
    # One empty data line is still data (the spec dispatches it); unknown fields are ignored.
    body = b"data:first\ndata: second\nevent:named\nunknown: x\n\ndata\n\n"
    assert await parsed(body) == [("", "named", "first\nsecond"), ("", "message", "")]


async def test_an_unfinished_last_event_is_not_dispatched() -> None:
    assert await parsed(b"id: 1\nevent: token\ndata: a\n\nid: 2\nevent: token\ndata: b\n") == [("1", "token", "a")]


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
        pool = _http1.Pool()
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
        pool = _http1.Pool()
        assert (await pool.request(key, "GET", "/", {})).body == b"1"
        await asyncio.sleep(0.05)  # the server has closed the kept connection by now
        assert (await pool.request(key, "GET", "/", {})).body == b"2"
        pool.close()
    assert server.connections == 2


async def test_a_refused_connection_is_a_wire_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pool = _http1.Pool(connect_timeout_s=2)
    with pytest.raises(_http1.WireError):
        await pool.request(("127.0.0.1", port), "GET", "/", {})


async def test_a_stream_left_before_its_end_closes_its_connection() -> None:
    body = b"id: 1\nevent: token\ndata: a\n\n"
    server = Scripted([reply(200, body, chunked=True), reply(200, b"{}")])
    async with server.running() as key:
        pool = _http1.Pool()
        async with pool.stream(key, "GET", "/s", {}) as answer:
            assert answer.chunks is not None
            await answer.chunks.__anext__()  # one piece, then leave
        assert (await pool.request(key, "GET", "/", {})).body == b"{}"
        pool.close()
    assert server.connections == 2


# -- JobClient over a real connection, frames in batches ----------------------------------------------


async def executor(op: OperationBase) -> None:
    for i in range(500):
        await emit_token(f"w{i} ")


@contextlib.asynccontextmanager
async def live_server() -> AsyncIterator[str]:
    registry = JobRegistry(actor="test")
    app = FastAPI()
    install_edge(app)
    app.include_router(job_router(lambda request: JobServer(registry, executor)))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2))
    task = asyncio.create_task(server.serve(sockets=[sock]), name="test:uvicorn")
    try:
        async with asyncio.timeout(10):
            while not server.started:  # noqa: ASYNC110 - uvicorn offers no event to wait on
                await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await registry.aclose()
        server.should_exit = True
        async with asyncio.timeout(15):
            await task
        sock.close()


async def test_job_client_on_the_wire_gets_every_event_in_order_and_reuses_its_connection() -> None:
    async with live_server() as base, httpx.AsyncClient() as http:
        client = JobClient(base, client=http)
        assert client._direct is not None  # a plain http:// URL: the small client is used
        for _ in range(2):
            async with asyncio.timeout(30):
                job_id = await client.submit({"operation": "infer", "prompt": "x"})
                events = [e async for e in client.events(job_id)]
            tokens = [e.data["t"] for e in events if e.kind == "token"]
            assert tokens == [f"w{i} " for i in range(500)]
            assert [e.id for e in events] == list(range(1, len(events) + 1))
            assert events[-1].kind == "end" and events[-1].data["status"] == "completed"
        # The raw bytes are the frames the contract fixes, however they were batched.
        raw = (await http.get(f"{base}/v1/jobs/{job_id}/stream")).text
        blocks = [b for b in raw.split("\n\n") if b]
        assert blocks[-1] == "data: [DONE]"
        assert all(b.startswith(f"id: {n}\nevent: ") for n, b in enumerate(blocks[:-1], 1))


async def test_job_client_reports_a_server_that_is_gone() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with httpx.AsyncClient() as http:
        client = JobClient(f"http://127.0.0.1:{port}", client=http)
        with pytest.raises(Exception) as caught:
            await client.submit({"operation": "status"})
        assert type(caught.value).__name__ == "Unreachable"
        with pytest.raises(StreamBroken):
            async for _ in client.events("job-x"):
                pass


def test_other_transports_stay_on_httpx() -> None:
    app = FastAPI()
    asgi = httpx.AsyncClient(transport=httpx.ASGITransport(app))
    assert JobClient("http://test", client=asgi)._direct is None
    assert JobClient("https://example.org", client=httpx.AsyncClient())._direct is None
