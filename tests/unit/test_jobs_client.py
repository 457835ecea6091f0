"""The job client: typed errors from answers, streams that end only at their end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from rbee import errors
from rbee.contracts.operations import Infer, OperationBase, Status
from rbee.http import install_edge
from rbee.jobs import JobRegistry, JobServer, emit_token, job_router
from rbee.jobs.client import JobClient, StreamBroken, Unreachable
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
