"""Anthropic's Messages API on the queen: ``/v1/messages`` and ``/v1/messages/count_tokens``.

Built as the OpenAI-compatible API is (:mod:`rbee.queen.openai`): every
message request becomes an ordinary ``infer`` job in the queen's registry
(admitted, scheduled, queued, narrated, cancellable, in the history; the
``x-rbee-job-id`` header names it, ``request-id`` is ``req_`` and the job's
id), and the job's events are translated into Anthropic's shapes:

* not streaming: one ``message`` object once the job has ended;
* streaming: Anthropic's events in Anthropic's order (``message_start``,
  ``content_block_start``, ``ping``, ``content_block_delta`` ...,
  ``content_block_stop``, ``message_delta``, ``message_stop``). The response
  starts with the first token (or the end), so a failure before any output is
  still answered with its status; after that it is an ``error`` event and the
  stream closes without ``message_stop``.

A client that goes away cancels its job. The chat goes through the model's
chat template on the worker; ``system`` becomes a system message.

Errors are Anthropic's ``{"type": "error", "error": {"type", "message"}}``
with Anthropic's statuses: bad input 400, an unknown model 404, a full queue
429 (``rate_limit_error``, with ``Retry-After``), no worker that can serve the
model 529 (``overloaded_error``, what Anthropic's clients treat as "try again
later"; rbee's own API says 503), a job past its deadline 504
(``timeout_error``), a lost or failed worker 502 (``api_error``). A job
cancelled by someone else is 409 with ``x-should-retry: false``, so the
clients do not send it again.

Defaults follow Anthropic's: ``temperature`` 1 (at most 1), no ``top_p`` or
``top_k`` cut-off. What rbee cannot do (image, document, tool blocks; tools;
extended thinking) is refused with a 400 naming it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask

from rbee import errors
from rbee.contracts.operations import Infer, parse_operation
from rbee.http import anthropic_error_body
from rbee.jobs.job import Job
from rbee.narration import bound, narrate
from rbee.queen.bodies import body_schema as _body_schema
from rbee.queen.bodies import invalid as _invalid
from rbee.queen.bodies import number as _number
from rbee.queen.bodies import queen_state as _state
from rbee.queen.openai import (
    _STATUS_BY_KIND,
    JOB_ID_HEADER,
    _collect,
    _Events,
    _job_events,
    _json_body,
    _release,
    _unless_disconnected,
)
from rbee.queen.scheduler import COUNT_TIMEOUT_S

if TYPE_CHECKING:
    from rbee.queen.app import QueenState

__all__ = ["REQUEST_ID_HEADER", "anthropic_router"]

REQUEST_ID_HEADER = "request-id"
_CLIENT_GONE = 499
_SUPPORTED_BLOCKS = "only text blocks are supported"

# -- errors ------------------------------------------------------------------


def _status(rbee_status: int) -> int:
    """rbee's status -> Anthropic's: bad input is 400, "no worker now" is 529 (overloaded)."""
    if rbee_status == 422:
        return 400
    if rbee_status == 503:
        return 529
    return rbee_status


def _error(message: str, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if status == 409:
        headers["x-should-retry"] = "false"  # a cancelled job is not retried by the client
    return JSONResponse(anthropic_error_body(message, status=status), status, headers=headers)


def _rbee_error_response(exc: errors.RbeeError, headers: dict[str, str]) -> JSONResponse:
    if isinstance(exc, errors.QueueFull):
        headers = {**headers, "Retry-After": str(exc.retry_after_s)}
    message = exc.message
    if isinstance(exc, errors.InvalidOperation) and exc.field and exc.field != "operation":
        # Name the field as the client wrote it: messages[0].content, not messages.0.content.
        name = _field(exc.field)
        if message.startswith(exc.field):
            message = name + message[len(exc.field) :]
        elif not message.startswith(name):
            message = f"{name}: {message}"
    return _error(message, _status(exc.status_code), headers)


def _end_failure(end: dict[str, Any]) -> tuple[str, int]:
    error = end.get("error") or {}
    kind = str(error.get("kind") or end.get("status") or "internal")
    message = str(error.get("message") or f"the job ended {end.get('status')}")
    return message, _status(_STATUS_BY_KIND.get(kind, 500))


def _end_error_response(end: dict[str, Any], headers: dict[str, str]) -> JSONResponse:
    message, status = _end_failure(end)
    if status == 429:
        headers = {**headers, "Retry-After": "2"}
    return _error(message, status, headers)


def _field(field: str) -> str:
    """``messages.0.content`` (pydantic) -> ``messages[0].content``."""
    parts = field.split(".")
    out = parts[0]
    for part in parts[1:]:
        out += f"[{part}]" if part.isdigit() else f".{part}"
    return out


# -- requests ----------------------------------------------------------------


@dataclass(frozen=True)
class _Call:
    op: Infer
    model: str
    stream: bool
    stop: tuple[str, ...]


def _text(content: Any, where: str) -> str:
    """A string, or a list of text blocks (joined); any other block is refused by type."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _invalid(where, "must be a string or a list of content blocks")
    texts = []
    for j, block in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(block, dict):
            raise _invalid(at, "must be a content block object")
        kind = block.get("type")
        if kind != "text":
            raise _invalid(f"{at}.type", f"{kind!r} blocks are not supported ({_SUPPORTED_BLOCKS})")
        if not isinstance(block.get("text"), str):
            raise _invalid(f"{at}.text", "must be a string")
        texts.append(block["text"])
    return "".join(texts)


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    out = []
    system = body.get("system")
    if system is not None:
        text = _text(system, "system")
        if text:
            out.append({"role": "system", "content": text})
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise _invalid("messages", "must be a non-empty list of {role, content}")
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _invalid(where, "must be an object with role and content")
        role = message.get("role")
        if role not in ("user", "assistant"):
            hint = " (the system prompt is the top-level system field)" if role == "system" else ""
            raise _invalid(f"{where}.role", f"{role!r} is not supported: user or assistant{hint}")
        if "content" not in message:
            raise _invalid(f"{where}.content", "Field required")
        out.append({"role": role, "content": _text(message["content"], f"{where}.content")})
    return out


