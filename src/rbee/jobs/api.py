"""The job HTTP API, the same on every server (queen, hive, worker).

``POST /v1/jobs`` validates the operation and starts the job;
``GET /v1/jobs/{id}/stream`` replays and follows its events over SSE (the job's log
is a :class:`rbee.server.sse.Source`, written by the one stream writer);
``DELETE /v1/jobs/{id}`` cancels; ``GET /v1/jobs/{id}`` and ``GET /v1/jobs``
report state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from rbee.contracts.operations import OperationBase, parse_operation
from rbee.errors import AmbiguousJobId, InvalidOperation, JobConflict, JobNotFound
from rbee.jobs.job import Cursor, Event, Job
from rbee.jobs.registry import Executor, JobRegistry
from rbee.jobs.timeline import timeline
from rbee.server.sse import EventStream, Source, frames
from rbee.wire.protocol import DONE, JOB_ID_HEADER, MIN_PREFIX_HEX, PING_INTERVAL_S, job_id_prefix

__all__ = [
    "JobServer",
    "job_router",
    "AmbiguousJobId",
    "job_id_prefix",
    "PING_INTERVAL_S",
    "MAX_BODY_BYTES",
    "MAX_BATCH",
    "MIN_PREFIX_HEX",
]

MAX_BODY_BYTES = 1 << 20
#: Frames written as one chunk at most, when a reader is behind (a late client's replay).
MAX_BATCH = 256
#: Candidates named when a short id matches several jobs.
_CANDIDATES = 5


class JobServer:
    """What a server plugs into the job API: a registry and an executor.

    ``admit`` runs at ``POST`` time, before a job exists: it raises for
    operations this server does not take (422) or cannot take now (429, 503),
    so bad input is answered there and never later in the stream. ``durable``
    (the queen's history) is awaited after the job exists and before the
    ``POST`` is answered, so an accepted job is on record.
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
        history_prefix: Callable[[str, int], list[str]] | None = None,
        visible: Callable[[str], bool] | None = None,
        durable: Callable[[], Awaitable[None]] | None = None,
        ping_interval_s: float = PING_INTERVAL_S,
    ) -> None:
        self.registry = registry
        self.executor = executor
        self.admit = admit
        self.durable = durable
        self.history = history
        self.history_list = history_list
        self.history_events = history_events
        #: The ids in the history that start with a prefix (at most ``limit``), for short ids.
        self.history_prefix = history_prefix
        #: Whether the caller may see a job (a short id resolves only among the caller's jobs).
        self.visible = visible
        self.ping_interval_s = ping_interval_s
        #: Open ``/stream`` responses of live jobs.
        self.active_streams = 0

    async def submit(self, operation: OperationBase) -> Job:
        if self.admit is not None:
            maybe = self.admit(operation)
            if maybe is not None:
                await maybe
        timeout_s = getattr(operation, "timeout_s", None)
        job = self.registry.submit(operation, self.executor, timeout_s=timeout_s)
        if self.durable is not None:
            await self.durable()  # the job's record is committed before anyone hears of the job
        return job

    def resolve(self, job_id: str) -> str:
        """The full id for ``job_id``: itself when a job has it, else the one job whose id it starts.

        A short id (``43d5b140``, ``job-43d5``: at least :data:`MIN_PREFIX_HEX` hex
        characters) that starts several of the caller's jobs raises
        :class:`AmbiguousJobId` naming them; one that starts none is returned as
        given, so the caller answers its usual 404.
        """
        if self.registry.find(job_id) is not None:
            return job_id
        prefix = job_id_prefix(job_id)
        if prefix is None:
            return job_id
        found = self.registry.matching(prefix, _CANDIDATES + 1)
        if self.history_prefix is not None:
            found += [jid for jid in self.history_prefix(prefix, _CANDIDATES + 1) if jid not in found]
        if self.visible is not None:
            found = [jid for jid in found if self.visible(jid)]
        if job_id in found or len(found) == 0:
            return job_id
        if len(found) == 1:
            return found[0]
        shown = ", ".join(sorted(found)[:_CANDIDATES]) + (", ..." if len(found) > _CANDIDATES else "")
        raise AmbiguousJobId(
            f"the job id {job_id!r} is the start of {'more than ' if len(found) > _CANDIDATES else ''}"
            f"{min(len(found), _CANDIDATES)} jobs' ids ({shown}); give more of it",
            job_id=job_id,
        )

    def describe(self, job_id: str) -> dict[str, Any]:
        job = self.registry.find(job_id)
        if job is not None:
            live = {
                **job.summary(),
                "payload": job.operation.to_wire(),
                "timeline": timeline(job.events, job.created_at),
            }
            if job.text:
                live["text"] = "".join(job.text)
            return live
        if self.history is not None:
            record = self.history(job_id)
            if record is not None:
                events = self.history_events(job_id) if self.history_events is not None else None
                if events:
                    record["timeline"] = timeline(events, record["created_at"])
                return record
        raise JobNotFound(f"no job {job_id!r}", job_id=job_id)


