"""The OpenAI endpoints: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.background import BackgroundTask

from rbee import errors
from rbee.contracts.operations import Infer
from rbee.jobs.job import Job
from rbee.narration import bound, narrate
from rbee.queen.bodies import body_schema as _body_schema
from rbee.queen.bodies import queen_state as _state
from rbee.queen.openai.errors import end_error_response, error_chunk, error_response, rbee_error_response
from rbee.queen.openai.format import DONE_FRAME, Format, usage_of
from rbee.queen.openai.schema import CHAT_BODY, COMPLETION_BODY, Call, parse
from rbee.queen.state import QueenState
from rbee.queen.translate import (
    CLIENT_GONE,
    JOB_ID_HEADER,
    REQUEST_ID_HEADER,
    Events,
    abandon,
    collect,
    collect_logprobs,
    job_events,
    json_body,
    release,
    release_all,
    renders_tools,
    to_the_context,
    unless_disconnected,
)
from rbee.server.sse import EventStream

__all__ = ["COMPLETION_ERRORS", "JOB_IDS_HEADER", "openai_router"]

#: ``n`` > 1: every choice's job, in order (``x-rbee-job-id`` names the first).
JOB_IDS_HEADER = "x-rbee-job-ids"


async def _stream(
    state: QueenState, job: Job, fmt: Format, first: tuple[str, Any], events: Events
) -> AsyncIterator[bytes]:
    try:
        opening = fmt.opening()
        if opening is not None:
            yield opening
        kind, data = first
        while kind == "token":
            chunk = fmt.token(data)
            if chunk:
                yield chunk
            kind, data = await anext(events)
        end = data
        if end.get("status") == "completed":
            yield fmt.closing(end)
            if fmt.include_usage:
                yield fmt.usage(end)
            yield DONE_FRAME
        else:
            # The failure is the last thing said: no [DONE] after it.
            yield error_chunk(end)
    finally:
        await release(state, job, events)


def seeded(op: Infer, i: int) -> Infer:
    """The operation of choice ``i``: the seed + i when a seed is given."""
    if i == 0 or op.seed is None:
        return op
    return op.model_copy(update={"seed": (op.seed + i) % 2**32})


async def _submit(state: QueenState, call: Call) -> list[Job]:
    jobs: list[Job] = []
    try:
        for i in range(call.n):
            jobs.append(await state.jobs.submit(seeded(call.op, i)))
    except BaseException:
        for job in jobs:
            abandon(state, job)
        raise
    return jobs


def _offer_tools(state: QueenState, call: Call) -> Call:
    """``tool_choice`` auto: the tools go to a model whose template renders them."""
    tools = call.tools
    if tools is None or tools.choice != "auto" or not tools.functions or not renders_tools(state, call.model):
        return call
    return replace(call, op=call.op.model_copy(update={"tools": tools.as_openai()}), template_tools=True)


async def _to_the_context(state: QueenState, call: Call) -> Call:
    """A call without max_tokens gets what is left of the slot's context after its prompt."""
    if not call.to_the_context:
        return call
    return replace(call, op=await to_the_context(state, call.op, "messages" if call.chat else "prompt"))