def _refuse_unsupported(body: dict[str, Any]) -> None:
    choice = body.get("tool_choice")
    no_tools = isinstance(choice, dict) and choice.get("type") == "none"
    if choice is not None and not no_tools:
        raise _invalid("tool_choice", 'tool use is not supported; only {"type": "none"} is accepted')
    if body.get("tools") and not no_tools:
        raise _invalid("tools", 'tool use is not supported (send no tools, or tool_choice {"type": "none"})')
    thinking = body.get("thinking")
    if thinking is not None and not (isinstance(thinking, dict) and thinking.get("type") == "disabled"):
        raise _invalid("thinking", "extended thinking is not supported")
    for name in ("mcp_servers", "container"):
        if body.get(name):
            raise _invalid(name, "not supported")
    output = body.get("output_config")
    if body.get("output_format") or (isinstance(output, dict) and output.get("format")):
        name = "output_format" if body.get("output_format") else "output_config.format"
        raise _invalid(name, "structured output formats are not supported")
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise _invalid("metadata", "must be an object")


def _parse(body: Any, *, counting: bool = False) -> _Call:
    if not isinstance(body, dict):
        raise errors.InvalidOperation("the body must be a JSON object", field=None)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("model", "Field required (a model id or alias, see GET /v1/models)")
    _refuse_unsupported(body)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _invalid("stream", "must be true or false")
    if counting:
        max_tokens = 1
    else:
        if body.get("max_tokens") is None:
            raise _invalid("max_tokens", "Field required")
        max_tokens = _number(body, "max_tokens", integer=True, low=1)
    stop = body.get("stop_sequences")
    if stop is None:
        stop = []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise _invalid("stop_sequences", "must be a list of non-empty strings")
    temperature = _number(body, "temperature", high=1)
    top_p = _number(body, "top_p", high=1)
    top_k = _number(body, "top_k", integer=True)
    fields: dict[str, Any] = {
        "operation": "infer",
        "model": model,
        "messages": _messages(body),
        "max_tokens": max_tokens,
        # Anthropic's defaults: temperature 1, the whole distribution.
        "temperature": 1.0 if temperature is None else temperature,
        "top_p": 1.0 if top_p is None else top_p,
        "top_k": 0 if top_k is None else top_k,
        "stop": stop,
    }
    op = parse_operation(fields)
    assert isinstance(op, Infer)
    return _Call(op=op, model=model, stream=stream, stop=tuple(stop))


