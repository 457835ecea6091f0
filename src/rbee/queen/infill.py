"""Fill in the middle on the queen: ``POST /infill`` in llama.cpp server's shape, for editor plugins.

The request is llama.cpp's: ``input_prefix`` (the text before the cursor),
``input_suffix`` (after it), ``input_extra`` (other files, ``[{filename, text}]``),
``prompt`` (the start of the middle, already typed: it is put after the prefix),
``n_predict`` (or ``max_tokens``; -1 or none: to the end of the context), the
sampling options llama.cpp takes (``temperature``, ``top_k``, ``top_p``,
``min_p``, ``seed``, ``repeat_penalty``, the presence and frequency penalties,
``stop``, ``grammar``, ``json_schema``) with llama.cpp's defaults, ``stream`` and
an optional ``model`` (default :data:`~rbee.contracts.operations.DEFAULT_MODEL`).
What editor plugins send as hints (``cache_prompt``, ``samplers``, ``n_indent``,
``t_max_prompt_ms``, ``t_max_predict_ms``, ``id_slot``) is accepted, and
``response_fields`` picks the answer's fields as llama.cpp does (``timings/prompt_n``
for a nested one). Any other parameter is a 400 naming it, as on the OpenAI routes.

Each request is an ordinary ``infer`` job (``suffix`` and ``infill_files``): admitted,
scheduled, queued, narrated (``infill_request``), cancellable, in the history, named
by ``x-rbee-job-id``; a client that goes away cancels it. The worker builds the FIM
prompt from the model's own FIM tokens and refuses a model that has none; that
refusal, like any bad input, is a 400 naming the client's field (``input_suffix``)
before anything is streamed. The answer is llama.cpp's ``/completion`` object
(``content``, ``stop``, ``stop_type``, ``tokens_predicted``, ``tokens_evaluated``,
``tokens_cached``, ``timings``...); streamed, one ``data:`` chunk per piece of text
(``stop: false``) and the final object last, as llama.cpp sends them (no ``[DONE]``).
Errors are OpenAI's shape, as on the queen's other llama.cpp routes.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.background import BackgroundTask

from rbee import errors
from rbee.contracts.operations import DEFAULT_MODEL, Infer, parse_keep_alive, parse_operation
from rbee.jobs.job import Job
from rbee.narration import bound, narrate
from rbee.queen.bodies import body_schema as _body_schema
from rbee.queen.bodies import invalid as _invalid
from rbee.queen.bodies import number as _number
from rbee.queen.bodies import queen_state as _state
from rbee.queen.openai.errors import FIELD_PREFIX, error_chunk, error_response, rbee_error_response, status_of
from rbee.queen.openai.routes import COMPLETION_ERRORS
from rbee.queen.openai.schema import INFORMATIONAL_LLAMA_CPP, NOTHING_ASKED, UNSUPPORTED, said, same
from rbee.queen.state import QueenState
from rbee.queen.translate import (
    JOB_ID_HEADER,
    Events,
    collect,
    job_events,
    json_body,
    release,
    to_the_context,
    unless_disconnected,
)
from rbee.server.sse import EventStream

__all__ = ["infill_router"]

_PATH = "/infill"
_CLIENT_GONE = 499

#: What the request may hold (besides the hints editor plugins send, accepted as on the OpenAI routes).
_READ = frozenset(
    {
        "model", "input_prefix", "input_suffix", "input_extra", "prompt", "n_predict", "max_tokens",
        "temperature", "top_k", "top_p", "min_p", "seed", "stop", "stream", "repeat_penalty",
        "presence_penalty", "frequency_penalty", "grammar", "json_schema", "keep_alive", "response_fields",
    }
)  # fmt: skip
#: Infer's fields -> the names the client used (a refusal names the client's).
_RENAMED = {
    "prompt": "input_prefix",
    "suffix": "input_suffix",
    "infill_files": "input_extra",
    "max_tokens": "n_predict",
}


@dataclass(frozen=True)
class _Call:
    op: Infer
    model: str
    stream: bool
    to_the_context: bool
    #: ``response_fields``: the answer's fields to send (empty: all).
    fields: list[str] = field(default_factory=list)


def _text(body: dict[str, Any], name: str) -> str:
    value = body.get(name, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _invalid(name, "must be a string")
    return value


def _extra(raw: Any) -> list[dict[str, str]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _invalid("input_extra", "must be a list of {filename, text}")
    files = []
    for i, item in enumerate(raw):
        where = f"input_extra[{i}]"
        if not isinstance(item, dict):
            raise _invalid(where, "must be an object {filename, text}")
        text, filename = item.get("text"), item.get("filename", "")
        if not isinstance(text, str):
            raise _invalid(f"{where}.text", "must be a string")
        if not isinstance(filename, str):
            raise _invalid(f"{where}.filename", "must be a string")
        files.append({"filename": filename, "text": text})
    return files


def _refuse_unknown(body: dict[str, Any]) -> None:
    for name in body:
        if name in _READ or name in INFORMATIONAL_LLAMA_CPP:
            continue
        if name in UNSUPPORTED:
            value = body[name]
            if value is None or any(same(value, off) for off in NOTHING_ASKED.get(name, ())):
                continue
            raise errors.InvalidOperation(f"{name}: {UNSUPPORTED[name]}", field=name, code="unsupported_parameter")
        raise errors.InvalidOperation(
            f"Unrecognized request argument supplied: {said(str(name))}",
            field=said(str(name)),
            code="unknown_parameter",
        )


def _renamed(exc: errors.InvalidOperation) -> errors.InvalidOperation:
    """A refusal of Infer's field, said with the client's name for it."""
    head = (exc.field or "").split(".")[0]
    if head not in _RENAMED:
        return exc
    message = exc.message
    if message.startswith(head):
        message = _RENAMED[head] + message[len(head) :]
    return errors.InvalidOperation(message, field=_RENAMED[head] + (exc.field or "")[len(head) :], **exc.data)


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _parse(body: Any) -> _Call:
    if not isinstance(body, dict):
        raise errors.InvalidOperation("the body must be a JSON object", field=None)
    _refuse_unknown(body)
    model = body.get("model") or DEFAULT_MODEL
    if not isinstance(model, str):
        raise _invalid("model", "must be a model's name")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise _invalid("stream", "must be true or false")
    n_predict = _number(body, "n_predict", integer=True, low=-(2**31))
    name = "n_predict"
    if n_predict is None:
        n_predict, name = _number(body, "max_tokens", integer=True, low=-(2**31)), "max_tokens"
    if n_predict == 0:
        raise _invalid(name, "must be at least 1 (or -1: to the end of the context)")
    to_the_end = n_predict is None or n_predict < 0
    seed = _number(body, "seed", integer=True, low=-1)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    fields: dict[str, Any] = {
        "operation": "infer",
        "model": model,
        "prompt": _text(body, "input_prefix") + _text(body, "prompt"),
        "suffix": _text(body, "input_suffix"),
        "infill_files": _extra(body.get("input_extra")),
        "max_tokens": 1024 if to_the_end else n_predict,
        # llama.cpp's defaults.
        "temperature": _or(_number(body, "temperature", high=2), 0.8),
        "top_k": _or(_number(body, "top_k", integer=True), 40),
        "top_p": _or(_number(body, "top_p", high=1), 0.95),
        "min_p": _or(_number(body, "min_p", high=1), 0.05),
        "seed": None if seed in (None, -1) else seed,
        "stop": stop,
        "repeat_penalty": _number(body, "repeat_penalty"),
        "presence_penalty": _number(body, "presence_penalty", low=-2),
        "frequency_penalty": _number(body, "frequency_penalty", low=-2),
        "grammar": body.get("grammar"),
        "json_schema": body.get("json_schema"),
    }
    if body.get("keep_alive") is not None:
        try:
            fields["keep_alive"] = parse_keep_alive(body["keep_alive"])
        except ValueError as exc:
            raise _invalid("keep_alive", str(exc)) from None
    wanted = body.get("response_fields") or []
    if not isinstance(wanted, list) or not all(isinstance(f, str) for f in wanted):
        raise _invalid("response_fields", "must be a list of field names ('timings/prompt_n' for a nested one)")
    try:
        op = parse_operation({k: v for k, v in fields.items() if v is not None})
    except errors.InvalidOperation as exc:
        if exc.field == "max_tokens":
            exc.field = name
        raise _renamed(exc) from None
    assert isinstance(op, Infer)
    return _Call(op=op, model=model, stream=stream, to_the_context=to_the_end, fields=list(wanted))


# -- answers -----------------------------------------------------------------

_STOP_TYPES = {"eos": "eos", "max_tokens": "limit", "stop": "word"}


def _final(call: _Call, text: str, end: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's final ``/completion`` object."""
    tokens_in = int(end.get("tokens_in") or 0)
    tokens_out = int(end.get("tokens_out") or 0)
    prompt_ms = float(end.get("prefill_ms") or 0.0)
    predicted_ms = float(end.get("decode_ms") or 0.0)
    timings = {
        "prompt_n": tokens_in,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / tokens_in if tokens_in else 0.0,
        "prompt_per_second": tokens_in / (prompt_ms / 1000) if prompt_ms else 0.0,
        "predicted_n": tokens_out,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / tokens_out if tokens_out else 0.0,
        "predicted_per_second": float(end.get("tokens_per_s") or 0.0),
    }
    whole = {
        "index": 0,
        "content": text,
        "tokens": [],
        "id_slot": int(end.get("slot") or 0),
        "stop": True,
        "model": call.model,
        "tokens_predicted": tokens_out,
        "tokens_evaluated": tokens_in,
        "generation_settings": {
            "n_predict": -1 if call.to_the_context else call.op.max_tokens,
            "temperature": call.op.temperature,
            "top_k": call.op.top_k,
            "top_p": call.op.top_p,
            "min_p": call.op.min_p,
            "seed": call.op.seed if call.op.seed is not None else -1,
            "stop": call.op.stop,
        },
        "has_new_line": "\n" in text,
        "truncated": False,
        "stop_type": _STOP_TYPES.get(str(end.get("stop_reason")), "none"),
        "stopping_word": str(end.get("stop_sequence") or ""),
        "tokens_cached": tokens_in + tokens_out,
        "timings": timings,
    }
    return _picked(whole, call.fields)