async def _complete(request: Request, chat: bool) -> Response:
    state = _state(request)
    failed_headers = {REQUEST_ID_HEADER: f"req_{secrets.token_hex(12)}"}
    try:
        body = await json_body(request)
        call = _offer_tools(state, parse(body, chat))
        call = await _to_the_context(state, call)
        jobs = await _submit(state, call)
    except errors.RbeeError as exc:
        return rbee_error_response(exc, failed_headers, chat=chat)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    for i, job in enumerate(jobs):
        with bound(job, actor="queen"):
            choice = f" (choice {i} of {call.n})" if call.n > 1 else ""
            choices: dict[str, Any] = {"choice": i, "n": call.n} if call.n > 1 else {}
            narrate(
                "openai_request",
                f"OpenAI {path} request for {call.model}{' (streaming)' if call.stream else ''}{choice}",
                path=path,
                stream=call.stream,
                **choices,
            )
            if call.template_tools and call.tools is not None:
                narrate(
                    "openai_tools_template",
                    f"tool_choice auto: {len(call.tools.functions)} tool(s) given to the model's chat template; "
                    "its calls are read from the answer",
                    tools=[f["name"] for f in call.tools.functions],
                )
            elif call.tools is not None and call.tools.choice == "auto":
                narrate(
                    "openai_tools_auto",
                    f"tool_choice auto: answered as text ({len(call.tools.functions)} tool(s) not offered): the "
                    "model's chat template has no place for tools; give tool_choice required or a function for a call",
                    tools=[f["name"] for f in call.tools.functions],
                )
    job = jobs[0]
    headers = {JOB_ID_HEADER: job.id, REQUEST_ID_HEADER: job.id}
    if call.n > 1:
        headers[JOB_IDS_HEADER] = ",".join(j.id for j in jobs)
    fmts = [Format(call, job, i) for i in range(call.n)]
    with_logprobs = call.op.logprobs is not None
    events = [job_events(j, logprobs=with_logprobs) for j in jobs]
    gather = collect_logprobs if with_logprobs else collect
    firsts: Any
    try:
        if call.stream:
            # Wait for the first token or the end of each, so a failure before
            # any output is still answered with its status.
            present, firsts = await unless_disconnected(request, asyncio.gather(*(anext(e) for e in events)))
        else:
            present, firsts = await unless_disconnected(request, asyncio.gather(*(gather(e) for e in events)))
    except BaseException:
        await release_all(state, jobs, events)
        raise
    if not present or firsts is None:
        await release_all(state, jobs, events)
        return Response(status_code=CLIENT_GONE, headers=headers)
    if not call.stream:
        await release_all(state, jobs, events)  # all ended: nothing to cancel
        answers = [first if with_logprobs else (*first, None) for first in firsts]
        failed = next((end for _, end, _ in answers if end.get("status") != "completed"), None)
        if failed is not None:
            return end_error_response(failed, headers, call)
        body = fmts[0].whole(*answers[0])
        if call.n > 1:
            body["choices"] = [fmt.whole(*answer)["choices"][0] for fmt, answer in zip(fmts, answers, strict=True)]
            body["usage"] = usage_of(*(end for _, end, _ in answers))
        return JSONResponse(body, headers=headers)
    failed = next((data for kind, data in firsts if kind == "end" and data.get("status") != "completed"), None)
    if failed is not None:
        await release_all(state, jobs, events)
        return end_error_response(failed, headers, call)
    stream = (
        _stream(state, job, fmts[0], firsts[0], events[0])
        if call.n == 1
        else _stream_choices(state, jobs, fmts, firsts, events)
    )
    return EventStream(
        stream,
        ping_s=state.settings.ping_interval_s,
        headers=headers,
        # Also when the client left before the stream's first chunk, so the
        # generator above never ran: the jobs must not go on for nobody.
        background=BackgroundTask(release_all, state, jobs, events),
    )


async def _stream_choices(
    state: QueenState, jobs: list[Job], fmts: list[Format], firsts: list[tuple[str, Any]], events: list[Events]
) -> AsyncIterator[bytes]:
    """``n`` > 1: the choices' chunks interleaved as their tokens come, each with its ``index``."""
    queue: asyncio.Queue[tuple[int, str, Any]] = asyncio.Queue()

    async def pump(i: int) -> None:
        kind, data = firsts[i]
        await queue.put((i, kind, data))
        while kind == "token":
            kind, data = await anext(events[i])
            await queue.put((i, kind, data))

    pumps = [asyncio.ensure_future(pump(i)) for i in range(len(jobs))]
    try:
        for fmt in fmts:
            opening = fmt.opening()
            if opening is not None:
                yield opening
        ends: dict[int, dict[str, Any]] = {}
        while len(ends) < len(jobs):
            i, kind, data = await queue.get()
            if kind == "token":
                chunk = fmts[i].token(data)
                if chunk:
                    yield chunk
            elif data.get("status") == "completed":
                ends[i] = data
                yield fmts[i].closing(data)
            else:
                # The failure is the last thing said: no [DONE] after it, the other jobs cancelled.
                yield error_chunk(data)
                return
        if fmts[0].include_usage:
            yield fmts[0].usage(*(ends[i] for i in range(len(jobs))))
        yield DONE_FRAME
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        await release_all(state, jobs, events)