# -- answers -----------------------------------------------------------------


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _stop(call: _Call, end: dict[str, Any]) -> tuple[str, str | None]:
    """Anthropic's ``stop_reason`` and ``stop_sequence``.

    A worker that says which stop string ended the answer (``stop_sequence`` in
    the end event) is believed; otherwise a stop with one stop sequence asked
    for is that one. With several, and no word from the worker, the first is
    named (the worker's "stop" does not say which one matched).
    """
    reason = end.get("stop_reason")
    if reason == "max_tokens":
        return "max_tokens", None
    if reason == "stop" and call.stop:
        matched = end.get("stop_sequence")
        if isinstance(matched, str):
            return ("stop_sequence", matched) if matched in call.stop else ("end_turn", None)
        return "stop_sequence", call.stop[0]
    return "end_turn", None


def _usage(end: dict[str, Any]) -> dict[str, int]:
    return {"input_tokens": int(end.get("tokens_in") or 0), "output_tokens": int(end.get("tokens_out") or 0)}


def _message_id(job: Job) -> str:
    return "msg_" + job.id.removeprefix("job-").replace("-", "")


def _request_id(job: Job | None = None) -> str:
    if job is None:
        return "req_" + uuid.uuid4().hex
    return "req_" + job.id.removeprefix("job-").replace("-", "")


def _message(call: _Call, job: Job, text: str, end: dict[str, Any]) -> dict[str, Any]:
    reason, sequence = _stop(call, end)
    return {
        "id": _message_id(job),
        "type": "message",
        "role": "assistant",
        "model": call.model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": _usage(end),
    }


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {_dumps(data)}\n\n".encode()


def _ping() -> ServerSentEvent:
    return ServerSentEvent(event="ping", data='{"type":"ping"}', sep="\n")


async def _stream(
    state: QueenState, job: Job, call: _Call, first: tuple[str, Any], events: _Events
) -> AsyncIterator[bytes]:
    try:
        start: dict[str, Any] = {
            "id": _message_id(job),
            "type": "message",
            "role": "assistant",
            "model": call.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            # The prompt's tokens are known at the end (message_delta says them).
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        yield _event("message_start", {"type": "message_start", "message": start})
        yield _event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        )
        yield _event("ping", {"type": "ping"})
        prefix = '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":'
        kind, data = first
        while kind == "token":
            yield f"event: content_block_delta\ndata: {prefix}{_dumps(data)}}}}}\n\n".encode()
            kind, data = await anext(events)
        end = data
        if end.get("status") != "completed":
            # The failure is the last thing said: no message_stop after it.
            message, status = _end_failure(end)
            yield _event("error", anthropic_error_body(message, status=status))
            return
        reason, sequence = _stop(call, end)
        yield _event("content_block_stop", {"type": "content_block_stop", "index": 0})
        yield _event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": reason, "stop_sequence": sequence},
                "usage": _usage(end),
            },
        )
        yield _event("message_stop", {"type": "message_stop"})
    finally:
        await _release(state, job, events)


# -- endpoints -----------------------------------------------------------------