def _picked(whole: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    """``response_fields``: only those fields (``a/b``: ``whole["a"]["b"]``, said as ``"a/b"``), as llama.cpp does."""
    if not paths:
        return whole
    out: dict[str, Any] = {}
    for path in paths:
        value: Any = whole
        for key in path.split("/"):
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            out[path] = value
    return out


def _chunk(value: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(value, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


async def _stream(
    state: QueenState, job: Job, call: _Call, first: tuple[str, Any], events: Events
) -> AsyncIterator[bytes]:
    try:
        parts: list[str] = []
        kind, data = first
        while kind == "token":
            parts.append(data)
            piece = {"index": 0, "content": data, "tokens": [], "stop": False, "id_slot": -1}
            yield _chunk({**piece, "tokens_predicted": len(parts), "tokens_evaluated": 0})
            kind, data = await anext(events)
        if data.get("status") == "completed":
            # As llama.cpp's: the text was in the chunks, the final one has none.
            final = _final(call, "".join(parts), data)
            yield _chunk({**final, "content": ""} if "content" in final else final)
        else:
            yield error_chunk(data)  # the failure is the last thing said
    finally:
        await release(state, job, events)


def _end_error(end: dict[str, Any], headers: dict[str, str]) -> JSONResponse:
    """A job that failed before its first token (the worker's refusal names Infer's field)."""
    error = end.get("error") or {}
    kind = str(error.get("kind") or end.get("status") or "internal")
    message = str(error.get("message") or f"the job ended {end.get('status')}")
    param = None
    if kind == "invalid_operation":
        named = FIELD_PREFIX.match(message)
        if named is not None:
            renamed = _renamed(errors.InvalidOperation(message, field=named.group(1)))
            message, param = renamed.message, renamed.field
    return error_response(message, status=status_of(kind), code=kind, param=param, headers=headers)


async def _infill(request: Request) -> Response:
    state = _state(request)
    try:
        call = _parse(await json_body(request))
        if call.to_the_context:
            call = replace(call, op=await to_the_context(state, call.op, "input_prefix"))
        job = await state.jobs.submit(call.op)
    except errors.InvalidOperation as exc:
        return rbee_error_response(_renamed(exc))
    except errors.RbeeError as exc:
        return rbee_error_response(exc)
    with bound(job, actor="queen"):
        files = len(call.op.infill_files)
        narrate(
            "infill_request",
            f"Infill request for {call.model}: {len(call.op.prompt or '')} characters before, "
            f"{len(call.op.suffix or '')} after, {files} other file(s){' (streaming)' if call.stream else ''}",
            path=_PATH,
            stream=call.stream,
            files=files,
        )
    headers = {JOB_ID_HEADER: job.id}
    events = job_events(job)
    first: Any
    try:
        work = anext(events) if call.stream else collect(events)
        present, first = await unless_disconnected(request, work)
    except BaseException:
        await release(state, job, events)
        raise
    if not present or first is None:
        await release(state, job, events)
        return Response(status_code=_CLIENT_GONE, headers=headers)
    if not call.stream:
        await release(state, job, events)
        text, end = first
        if end.get("status") != "completed":
            return _end_error(end, headers)
        return JSONResponse(_final(call, text, end), headers=headers)
    kind, data = first
    if kind == "end" and data.get("status") != "completed":
        await release(state, job, events)
        return _end_error(data, headers)
    return EventStream(
        _stream(state, job, call, first, events),
        ping_s=state.settings.ping_interval_s,
        headers=headers,
        background=BackgroundTask(release, state, job, events),
    )


_FILE = {
    "type": "object",
    "required": ["text"],
    "properties": {"filename": {"type": "string"}, "text": {"type": "string"}},
}
_BODY = {
    "type": "object",
    "properties": {
        "model": {"type": "string", "minLength": 1, "description": f"default: {DEFAULT_MODEL}"},
        "input_prefix": {"type": "string"},
        "input_suffix": {"type": "string"},
        "input_extra": {"type": "array", "items": _FILE},
        "prompt": {"type": "string", "description": "the start of the middle, put after input_prefix"},
        "n_predict": {"type": "integer", "description": "-1: to the end of the context"},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "stream": {"type": "boolean"},
        "stop": {"type": "array", "items": {"type": "string"}},
    },
}


def infill_router() -> APIRouter:
    router = APIRouter(tags=["llama.cpp"])

    @router.post(
        _PATH,
        summary="Fill in the middle (llama.cpp server's /infill), for models with FIM tokens",
        response_model=None,
        responses={200: {"content": {"text/event-stream": {}}}, **COMPLETION_ERRORS},
        openapi_extra=_body_schema(_BODY),
    )
    async def infill(request: Request) -> Response:
        return await _infill(request)

    return router
