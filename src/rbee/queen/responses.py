"""OpenAI's Responses API on the queen: ``POST /v1/responses`` and ``GET /v1/responses/{id}``.

Built as the chat completions are (:mod:`rbee.queen.openai`): every request
becomes an ordinary ``infer`` job in the queen's registry (admitted,
scheduled, queued, narrated, cancellable, in the history; ``x-rbee-job-id``
names it), and the job's events are translated into the Responses API's shapes:

* not streaming: one ``response`` object once the job has ended, ``status``
  ``completed``, or ``incomplete`` with ``incomplete_details.reason``
  ``max_output_tokens`` when the answer was cut at ``max_output_tokens``;
* streaming: OpenAI's events in OpenAI's order (``response.created``,
  ``response.in_progress``, ``response.output_item.added``,
  ``response.content_part.added``, ``response.output_text.delta`` ...,
  ``response.output_text.done``, ``response.content_part.done``,
  ``response.output_item.done``, then ``response.completed`` or
  ``response.incomplete``), each with its ``sequence_number``. The response
  starts with the first token (or the end), so a failure before any output is
  still answered with its status; after that it is a ``response.failed``
  event and the stream closes.

``input`` is a string or a list of message items (roles ``user``,
``assistant``, ``system``, ``developer``; content a string or
``input_text``/``output_text`` parts); ``instructions`` is a system message
first. ``previous_response_id`` continues a stored response: the turns its job
was given and its answer (from the job history) come before ``input``; new
``instructions`` replace the previous ones. An id that names no response is
OpenAI's 404 ``previous_response_not_found``. Without ``max_output_tokens`` the
answer runs to the end of the context, as a chat does (:func:`rbee.queen.openai.to_the_context`).
``text.format`` ``json_object`` or ``json_schema`` is enforced by a grammar while
sampling. ``metadata`` is echoed; ``store`` is accepted (every job is in the
history anyway, and ``GET /v1/responses/{id}`` answers from it).

Parameters are taken as OpenAI takes them: one the Responses API does not have
is a 400 ``unknown_parameter`` naming it; what rbee cannot do (tools,
``conversation``, prompt templates, images and files, reasoning, background,
``include``, ``truncation: auto``) is a 400 ``unsupported_parameter`` naming it
and saying why; the informational ones (``user``, ``metadata``, ``store``,
``service_tier``, ``prompt_cache_key``, ``safety_identifier``...) are accepted.
A client that goes away cancels its job. Errors are OpenAI's ``{"error": {...}}``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.background import BackgroundTask

from rbee import errors
from rbee.contracts.operations import Infer, parse_operation
from rbee.jobs.job import Job
from rbee.narration import bound, narrate
from rbee.queen.bodies import invalid as _invalid
from rbee.queen.bodies import number as _number
from rbee.queen.bodies import queen_state as _state
from rbee.queen.openai.errors import end_error_response, error_response, rbee_error_response, status_of
from rbee.queen.openai.routes import COMPLETION_ERRORS
from rbee.queen.openai.schema import said
from rbee.queen.state import QueenState
from rbee.queen.translate import (
    DEFAULT_CHAT_MAX_TOKENS,
    JOB_ID_HEADER,
    REQUEST_ID_HEADER,
    Events,
    job_events,
    json_body,
    opening,
    release,
    to_the_context,
)
from rbee.server.sse import EventStream

__all__ = ["responses_router"]

_CLIENT_GONE = 499
_PATH = "/v1/responses"

# -- requests ----------------------------------------------------------------


#: Infer's fields -> the Responses API's names for them (for errors that name a field).
_RENAMED = {"max_tokens": "max_output_tokens", "messages": "input", "json_schema": "text.format"}


def _renamed(exc: errors.InvalidOperation) -> errors.InvalidOperation:
    name = exc.field
    if not name:
        return exc
    head, _, rest = name.partition(".")
    if head not in _RENAMED:
        return exc
    new = _RENAMED[head] + ("." + rest if rest and head != "json_schema" else "")
    message = exc.message
    if message.startswith(name):
        message = new + message[len(name) :]
    elif message.startswith(head):
        message = _RENAMED[head] + message[len(head) :]
    return errors.InvalidOperation(message, field=new)


@dataclass(frozen=True)
class _Call:
    op: Infer
    model: str
    stream: bool
    #: What the response object echoes of the request.
    echo: dict[str, Any] = field(default_factory=dict)
    #: No max_output_tokens: the answer runs to the end of the context.
    to_the_context: bool = False


def _content(content: Any, where: str) -> str:
    """A string, or a list of text parts (joined); any other part is refused by type."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _invalid(where, "must be a string or a list of input_text parts")
    texts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise _invalid(at, "must be a content part object")
        kind = part.get("type")
        if kind not in ("input_text", "output_text", "text"):
            raise _invalid(f"{at}.type", f"{kind!r} parts are not supported (only input_text and output_text)")
        if not isinstance(part.get("text"), str):
            raise _invalid(f"{at}.text", "must be a string")
        texts.append(part["text"])
    return "".join(texts)