async def _messages_endpoint(request: Request) -> Response:
    state = _state(request)
    try:
        call = _parse(await _json_body(request))
        job = await state.jobs.submit(call.op)
    except errors.RbeeError as exc:
        return _rbee_error_response(exc, {REQUEST_ID_HEADER: _request_id()})
    with bound(job, actor="queen"):
        narrate(
            "anthropic_request",
            f"Anthropic /v1/messages request for {call.model}{' (streaming)' if call.stream else ''}",
            path="/v1/messages",
            stream=call.stream,
        )
    headers = {JOB_ID_HEADER: job.id, REQUEST_ID_HEADER: _request_id(job)}
    events = _job_events(job)
    try:
        if call.stream:
            present, first = await _unless_disconnected(request, anext(events))
        else:
            present, first = await _unless_disconnected(request, _collect(events))
    except BaseException:
        await _release(state, job, events)
        raise
    if not present or first is None:
        await _release(state, job, events)
        return Response(status_code=_CLIENT_GONE, headers=headers)
    if not call.stream:
        text, end = first
        if end.get("status") != "completed":
            return _end_error_response(end, headers)
        return JSONResponse(_message(call, job, text, end), headers=headers)
    kind, data = first
    if kind == "end" and data.get("status") != "completed":
        await events.aclose()
        return _end_error_response(data, headers)
    return EventSourceResponse(
        _stream(state, job, call, first, events),
        ping=state.settings.ping_interval_s,
        ping_message_factory=_ping,
        sep="\n",
        headers={**headers, "Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        background=BackgroundTask(_release, state, job, events),
    )


async def _count_on_worker(state: QueenState, op: Infer) -> int | None:
    """The prompt's tokens as a ready worker of the model counts them, or None if none answers."""
    workers = [w for w in state.scheduler._candidates(op, set()) if w.report.url]
    for worker in sorted(workers, key=lambda w: state.scheduler.inflight.get(w.worker_id, 0)):
        token = worker.token or state.settings.token
        headers = {"content-type": "application/json"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        try:
            response = await state.http.post(
                f"{worker.report.url}/v1/tokens/count",
                content=op.model_dump_json(),
                headers=headers,
                timeout=COUNT_TIMEOUT_S,
            )
        except httpx.HTTPError:
            continue
        if response.status_code == 422:
            error = response.json().get("error") or {}
            raise errors.InvalidOperation(
                str(error.get("message") or "the worker refused the input"), field=error.get("field")
            )
        if response.status_code == 200:
            return int(response.json()["tokens_in"])
    return None


async def _count_tokens_endpoint(request: Request) -> Response:
    """Counted by a ready worker; with none, a one-token job starts one and says its prompt's tokens."""
    state = _state(request)
    headers = {REQUEST_ID_HEADER: _request_id()}
    try:
        call = _parse(await _json_body(request), counting=True)
        pending = state.router.admit(call.op)  # an unknown model is 404 here, as for /v1/messages
        if pending is not None:
            await pending
        counted = await _count_on_worker(state, call.op)
        if counted is not None:
            return JSONResponse({"input_tokens": counted}, headers=headers)
        job = await state.jobs.submit(call.op.model_copy(update={"temperature": 0.0, "stop": []}))
    except errors.RbeeError as exc:
        return _rbee_error_response(exc, headers)
    headers = {JOB_ID_HEADER: job.id, REQUEST_ID_HEADER: _request_id(job)}
    events = _job_events(job)
    try:
        present, first = await _unless_disconnected(request, _collect(events))
    finally:
        await _release(state, job, events)
    if not present or first is None:
        return Response(status_code=_CLIENT_GONE, headers=headers)
    _text_out, end = first
    if end.get("status") != "completed":
        return _end_error_response(end, headers)
    return JSONResponse({"input_tokens": int(end.get("tokens_in") or 0)}, headers=headers)


# -- the OpenAPI description ---------------------------------------------------

_TEXT_BLOCK = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
}
_CONTENT = {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_BLOCK}]}
_COMMON = {
    "model": {"type": "string", "minLength": 1},
    "messages": {
        "type": "array",
        "minItems": 1,
        "items": {
            "type": "object",
            "required": ["role", "content"],
            "properties": {"role": {"enum": ["user", "assistant"]}, "content": _CONTENT},
        },
    },
    "system": _CONTENT,
}
_MESSAGES_BODY = {
    "type": "object",
    "required": ["model", "max_tokens", "messages"],
    "properties": {
        **_COMMON,
        "max_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": 0},
        "stop_sequences": {"type": "array", "items": {"type": "string", "minLength": 1}},
        "stream": {"type": "boolean"},
        "metadata": {"type": "object"},
    },
}
_COUNT_BODY = {"type": "object", "required": ["model", "messages"], "properties": _COMMON}

#: What the endpoints answer besides 200 (in Anthropic's error shape).
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "invalid_request_error: bad input, naming the field"},
    403: {"description": "permission_error: this token may not do that"},
    404: {"description": "not_found_error: no such model"},
    409: {"description": "invalid_request_error: the job was cancelled"},
    429: {"description": "rate_limit_error: the queue is full (Retry-After)"},
    502: {"description": "api_error: the worker was lost or failed"},
    504: {"description": "timeout_error: the job ran past its deadline"},
    529: {"description": "overloaded_error: no worker can serve the model now"},
}


def anthropic_router() -> APIRouter:
    router = APIRouter(tags=["anthropic"])

    @router.post(
        "/v1/messages",
        summary="Create a message (Anthropic Messages API)",
        response_model=None,
        responses={200: {"content": {"text/event-stream": {}}}, **_ERRORS},
        openapi_extra=_body_schema(_MESSAGES_BODY),
    )
    async def messages(request: Request) -> Response:
        return await _messages_endpoint(request)

    @router.post(
        "/v1/messages/count_tokens",
        summary="Count a message's input tokens (Anthropic Messages API)",
        response_model=None,
        responses=_ERRORS,
        openapi_extra=_body_schema(_COUNT_BODY),
    )
    async def count_tokens(request: Request) -> Response:
        return await _count_tokens_endpoint(request)

    return router