_ANY_OPERATION = {"type": "object", "required": ["operation"]}
_JOB_RECORD = {
    "type": "object",
    "required": ["job_id", "status"],
    "properties": {"job_id": {"type": "string"}, "status": {"type": "string"}, "detail": {"type": "string"}},
}
_CREATED = {
    "type": "object",
    "required": ["job_id", "sse_url"],
    "properties": {"job_id": {"type": "string"}, "sse_url": {"type": "string"}},
}
_AMBIGUOUS = {"description": "a short job id that starts more than one job's id (kind ambiguous_job_id)"}
#: OpenAPI links from a created job to what can be done with it (followed by stateful clients and tests).
_JOB_LINKS = {
    name: {"operationId": op, "parameters": {"job_id": "$response.body#/job_id"}}
    for name, op in (("GetJob", "get_job"), ("StreamJob", "stream_job"), ("CancelJob", "cancel_job"))
}


def operation_body_schema(operations: Any) -> dict[str, Any]:
    """The JSON schema of the operations a server takes (a model or a union of them), for
    its OpenAPI request body; its ``$defs`` are hoisted into the components by the edge."""
    from pydantic import TypeAdapter

    return TypeAdapter(operations).json_schema(ref_template="#/components/schemas/{model}")


def job_router(get_server: Callable[[Request], JobServer], operations: Any = None) -> APIRouter:
    """The job API. ``operations`` (a model or a union) documents the bodies ``POST /v1/jobs`` takes."""
    router = APIRouter(tags=["jobs"])
    body = operation_body_schema(operations) if operations is not None else _ANY_OPERATION

    @router.post(
        "/v1/jobs",
        status_code=201,
        operation_id="submit_job",
        summary="Submit an operation as a job",
        openapi_extra={
            "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
            "parameters": [
                {
                    "name": "stream",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "boolean", "default": False},
                    "description": "answer with the job's event stream at once instead of its id",
                }
            ],
        },
        responses={
            201: {
                "description": "the job was accepted",
                "content": {"application/json": {"schema": _CREATED}},
                "links": _JOB_LINKS,
            },
            200: {
                "description": "with ?stream=true: the job was accepted and its events follow"
                " (its id in x-rbee-job-id; leaving cancels it)",
                "content": {"text/event-stream": {}},
            },
            422: {"description": "invalid operation"},
            413: {"description": "body too large"},
            403: {"description": "this token may not run the operation"},
            404: {"description": "unknown hive, model or worker"},
            409: {"description": "the hive the operation names is offline (no recent heartbeat)"},
            429: {"description": "the queue is full (Retry-After)"},
            502: {"description": "the hive the operation was handed to did not answer"},
            503: {"description": "no worker can serve the model"},
        },
    )
    async def submit_job(request: Request) -> Response:
        server = get_server(request)
        body = await request.body()
        operation = parse_operation(body)
        streamed = _flag("stream", request.query_params.get("stream"))
        job = await server.submit(operation)
        location = {"Location": f"/v1/jobs/{job.id}", JOB_ID_HEADER: job.id}
        if streamed:
            # Submitted and streamed in one round trip: the job's events follow at once, as
            # its stream would give them with cancel_on_disconnect (a caller one network hop
            # away saves the second request's round trip before its first token).
            events = _JobEvents(server, job, 0, True)
            return EventStream(events, ping_s=server.ping_interval_s, headers=location)
        return JSONResponse(
            {"job_id": job.id, "sse_url": f"/v1/jobs/{job.id}/stream"}, status_code=201, headers=location
        )

    @router.get("/v1/jobs", operation_id="list_jobs", summary="Recent jobs")
    async def list_jobs(request: Request, limit: int = Query(100, ge=1, le=1000)) -> dict[str, Any]:
        server = get_server(request)
        if server.history_list is None:
            return {"jobs": [job.summary() for job in server.registry.list(limit)]}
        records = server.history_list(limit)
        for record in records:
            # A record is written when its job changes state; a live job's own state is newer.
            job = server.registry.find(str(record.get("job_id")))
            if job is not None and not job.ended:
                summary = job.summary()
                record["status"] = summary.get("status", record.get("status"))
                if summary.get("tokens"):
                    record["tokens_out"] = summary["tokens"]
        return {"jobs": records}

    @router.get(
        "/v1/jobs/{job_id}",
        operation_id="get_job",
        summary="A job's state, timings and result summary",
        responses={404: {"description": "no such job"}, 400: _AMBIGUOUS},
    )
    async def get_job(request: Request, job_id: str) -> dict[str, Any]:
        server = get_server(request)
        return server.describe(server.resolve(job_id))

    @router.delete(
        "/v1/jobs/{job_id}",
        operation_id="cancel_job",
        summary="Cancel a job",
        responses={
            202: {"description": "cancelling; the job has not ended yet"},
            400: _AMBIGUOUS,
            404: {"description": "no such job"},
            409: {
                "description": "the job had already finished: its record, with its final state",
                "content": {"application/json": {"schema": _JOB_RECORD}},
            },
        },
    )
    async def cancel_job(request: Request, job_id: str) -> JSONResponse:
        server = get_server(request)
        job_id = server.resolve(job_id)
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
        operation_id="stream_job",
        summary="The job's events (text/event-stream)",
        response_class=Response,
        responses={
            200: {"content": {"text/event-stream": {}}},
            400: _AMBIGUOUS,
            404: {"description": "no such job"},
            422: {"description": "invalid parameter"},
        },
        openapi_extra={"parameters": _STREAM_PARAMETERS},
    )
    async def stream_job(request: Request, job_id: str) -> Response:
        # The query and the header are read here rather than declared as
        # parameters: FastAPI's per-parameter validation costs a few percent
        # of a short job's whole life.
        server = get_server(request)
        job_id = server.resolve(job_id)
        query = request.query_params
        cancel_on_disconnect = _flag("cancel_on_disconnect", query.get("cancel_on_disconnect"))
        after = _event_id(query.get("last_event_id"))
        header = request.headers.get("last-event-id")
        if header is not None and header.strip().isdigit():
            after = int(header.strip())
        job = server.registry.find(job_id)
        if job is not None:
            return EventStream(_JobEvents(server, job, after, cancel_on_disconnect), ping_s=server.ping_interval_s)
        stored = server.history_events(job_id) if server.history_events is not None else None
        if stored is None:
            raise JobNotFound(f"no job {job_id!r}", job_id=job_id)
        return EventStream(_Replay(stored, after), ping_s=None)

    return router


