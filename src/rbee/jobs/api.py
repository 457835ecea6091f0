"""The job HTTP API, the same on every server (queen, hive, worker).

``POST /v1/jobs`` validates the operation and starts the job;
``GET /v1/jobs/{id}/stream`` replays and follows its events over SSE;
``DELETE /v1/jobs/{id}`` cancels; ``GET /v1/jobs/{id}`` and ``GET /v1/jobs``
report state.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from rbee.contracts.events import DONE
from rbee.contracts.operations import OperationBase, parse_operation
from rbee.errors import JobConflict, JobNotFound
from rbee.jobs.job import Job
from rbee.jobs.registry import Executor, JobRegistry
from rbee.jobs.timeline import timeline

__all__ = ["JobServer", "job_router", "PING_INTERVAL_S", "MAX_BODY_BYTES"]

PING_INTERVAL_S = 15.0
MAX_BODY_BYTES = 1 << 20


def _ping() -> ServerSentEvent:
    # Same line ending as the event frames (the library's default is CRLF).
    return ServerSentEvent(comment="ping", sep="\n")


class JobServer:
    """What a server plugs into the job API: a registry and an executor.

    ``admit`` runs at ``POST`` time, before a job exists: it raises for
    operations this server does not take (422) or cannot take now (429, 503),
    so bad input is answered there and never later in the stream.
    """

    def __init__(
        self,
        registry: JobRegistry,
        executor: Executor,
        *,
        admit: Callable[[OperationBase], Awaitable[None] | None] | None = None,
        history: Callable[[str], dict[str, Any] | None] | None = None,
        history_list: Callable[[int], list[dict[str, Any]]] | None = None,
        history_events: Callable[[str], list[tuple[int, str, str]] | None] | None = None,
        ping_interval_s: float = PING_INTERVAL_S,
    ) -> None:
        self.registry = registry
        self.executor = executor
        self.admit = admit
        self.history = history
        self.history_list = history_list
        self.history_events = history_events
        self.ping_interval_s = ping_interval_s
        self.active_streams = 0

    async def submit(self, operation: OperationBase) -> Job:
        if self.admit is not None:
            maybe = self.admit(operation)
            if maybe is not None:
                await maybe
        timeout_s = getattr(operation, "timeout_s", None)
        return self.registry.submit(operation, self.executor, timeout_s=timeout_s)

    def describe(self, job_id: str) -> dict[str, Any]:
        job = self.registry.find(job_id)
        if job is not None:
            return {**job.summary(), "timeline": timeline(job.events, job.created_at)}
        if self.history is not None:
            record = self.history(job_id)
            if record is not None:
                events = self.history_events(job_id) if self.history_events is not None else None
                if events:
                    record["timeline"] = timeline(events, record["created_at"])
                return record
        raise JobNotFound(f"no job {job_id!r}", job_id=job_id)


def job_router(get_server: Callable[[Request], JobServer]) -> APIRouter:
    router = APIRouter(tags=["jobs"])

    @router.post(
        "/v1/jobs",
        status_code=201,
        summary="Submit an operation as a job",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"type": "object", "required": ["operation"]}}},
            }
        },
        responses={422: {"description": "invalid operation"}, 413: {"description": "body too large"}},
    )
    async def submit_job(request: Request) -> JSONResponse:
        server = get_server(request)
        body = await request.body()
        operation = parse_operation(body)
        job = await server.submit(operation)
        return JSONResponse(
            {"job_id": job.id, "sse_url": f"/v1/jobs/{job.id}/stream"},
            status_code=201,
            headers={"Location": f"/v1/jobs/{job.id}"},
        )

    @router.get("/v1/jobs", summary="Recent jobs")
    async def list_jobs(request: Request, limit: int = Query(100, ge=1, le=1000)) -> dict[str, Any]:
        server = get_server(request)
        if server.history_list is not None:
            return {"jobs": server.history_list(limit)}
        return {"jobs": [job.summary() for job in server.registry.list(limit)]}

    @router.get("/v1/jobs/{job_id}", summary="A job's state, timings and result summary")
    async def get_job(request: Request, job_id: str) -> dict[str, Any]:
        return get_server(request).describe(job_id)

    @router.delete("/v1/jobs/{job_id}", summary="Cancel a job")
    async def cancel_job(request: Request, job_id: str) -> JSONResponse:
        server = get_server(request)
        job = server.registry.find(job_id)
        if job is None:
            record = server.describe(job_id)  # 404 unless in history
            return JSONResponse({**record, "detail": "the job had already finished"}, status_code=409)
        try:
            server.registry.cancel(job_id)
        except JobConflict:
            return JSONResponse({**job.summary(), "detail": "the job had already finished"}, status_code=409)
        # Wait (briefly) for the end so the answer carries the final state.
        if job.task is not None:
            await asyncio.wait([job.task], timeout=2.0)
        return JSONResponse(job.summary(), status_code=202 if not job.done else 200)

    @router.get(
        "/v1/jobs/{job_id}/stream",
        summary="The job's events (text/event-stream)",
        response_class=Response,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def stream_job(
        request: Request,
        job_id: str,
        cancel_on_disconnect: bool = Query(False),
        last_event_id_q: int | None = Query(None, alias="last_event_id", ge=0),
        last_event_id: str | None = Header(None),
    ) -> EventSourceResponse:
        server = get_server(request)
        after = last_event_id_q or 0
        if last_event_id is not None and last_event_id.strip().isdigit():
            after = int(last_event_id.strip())
        job = server.registry.find(job_id)
        frames: AsyncIterator[Any]
        if job is not None:
            frames = _frames(server, job, after, cancel_on_disconnect)
        else:
            stored = server.history_events(job_id) if server.history_events is not None else None
            if stored is None:
                raise JobNotFound(f"no job {job_id!r}", job_id=job_id)
            frames = _replay(stored, after)
        return EventSourceResponse(
            frames,
            ping=server.ping_interval_s,
            ping_message_factory=_ping,
            sep="\n",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    return router


_DONE_FRAME = f"data: {DONE}\n\n".encode()


def _frame(event_id: int, kind: str, data: str) -> bytes:
    # Event data is one line of JSON (json never emits a raw newline), so the
    # frame is built directly rather than through a general encoder.
    return f"id: {event_id}\nevent: {kind}\ndata: {data}\n\n".encode()


async def _replay(events: list[tuple[int, str, str]], after: int) -> AsyncIterator[Any]:
    for event_id, kind, data in events:
        if event_id > after:
            yield _frame(event_id, kind, data)
    yield _DONE_FRAME


async def _frames(server: JobServer, job: Job, after: int, cancel_on_disconnect: bool) -> AsyncIterator[Any]:
    server.active_streams += 1
    try:
        async for event_id, kind, data in job.stream(after):
            yield _frame(event_id, kind, data)
        yield _DONE_FRAME
    finally:
        server.active_streams -= 1
        if cancel_on_disconnect and not job.done and job.cancel_reason is None:
            server.registry.cancel(job.id, "client disconnected")