def _input(body: dict[str, Any]) -> list[dict[str, str]]:
    out = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _invalid("instructions", "must be a string")
        if instructions:
            out.append({"role": "system", "content": instructions})
    raw = body.get("input")
    if isinstance(raw, str):
        if not raw and not out:
            raise _invalid("input", "must not be empty")
        out.append({"role": "user", "content": raw})
        return out
    if not isinstance(raw, list) or not raw:
        raise _invalid("input", "must be a string or a non-empty list of message items")
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _invalid(where, "must be a message item {role, content}")
        kind = item.get("type", "message")
        if kind != "message":
            raise _invalid(f"{where}.type", f"{kind!r} items are not supported (only message items)")
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise _invalid(f"{where}.role", f"{role!r} is not supported (user, assistant, system, developer)")
        if "content" not in item:
            raise _invalid(f"{where}.content", "Field required")
        text = _content(item["content"], f"{where}.content")
        out.append({"role": "system" if role == "developer" else role, "content": text})
    return out


def _format(body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``text`` as the response echoes it, and Infer's ``json_schema`` (None: free text)."""
    text = body.get("text")
    if text is None:
        return {"format": {"type": "text"}}, None
    if not isinstance(text, dict):
        raise _invalid("text", "must be an object with a format")
    fmt = text.get("format")
    if fmt is None:
        return {**text, "format": {"type": "text"}}, None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return text, None
    if kind == "json_object":
        return text, {"type": "object"}
    if kind == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise _invalid("text.format.schema", "must be a JSON schema (an object)")
        name = fmt.get("name")
        if name is not None and not isinstance(name, str):
            raise _invalid("text.format.name", "must be a string")
        return text, schema
    raise _invalid("text.format.type", f"{kind!r} is not supported (text, json_object or json_schema)")


#: The Responses API's parameters rbee honours (``seed`` is rbee's own, as on the chat completions).
_HONOURED = frozenset(
    {
        "model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "text",
        "previous_response_id", "tools", "tool_choice", "seed", "truncation",
    }
)  # fmt: skip
#: The ones that do not change the answer: accepted, some echoed.
_INFORMATIONAL = frozenset(
    {
        "user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier",
        "parallel_tool_calls", "max_tool_calls", "stream_options",
    }
)  # fmt: skip
#: The ones rbee cannot honour (refused when given anything but their default), and why.
_UNSUPPORTED = {
    "conversation": "conversations are not supported: give previous_response_id, or the whole conversation in input",
    "prompt": "prompt templates are not supported",
    "background": "background responses are not supported",
    "include": "no extra output can be included",
    "top_logprobs": "log-probabilities are not supported here (use /v1/chat/completions)",
    "reasoning": "reasoning is not supported by rbee's models",
}


def _refuse_unknown(body: dict[str, Any]) -> None:
    """As OpenAI answers a parameter it does not know: 400 ``unknown_parameter`` naming it."""
    unknown = [said(str(k)) for k in body if k not in _HONOURED | _INFORMATIONAL | set(_UNSUPPORTED)]
    if unknown:
        which = "argument" if len(unknown) == 1 else "arguments"
        raise errors.InvalidOperation(
            f"Unrecognized request {which} supplied: {', '.join(unknown[:16])}",
            field=unknown[0],
            code="unknown_parameter",
        )


def _unsupported(name: str, why: str) -> errors.InvalidOperation:
    return errors.InvalidOperation(f"{name}: {why}", field=name, code="unsupported_parameter")


def _refuse_unsupported(body: dict[str, Any]) -> None:
    tools = body.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise _invalid("tools", "must be a list")
        names = []
        for tool in tools:
            if isinstance(tool, dict):
                names.append(str(tool.get("name") or tool.get("type") or "?"))
        raise _unsupported("tools", f"tool calling is not supported ({', '.join(names) or 'send no tools'})")
    choice = body.get("tool_choice")
    if choice not in (None, "none", "auto"):
        raise _unsupported("tool_choice", "tool calling is not supported (only none or auto, with no tools)")
    for name, why in _UNSUPPORTED.items():
        value = body.get(name)
        if value in (None, False, [], {}, 0) or (name == "reasoning" and _no_reasoning(value)):
            continue
        raise _unsupported(name, why)
    if body.get("truncation") not in (None, "disabled"):
        raise _unsupported("truncation", "only disabled: an input too long for the context is refused")
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise _invalid("metadata", "must be an object")
    for name in ("store", "parallel_tool_calls"):
        value = body.get(name)
        if value is not None and not isinstance(value, bool):
            raise _invalid(name, "must be true or false")


def _no_reasoning(value: Any) -> bool:
    return isinstance(value, dict) and value.get("effort") in (None, "none") and not value.get("summary")


def _parse(body: Any, previous: list[dict[str, str]] | None = None) -> _Call:
    """``previous``: the conversation of ``previous_response_id`` (its input and its answer)."""
    if not isinstance(body, dict):
        raise errors.InvalidOperation("the body must be a JSON object", field=None)
    _refuse_unknown(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("model", "Field required (a model id or alias, see GET /v1/models)")
    _refuse_unsupported(body)
    stream = body.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _invalid("stream", "must be true or false")
    max_tokens = _number(body, "max_output_tokens", integer=True, low=1)
    temperature = _number(body, "temperature", high=2)
    top_p = _number(body, "top_p", high=1)
    seed = _number(body, "seed", integer=True)
    text, schema = _format(body)
    messages = _input(body)
    if previous and body.get("instructions"):
        # The new instructions replace the previous ones, and come first.
        previous = previous[1:] if previous[0]["role"] == "system" else previous
        messages = [messages[0], *previous, *messages[1:]]
    elif previous:
        messages = [*previous, *messages]
    fields: dict[str, Any] = {
        "operation": "infer",
        "model": model,
        "messages": messages,
        "max_tokens": DEFAULT_CHAT_MAX_TOKENS if max_tokens is None else max_tokens,
        # OpenAI's defaults, not rbee's.
        "temperature": 1.0 if temperature is None else temperature,
        "top_p": 1.0 if top_p is None else top_p,
    }
    if seed is not None:
        fields["seed"] = seed
    if schema is not None:
        fields["json_schema"] = schema
    try:
        op = parse_operation(fields)
    except errors.InvalidOperation as exc:
        raise _renamed(exc) from None
    assert isinstance(op, Infer)
    echo = {
        "instructions": body.get("instructions"),
        "max_output_tokens": max_tokens,
        "metadata": body.get("metadata") or {},
        "previous_response_id": body.get("previous_response_id"),
        "store": body.get("store", True) is not False,
        "temperature": op.temperature,
        "text": text,
        "top_p": op.top_p,
        "user": body.get("user"),
    }
    return _Call(op=op, model=model, stream=stream, echo=echo, to_the_context=max_tokens is None)


# -- answers -----------------------------------------------------------------


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _uid(job_id: str) -> str:
    return job_id.removeprefix("job-").replace("-", "")


def _job_id(response_id: str) -> str | None:
    """``resp_<hex>`` -> the job's id (None: not one of ours)."""
    try:
        return f"job-{uuid.UUID(hex=response_id.removeprefix('resp_'))}"
    except ValueError:
        return None


def _usage(end: dict[str, Any]) -> dict[str, Any]:
    prompt = int(end.get("tokens_in") or 0)
    completion = int(end.get("tokens_out") or 0)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": min(prompt, int(end.get("tokens_reused") or 0))},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class _Answer:
    """The Responses API's objects of one answer."""

    def __init__(self, job_id: str, created_at: float, model: str, echo: dict[str, Any]) -> None:
        uid = _uid(job_id)
        self.id = f"resp_{uid}"
        self.item_id = f"msg_{uid}"
        self.created_at = int(created_at)
        self.model = model
        self.echo = echo

    def response(
        self,
        status: str,
        output: list[dict[str, Any]],
        usage: dict[str, Any] | None,
        *,
        incomplete: bool = False,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        echo = self.echo
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": False,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": echo.get("instructions"),
            "max_output_tokens": echo.get("max_output_tokens"),
            "max_tool_calls": None,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": echo.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "service_tier": "default",
            "store": echo.get("store", True),
            "temperature": echo.get("temperature"),
            "text": echo.get("text") or {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_logprobs": 0,
            "top_p": echo.get("top_p"),
            "truncation": "disabled",
            "usage": usage,
            "user": echo.get("user"),
            "metadata": echo.get("metadata") or {},
        }

    def item(self, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.item_id, "type": "message", "status": status, "role": "assistant", "content": content}

    def whole(self, text: str, end: dict[str, Any]) -> dict[str, Any]:
        incomplete = end.get("stop_reason") == "max_tokens"
        status = "incomplete" if incomplete else "completed"
        output = [self.item(status, [_part(text)])]
        return self.response(status, output, _usage(end), incomplete=incomplete)


def _event(name: str, seq: int, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {_dumps({'type': name, **data, 'sequence_number': seq})}\n\n".encode()


def _failure(end: dict[str, Any]) -> dict[str, Any]:
    error = end.get("error") or {}
    kind = str(error.get("kind") or end.get("status") or "internal")
    message = str(error.get("message") or f"the job ended {end.get('status')}")
    return {"code": "server_error" if status_of(kind) >= 500 else kind, "message": message}


async def _stream(
    state: QueenState, job: Job, answer: _Answer, first: tuple[str, Any], events: Events
) -> AsyncIterator[bytes]:
    try:
        seq = 0

        def event(name: str, data: dict[str, Any]) -> bytes:
            nonlocal seq
            out = _event(name, seq, data)
            seq += 1
            return out

        at = {"item_id": answer.item_id, "output_index": 0, "content_index": 0}
        yield event("response.created", {"response": answer.response("in_progress", [], None)})
        yield event("response.in_progress", {"response": answer.response("in_progress", [], None)})
        yield event("response.output_item.added", {"output_index": 0, "item": answer.item("in_progress", [])})
        yield event("response.content_part.added", {**at, "part": _part("")})
        prefix = (
            'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
            f'"item_id":"{answer.item_id}","output_index":0,"content_index":0,"delta":'
        )
        parts: list[str] = []
        kind, data = first
        while kind == "token":
            parts.append(data)
            yield f'{prefix}{_dumps(data)},"logprobs":[],"sequence_number":{seq}}}\n\n'.encode()
            seq += 1
            kind, data = await anext(events)
        end = data
        text = "".join(parts)
        if end.get("status") != "completed":
            # The failure is the last thing said.
            output = [answer.item("incomplete", [_part(text)])] if text else []
            failed = answer.response("failed", output, _usage(end), error=_failure(end))
            yield event("response.failed", {"response": failed})
            return
        whole = answer.whole(text, end)
        item = whole["output"][0]
        yield event("response.output_text.done", {**at, "text": text, "logprobs": []})
        yield event("response.content_part.done", {**at, "part": _part(text)})
        yield event("response.output_item.done", {"output_index": 0, "item": item})
        name = "response.incomplete" if whole["status"] == "incomplete" else "response.completed"
        yield event(name, {"response": whole})
    finally:
        await release(state, job, events)


# -- endpoints -----------------------------------------------------------------


def _request_id() -> str:
    return "req_" + uuid.uuid4().hex


async def _create(request: Request) -> Response:
    state = _state(request)
    try:
        body = await json_body(request)
        call = _parse(body, _previous(state, body))
        if call.to_the_context:
            call = replace(call, op=await to_the_context(state, call.op, "input"))
        job = await state.jobs.submit(call.op)
    except errors.RbeeError as exc:
        return rbee_error_response(exc, {REQUEST_ID_HEADER: _request_id()})
    with bound(job, actor="queen"):
        narrate(
            "openai_request",
            f"OpenAI {_PATH} request for {call.model}{' (streaming)' if call.stream else ''}",
            path=_PATH,
            stream=call.stream,
        )
    headers = {JOB_ID_HEADER: job.id, REQUEST_ID_HEADER: job.id}
    answer = _Answer(job.id, job.created_at, call.model, call.echo)
    events = job_events(job)
    first = await opening(request, state, job, events, stream=call.stream)
    if first is None:
        return Response(status_code=_CLIENT_GONE, headers=headers)
    if not call.stream:
        text, end = first
        if end.get("status") != "completed":
            return _end_error(end, headers)
        return JSONResponse(answer.whole(text, end), headers=headers)
    kind, data = first
    if kind == "end" and data.get("status") != "completed":
        await events.aclose()
        return _end_error(data, headers)
    return EventStream(
        _stream(state, job, answer, first, events),
        ping_s=state.settings.ping_interval_s,
        headers=headers,
        background=BackgroundTask(release, state, job, events),
    )


def _end_error(end: dict[str, Any], headers: dict[str, str]) -> JSONResponse:
    """A job that failed before its first token; a worker's refusal names Infer's field
    (``json_schema: ...``), the answer names the client's (``text.format``)."""
    error = end.get("error") or {}
    message = str(error.get("message") or "")
    if error.get("kind") == "invalid_operation":
        for name, new in _RENAMED.items():
            if message.startswith(f"{name}: "):
                message = new + message[len(name) :]
                return error_response(message, status=400, code="invalid_operation", param=new, headers=headers)
    return end_error_response(end, headers)


def _previous(state: QueenState, body: Any) -> list[dict[str, str]] | None:
    """The conversation ``previous_response_id`` names: the turns its job was given and its answer.

    An id that names no response this token may see is OpenAI's 404
    ``previous_response_not_found``; one still running, or that failed, is a 400.
    """
    if not isinstance(body, dict) or body.get("previous_response_id") is None:
        return None
    response_id = body["previous_response_id"]
    if not isinstance(response_id, str):
        raise _invalid("previous_response_id", "must be a response id (resp_...)")
    job_id = _job_id(response_id)
    record = state.store.get(job_id) if job_id is not None and state.visible(job_id) else None
    if record is None or record.get("operation") != "infer":
        raise errors.JobNotFound(
            f"Previous response with id {response_id!r} not found.",
            code="previous_response_not_found",
            param="previous_response_id",
        )
    status = record.get("status")
    if status != "completed":
        why = "is still in progress" if status in ("queued", "running") else f"ended {status}, with no answer"
        raise _invalid("previous_response_id", f"the response {response_id} {why}")
    payload = record.get("payload") or {}
    turns = [{"role": m["role"], "content": m["content"]} for m in payload.get("messages") or ()]
    if not turns and payload.get("prompt"):
        turns = [{"role": "user", "content": payload["prompt"]}]
    return [*turns, {"role": "assistant", "content": str(record.get("text") or "")}]


def _not_found(response_id: str) -> JSONResponse:
    message = f"no response with id {response_id!r}"
    return error_response(message, status=404, code="not_found", param="response_id")


def _from_history(state: QueenState, response_id: str) -> dict[str, Any] | None:
    """The response a job of the history (or a live one) answered, rebuilt from its record."""
    job_id = _job_id(response_id)
    if job_id is None or not state.visible(job_id):
        return None
    record = state.store.get(job_id)
    if record is None or record.get("operation") != "infer":
        return None
    payload = record.get("payload") or {}
    echo = {
        "max_output_tokens": payload.get("max_tokens"),
        "temperature": payload.get("temperature"),
        "top_p": payload.get("top_p"),
        "text": {"format": {"type": "json_schema", "name": "schema", "schema": payload["json_schema"], "strict": True}}
        if payload.get("json_schema")
        else {"format": {"type": "text"}},
    }
    answer = _Answer(job_id, float(record.get("created_at") or time.time()), str(payload.get("model") or ""), echo)
    status = record.get("status")
    end = {"tokens_in": record.get("tokens_in"), "tokens_out": record.get("tokens_out"), "stop_reason": None}
    if status == "completed":
        end["stop_reason"] = record.get("stop_reason")
        return answer.whole(str(record.get("text") or ""), end)
    if status in ("queued", "running"):
        return answer.response("in_progress" if status == "running" else "queued", [], None)
    text = str(record.get("text") or "")
    output = [answer.item("incomplete", [_part(text)])] if text else []
    if status == "cancelled":
        return answer.response("cancelled", output, _usage(end))
    error = record.get("error") or {}
    failure = _failure({"status": status, "error": error})
    return answer.response("failed", output, _usage(end), error=failure)


#: The request body's main fields (the full rules are OpenAI's; what rbee refuses is a 400 naming the field).
_PART = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"enum": ["input_text", "output_text"]}, "text": {"type": "string"}},
}
_BODY = {
    "type": "object",
    "required": ["model", "input"],
    "properties": {
        "model": {"type": "string", "minLength": 1},
        "input": {
            "anyOf": [
                {"type": "string", "minLength": 1},
                {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["role", "content"],
                        "properties": {
                            "type": {"const": "message"},
                            "role": {"enum": ["user", "assistant", "system", "developer"]},
                            "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _PART}]},
                        },
                    },
                },
            ]
        },
        "instructions": {"type": ["string", "null"]},
        "previous_response_id": {"type": ["string", "null"], "description": "a response to continue (resp_...)"},
        "max_output_tokens": {"type": ["integer", "null"], "minimum": 1},
        "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
        "top_p": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
        "stream": {"type": ["boolean", "null"]},
        "store": {"type": ["boolean", "null"]},
        "metadata": {"type": ["object", "null"]},
        "text": {"type": ["object", "null"]},
    },
}


#: What creating a response answers besides 200 (in OpenAI's error shape).
_CREATE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}},
    409: {"description": "the job was cancelled"},
    **COMPLETION_ERRORS,
}


def responses_router() -> APIRouter:
    router = APIRouter(tags=["openai"])

    @router.post(
        _PATH,
        summary="Create a response (OpenAI Responses API)",
        response_model=None,
        responses=_CREATE_RESPONSES,
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": _BODY}}}},
    )
    async def create_response(request: Request) -> Response:
        return await _create(request)

    @router.get(
        _PATH + "/{response_id}",
        summary="A response, from the job history (OpenAI Responses API)",
        response_model=None,
        responses={404: {"description": "no such response"}},
    )
    async def get_response(request: Request, response_id: str) -> Response:
        found = _from_history(_state(request), response_id)
        if found is None:
            return _not_found(response_id)
        return JSONResponse(found, headers={JOB_ID_HEADER: str(_job_id(response_id))})

    return router