_DONE_FRAME = f"data: {DONE}\n\n"


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_STREAM_PARAMETERS = [
    {
        "name": "cancel_on_disconnect",
        "in": "query",
        "required": False,
        "schema": {"type": "boolean", "default": False},
        "description": "Cancel the job if this client disconnects before its end.",
    },
    {
        "name": "last_event_id",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 0},
        "description": "Resume after this event id (as the Last-Event-ID header does).",
    },
    {
        "name": "last-event-id",
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": "Resume after this event id (what an EventSource sends when it reconnects).",
    },
]


def _flag(name: str, value: str | None) -> bool:
    if value is None:
        return False
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise InvalidOperation(f"{name}: expected true or false, not {value!r}", field=name)


def _event_id(value: str | None) -> int:
    if value is None:
        return 0
    if not value.strip().isdigit():
        raise InvalidOperation(f"last_event_id: expected an event id (0 or more), not {value!r}", field="last_event_id")
    return int(value.strip())


class _Replay(Source):
    """A finished job's stored events, at most :data:`MAX_BATCH` frames a write, then ``[DONE]``."""

    def __init__(self, events: list[Event], after: int) -> None:
        self.events = [e for e in events if e[0] > after]
        self.at = 0

    def take(self) -> tuple[bytes, bool]:
        start, self.at = self.at, self.at + MAX_BATCH
        batch = frames(self.events[start : self.at])
        if self.at >= len(self.events):
            return (batch + _DONE_FRAME).encode(), True
        return batch.encode(), False


class _JobEvents(Source):
    """A live job's events as they are appended, then ``[DONE]``.

    Every event already in the log goes out as one chunk, so a reader that
    fell behind, or a burst of events, costs one write rather than one per
    event; the job's producer paces itself by this reader's cursor.
    """

    def __init__(self, server: JobServer, job: Job, after: int, cancel_on_disconnect: bool) -> None:
        self.server = server
        self.job = job
        self.after = after
        self.cancel_on_disconnect = cancel_on_disconnect
        self.cursor: Cursor | None = None

    def take(self) -> tuple[bytes, bool]:
        job, cursor = self.job, self.cursor
        if cursor is None:  # attached at the first write, so a response never sent holds no cursor
            cursor = self.cursor = job.attach(self.after)
            self.server.active_streams += 1
        batch = job.take(cursor, MAX_BATCH)
        if job.ended and cursor.pos >= len(job.events):
            return (frames(batch) + _DONE_FRAME).encode(), True  # the last frames, [DONE] and the end: one write
        return frames(batch).encode() if batch else b"", False

    def changed(self) -> asyncio.Future[None]:
        return self.job.next_event()

    def forget(self, fut: asyncio.Future[None]) -> None:
        self.job.forget(fut)

    async def aclose(self, finished: bool) -> None:
        job, server = self.job, self.server
        if self.cursor is not None:
            server.active_streams -= 1
            job.detach(self.cursor)
            self.cursor = None
        if self.cancel_on_disconnect and not job.done and job.cancel_reason is None:
            server.registry.cancel(job.id, "client disconnected")
