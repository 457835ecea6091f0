"""The job client: typed errors from answers, streams that end only at their end, over ASGI and a real server."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from rbee import errors
from rbee.contracts.operations import Infer, OperationBase, Status
from rbee.http import install_edge
from rbee.jobs import JobRegistry, JobServer, emit_token, job_router
from rbee.jobs.client import JobClient, JobHttp, StreamBroken, Unreachable
from rbee.narration import narrate


async def executor(op: OperationBase) -> None:
    if isinstance(op, Infer):
        if op.prompt == "block":
            await asyncio.Event().wait()
        # Text that looks like the seed's markers is data, never a signal.
        narrate("echo", "[DONE] [ERROR] [CANCELLED] data: [DONE]")
        for word in op.prompt.split():
            await emit_token(word)
        if op.prompt.startswith("fail"):
            raise errors.WorkerFailed("the worker said no")


@pytest.fixture
async def app() -> AsyncIterator[FastAPI]:
    registry = JobRegistry(actor="test")
    server = JobServer(registry, executor)
    app = FastAPI()
    install_edge(app)
    app.include_router(job_router(lambda request: server))
    yield app
    await registry.aclose()


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[JobClient]:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app))
    async with JobClient("http://test", client=http) as jc:
        yield jc
    await http.aclose()


async def collect(client: JobClient, job_id: str, **kw: object) -> list[tuple[int, str, object]]:
    async with asyncio.timeout(10):
        return [(e.id, e.kind, e.data) async for e in client.events(job_id, **kw)]  # type: ignore[arg-type]


async def test_marker_text_inside_narration_does_not_end_the_stream(client: JobClient) -> None:
    job_id = await client.submit(Infer(prompt="one two three"))
    events = await collect(client, job_id)
    assert [d["t"] for _, k, d in events if k == "token"] == ["one", "two", "three"]  # type: ignore[index]
    assert events[-1][1] == "end"
    assert any(k == "narration" and "[DONE]" in d["human"] for _, k, d in events)  # type: ignore[index]


async def test_failed_job_reaches_the_client_as_a_failed_end(client: JobClient) -> None:
    job_id = await client.submit(Infer(prompt="fail now"))
    end = (await collect(client, job_id))[-1][2]
    assert end["status"] == "failed"  # type: ignore[index]
    assert end["error"] == {"kind": "worker_failed", "message": "the worker said no"}  # type: ignore[index]


async def test_resume_after_an_event_id(client: JobClient) -> None:
    job_id = await client.submit(Infer(prompt="a b c d"))
    full = await collect(client, job_id)
    tail = await collect(client, job_id, after=3)
    assert tail == [e for e in full if e[0] > 3]


async def test_get_list_and_cancel(client: JobClient) -> None:
    job_id = await client.submit(Infer(prompt="block"))
    assert (await client.get(job_id))["status"] in ("queued", "running")
    assert job_id in [j["job_id"] for j in await client.list()]
    cancelled = await client.cancel(job_id)
    assert cancelled["status"] == "cancelled"
    again = await client.cancel(job_id)  # 409 carries the final state
    assert again["status"] == "cancelled"


async def test_invalid_operation_comes_back_typed_with_its_field(client: JobClient) -> None:
    with pytest.raises(errors.InvalidOperation) as info:
        await client.submit({"operation": "infer", "prompt": "x", "top_k": -3})
    assert info.value.field == "top_k"
    assert info.value.status_code == 422


async def test_unknown_job_comes_back_as_job_not_found(client: JobClient) -> None:
    with pytest.raises(errors.JobNotFound):
        await client.get("job-nope")
    with pytest.raises(errors.JobNotFound):
        await collect(client, "job-nope")


async def test_queue_full_keeps_retry_after() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            429,
            json={"error": {"kind": "queue_full", "message": "busy"}},
            headers={"Retry-After": "7"},
        )

    async with JobClient("http://test", client=httpx.AsyncClient(transport=httpx.MockTransport(refuse))) as jc:
        with pytest.raises(errors.QueueFull) as info:
            await jc.submit(Status())
    assert info.value.retry_after_s == 7


async def test_stream_that_closes_without_an_end_is_broken_not_success() -> None:
    body = b'id: 1\nevent: token\ndata: {"t":"x","i":0}\n\n'  # no end, no [DONE]

    def truncated(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    http = httpx.AsyncClient(transport=httpx.MockTransport(truncated))
    async with JobClient("http://test", client=http) as jc:
        with pytest.raises(StreamBroken):
            await collect(jc, "job-1")
    await http.aclose()


async def test_done_without_an_end_is_broken_too() -> None:
    body = b'id: 1\nevent: token\ndata: {"t":"x","i":0}\n\ndata: [DONE]\n\n'

    def early_done(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    http = httpx.AsyncClient(transport=httpx.MockTransport(early_done))
    async with JobClient("http://test", client=http) as jc:
        with pytest.raises(StreamBroken):
            await collect(jc, "job-1")
    await http.aclose()


async def test_server_that_does_not_answer_is_unreachable(port: int) -> None:
    async with JobClient(f"http://127.0.0.1:{port}", connect_timeout_s=2) as jc:
        with pytest.raises(Unreachable) as info:
            await jc.submit(Status())
    assert f"127.0.0.1:{port}" in info.value.message


# -- JobClient over a real connection, frames in batches ----------------------------------------------


async def five_hundred_tokens(op: OperationBase) -> None:
    for i in range(500):
        await emit_token(f"w{i} ")


@contextlib.asynccontextmanager
async def live_server(run: Callable[[OperationBase], Awaitable[None]] = five_hundred_tokens) -> AsyncIterator[str]:
    registry = JobRegistry(actor="test")
    app = FastAPI()
    install_edge(app)
    app.include_router(job_router(lambda request: JobServer(registry, run)))
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
    async with live_server() as base, JobHttp() as http:
        client = JobClient(base, client=http)
        assert client._direct() is http.http1  # a plain http:// URL: the small client is used
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
    assert http.http1 is not None and http.http1.closed  # leaving ``async with`` closes the pool too


async def test_job_client_reports_a_server_that_is_gone() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with JobHttp() as http:
        client = JobClient(f"http://127.0.0.1:{port}", client=http)
        assert client._direct() is not None
        with pytest.raises(Unreachable):
            await client.submit({"operation": "status"})
        with pytest.raises(StreamBroken):
            async for _ in client.events("job-x"):
                pass


async def test_other_transports_stay_on_httpx() -> None:
    app = FastAPI()
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app)) as asgi,
        JobHttp(transport=httpx.ASGITransport(app)) as mounted,
        JobHttp() as plain,
    ):
        assert JobClient("http://test", client=asgi)._direct() is None
        assert mounted.http1 is None and JobClient("http://test", client=mounted)._direct() is None
        assert JobClient("https://example.org", client=plain)._direct() is None
        assert JobClient("http://example.org", client=plain)._direct() is plain.http1


async def test_the_pool_belongs_to_the_http_client_and_closes_with_it() -> None:
    async with live_server() as base:
        http = JobHttp()
        client = JobClient(base, client=http)
        job_id = await client.submit({"operation": "infer", "prompt": "x"})
        assert [e async for e in client.events(job_id)][-1].kind == "end"
        assert http.http1 is not None
        idle = [conn for conns in http.http1._idle.values() for conn in conns]
        assert idle  # the connection was kept for the next job
        await http.aclose()
        assert http.http1.closed and all(conn.writer.is_closing() for conn in idle)
        # A client of a closed pool falls back to httpx, which says it is closed.
        with pytest.raises(RuntimeError):
            await client.submit({"operation": "infer", "prompt": "x"})


async def test_a_client_of_its_own_closes_its_pool() -> None:
    async with live_server() as base:
        async with JobClient(base) as client:
            job_id = await client.submit({"operation": "infer", "prompt": "x"})
            assert [e async for e in client.events(job_id)][-1].kind == "end"
            pool = client._direct()
            assert pool is not None
        assert pool.closed


async def test_a_frame_that_is_not_json_breaks_the_stream_when_read() -> None:
    body = b"id: 1\nevent: narration\ndata: not json\n\nid: 2\nevent: end\ndata: {}\n\ndata: [DONE]\n\n"

    def garbled(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(garbled)) as http:
        events = [e async for e in JobClient("http://test", client=http).events("job-1")]
    assert events[0].raw == "not json"  # relayed as it came
    with pytest.raises(StreamBroken, match="does not carry JSON"):
        events[0].data  # noqa: B018


@pytest.mark.timeout(20)
async def test_a_stream_that_goes_silent_is_broken_after_the_silence_bound() -> None:
    """A peer whose machine vanished sends no reset: one frame, then nothing, connection open."""
    opened, finished = asyncio.Event(), asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        frame = b'id: 1\nevent: token\ndata: {"t":"x","i":0}\n\n'
        writer.write(head + b"%x\r\n%s\r\n" % (len(frame), frame))
        await writer.drain()
        opened.set()
        await finished.wait()  # holds the connection open, says nothing
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with JobClient(f"http://127.0.0.1:{port}", silence_s=0.5) as jc:
            started = asyncio.get_running_loop().time()
            got: list[str] = []
            with pytest.raises(StreamBroken, match="went silent"):
                async for event in jc.events("job-1"):
                    got.append(event.kind)
            assert got == ["token"] and opened.is_set()
            assert asyncio.get_running_loop().time() - started < 5
    finally:
        finished.set()
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 1)


async def test_a_streamed_submit_gives_the_id_then_every_event_in_one_request(app: FastAPI) -> None:
    sent: list[httpx.Request] = []

    async def record(request: httpx.Request) -> None:
        sent.append(request)

    http = httpx.AsyncClient(transport=httpx.ASGITransport(app), event_hooks={"request": [record]})
    async with JobClient("http://test", client=http) as jc:
        ids: list[str] = []
        async with asyncio.timeout(10):
            events = [e async for e in jc.run(Infer(prompt="one two"), started=ids.append)]
    await http.aclose()
    assert [r.method for r in sent] == ["POST"] and sent[0].url.params["stream"] == "true"
    assert ids and ids[0].startswith("job-")
    assert [e.data["t"] for e in events if e.kind == "token"] == ["one", "two"]
    assert events[-1].kind == "end" and events[-1].data["status"] == "completed"


async def test_a_streamed_submit_that_is_refused_is_the_typed_error_and_starts_nothing(client: JobClient) -> None:
    ids: list[str] = []
    with pytest.raises(errors.InvalidOperation) as refused:
        async for _ in client.run({"operation": "infer", "prompt": 5}, started=ids.append):
            pass
    assert refused.value.field == "prompt" and not ids
    assert await client.list() == []


async def slow_tokens(op: OperationBase) -> None:
    for i in range(1000):
        await emit_token(f"w{i} ")
        await asyncio.sleep(0.01)


async def test_leaving_a_streamed_submit_cancels_its_job() -> None:
    async with live_server(slow_tokens) as base, JobHttp() as http:
        client = JobClient(base, client=http)
        ids: list[str] = []
        async with asyncio.timeout(15):
            async for event in client.run({"operation": "infer", "prompt": "x"}, started=ids.append):
                if event.kind == "token":
                    break  # the client leaves after the first token
            for _ in range(200):
                if (await client.get(ids[0]))["status"] == "cancelled":
                    break
                await asyncio.sleep(0.02)
        assert (await client.get(ids[0]))["status"] == "cancelled"


async def test_a_server_without_streamed_submits_is_followed_with_a_second_request() -> None:
    frames = b'id: 1\nevent: end\ndata: {"status":"completed"}\n\ndata: [DONE]\n\n'

    def older(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":  # ignores ?stream=true, as a server before it did
            return httpx.Response(201, json={"job_id": "job-1", "sse_url": "/v1/jobs/job-1/stream"})
        assert request.url.params["cancel_on_disconnect"] == "true"
        return httpx.Response(200, content=frames, headers={"content-type": "text/event-stream"})

    http = httpx.AsyncClient(transport=httpx.MockTransport(older))
    async with JobClient("http://test", client=http) as jc:
        ids: list[str] = []
        events = [e async for e in jc.run({"operation": "status"}, started=ids.append)]
    await http.aclose()
    assert ids == ["job-1"] and [e.kind for e in events] == ["end"]
