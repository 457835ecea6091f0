"""What every API the queen speaks (OpenAI's, the Responses API, Ollama's, Anthropic's,
llama.cpp's infill) shares in turning a request into a job and the job's events into an
answer: the body read as JSON, the prompt's room in the context, a job's events as tokens
and its end, the client's disconnect raced against the work, the job released after.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Awaitable
from typing import Any, TypeVar

import httpx
from fastapi import Request

from rbee import errors
from rbee.contracts.operations import LIMITS, Infer
from rbee.jobs.job import Job
from rbee.queen.scheduler import COUNT_TIMEOUT_S, input_bound
from rbee.queen.state import QueenState
from rbee.queen.telemetry import WorkerView

__all__ = [
    "CLIENT_GONE",
    "DEFAULT_CHAT_MAX_TOKENS",
    "JOB_ID_HEADER",
    "REQUEST_ID_HEADER",
    "Events",
    "abandon",
    "collect",
    "collect_logprobs",
    "count_prompt",
    "dumps",
    "job_events",
    "json_body",
    "opening",
    "release",
    "release_all",
    "renders_tools",
    "to_the_context",
    "unless_disconnected",
    "until_disconnected",
]

JOB_ID_HEADER = "x-rbee-job-id"
REQUEST_ID_HEADER = "x-request-id"
#: A chat's ``max_tokens`` while no worker of its model is known to bound it by its context.
DEFAULT_CHAT_MAX_TOKENS = 1024
CLIENT_GONE = 499  # nginx's "client closed request": nobody reads it, the log does

T = TypeVar("T")
#: A job's events as :func:`job_events` yields them: ``("token", text)``..., ``("end", end)``.
Events = AsyncGenerator[tuple[str, Any], None]


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


async def json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.InvalidOperation(f"the body is not valid JSON: {exc}", field=None) from None


async def job_events(job: Job, *, logprobs: bool = False) -> Events:
    """``("token", text)`` for each token (with ``logprobs``: ``(text, the token event's lp)``),
    then ``("end", end_data)``.

    The end gets ``tokens_reused`` (prompt tokens the worker's slot already held)
    from the worker's ``infer_prefix_reused`` narration when it has none.
    """
    reused = 0
    async for _id, kind, data in job.stream():
        if kind == "token":
            token = json.loads(data)
            yield "token", (token["t"], token.get("lp")) if logprobs else token["t"]
        elif kind == "narration" and '"infer_prefix_reused"' in data:
            reused = int(json.loads(data).get("tokens_reused") or 0)
        elif kind == "end":
            end = json.loads(data)
            end.setdefault("tokens_reused", reused)
            yield "end", end
            return


async def until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> tuple[bool, T | None]:
    """Await ``work`` unless the client leaves first: ``(True, result)`` or ``(False, None)``."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)
    if task.cancelled():
        return False, None
    return True, task.result()


def abandon(state: QueenState, job: Job) -> None:
    """The client left: cancel its job so the worker is freed."""
    if not job.done and job.cancel_reason is None:
        try:
            state.registry.cancel(job.id, "client disconnected")
        except errors.JobConflict:
            pass


async def release(state: QueenState, job: Job, events: Events) -> None:
    await events.aclose()
    abandon(state, job)


async def opening(request: Request, state: QueenState, job: Job, events: Events, *, stream: bool) -> Any:
    """The job's first event (``stream``) or its whole answer (:func:`collect`), unless the
    client leaves first: then the job is let go and None comes back (an error: let go, raised)."""
    try:
        present, first = await unless_disconnected(request, anext(events) if stream else collect(events))
    except BaseException:
        await release(state, job, events)
        raise
    if not present or first is None:
        await release(state, job, events)
        return None
    return first


async def release_all(state: QueenState, jobs: list[Job], events: list[Events]) -> None:
    for job, job_events in zip(jobs, events, strict=True):
        await release(state, job, job_events)


async def collect(events: Events) -> tuple[str, dict[str, Any]]:
    parts: list[str] = []
    async for kind, data in events:
        if kind == "token":
            parts.append(data)
        else:
            return "".join(parts), data
    raise errors.RbeeError("the job's stream ended without an end event")  # pragma: no cover


async def collect_logprobs(events: Events) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """:func:`collect` of events with log-probabilities: also every token's entry, in order."""
    parts: list[str] = []
    lps: list[dict[str, Any]] = []
    async for kind, data in events:
        if kind == "token":
            parts.append(data[0])
            lps.extend(data[1] or ())
        else:
            return "".join(parts), data, lps
    raise errors.RbeeError("the job's stream ended without an end event")  # pragma: no cover


async def count_prompt(state: QueenState, op: Infer, worker: WorkerView) -> int | None:
    """The prompt tokens of ``op`` as ``worker`` counts them (None: it did not answer)."""
    token = worker.token or state.settings.token
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    body = op.model_copy(update={"hive_id": None, "worker_id": None, "device": None}).model_dump_json()
    try:
        response = await state.http.post(
            f"{worker.report.url}/v1/tokens/count", content=body, headers=headers, timeout=COUNT_TIMEOUT_S
        )
    except httpx.HTTPError:
        return None
    if response.status_code == 422:
        error = response.json().get("error") or {}
        raise errors.InvalidOperation(
            str(error.get("message") or "the worker refused the input"), field=error.get("field")
        )
    if response.status_code != 200:
        return None
    return int(response.json()["tokens_in"])


def renders_tools(state: QueenState, model: str) -> bool:
    """Whether ``model``'s own chat template renders tools, as a hive that has it reports."""
    for hive in state.telemetry.fresh_hives():
        ids = {model}
        for worker in hive.workers.values():
            if model in (worker.report.model, *worker.report.model_aliases):
                ids.add(worker.report.model)
        if any(m.chat_tools and (m.id in ids or m.alias == model) for m in hive.models):
            return True
    return False


async def to_the_context(state: QueenState, op: Infer, field: str) -> Infer:
    """``op`` (asked for no limit) marked ``to_the_context`` for the worker that runs it, with the
    ``max_tokens`` that leaves it as far as the queen can tell now.

    The context is the smallest of the model's ready workers' (``n_ctx`` of their
    reports), the prompt as one of them counts it (``POST /v1/tokens/count``), or
    bounded by its bytes when none answers; a prompt that leaves no room is refused,
    naming ``field``. While no worker of the model is known (the first one is still to
    start), :data:`DEFAULT_CHAT_MAX_TOKENS` stands in and the worker that runs the job
    bounds it by its own context.
    """
    op = op.model_copy(update={"to_the_context": True})
    workers = [w for w in state.scheduler.candidates(op, set()) if w.report.n_ctx and w.report.url]
    if not workers:
        return op
    n_ctx = min(w.report.n_ctx or 0 for w in workers)
    counted = await count_prompt(state, op, min(workers, key=lambda w: state.scheduler.inflight.get(w.worker_id, 0)))
    tokens_in = counted if counted is not None else input_bound(op)
    room = min(n_ctx - tokens_in, LIMITS.max_tokens)
    if room < 1:
        if counted is None:
            return op  # the worker that runs it says
        raise errors.InvalidOperation(
            f"{field}: the prompt is {tokens_in} tokens; the context holds {n_ctx}, with room for no token more",
            field=field,
            tokens_in=tokens_in,
            n_ctx=n_ctx,
        )
    return op.model_copy(update={"max_tokens": room})