def _model_list(state: QueenState) -> list[dict[str, Any]]:
    """Every model an online hive has in its catalog or a worker of it serves."""
    entries: dict[str, dict[str, Any]] = {}

    def entry(model_id: str, created: float) -> dict[str, Any]:
        found = entries.get(model_id)
        if found is None:
            found = entries[model_id] = {
                "id": model_id,
                "object": "model",
                "created": int(created),
                "owned_by": "rbee",
                "aliases": [],
                "hives": [],
                "workers": 0,
            }
        found["created"] = min(found["created"], int(created))
        return found

    def add(found: dict[str, Any], key: str, value: str) -> None:
        if value and value != found["id"] and value not in found[key]:
            found[key].append(value)

    for hive in state.telemetry.fresh_hives():
        for model in hive.models:
            found = entry(model.id, hive.first_seen)
            if model.alias:
                add(found, "aliases", model.alias)
            if hive.hive_id not in found["hives"]:
                found["hives"].append(hive.hive_id)
        for worker in hive.workers.values():
            report = worker.report
            found = entry(report.model, hive.first_seen)
            for alias in report.model_aliases:
                add(found, "aliases", alias)
            if hive.hive_id not in found["hives"]:
                found["hives"].append(hive.hive_id)
            if report.state in ("ready", "busy"):
                found["workers"] += 1
    return sorted(entries.values(), key=lambda e: e["id"])


#: What a completion can answer besides 200 (documented in the OpenAPI schema).
COMPLETION_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "invalid request"},
    403: {"description": "this token may not do that"},
    404: {"description": "no such model"},
    429: {"description": "the queue is full (Retry-After)"},
    502: {"description": "the worker was lost"},
    503: {"description": "no worker can serve the model"},
    504: {"description": "the job ran past its deadline"},
}


def openai_router() -> APIRouter:
    router = APIRouter(tags=["openai"])

    @router.get("/v1/models", summary="Models the cluster can serve (OpenAI list)")
    async def list_models(request: Request) -> dict[str, Any]:
        return {"object": "list", "data": _model_list(_state(request))}

    @router.get(
        "/v1/models/{model:path}",
        summary="One model (OpenAI model object)",
        response_model=None,
        responses={404: {"description": "no hive has that model"}},
    )
    async def get_model(request: Request, model: str) -> dict[str, Any] | JSONResponse:
        for found in _model_list(_state(request)):
            if model == found["id"] or model in found["aliases"]:
                return found
        return error_response(f"no hive has a model {model!r}", status=404, code="model_not_found", param="model")

    @router.post(
        "/v1/completions",
        summary="Text completion (OpenAI)",
        response_model=None,
        responses=COMPLETION_ERRORS,
        openapi_extra=_body_schema(COMPLETION_BODY),
    )
    async def completions(request: Request) -> Response:
        return await _complete(request, chat=False)

    @router.post(
        "/v1/chat/completions",
        summary="Chat completion (OpenAI)",
        response_model=None,
        responses=COMPLETION_ERRORS,
        openapi_extra=_body_schema(CHAT_BODY),
    )
    async def chat_completions(request: Request) -> Response:
        return await _complete(request, chat=True)

    return router
