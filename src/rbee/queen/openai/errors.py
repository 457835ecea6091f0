"""The one mapping from rbee's errors (raised, or a job's ``end``) to OpenAI's error answers
(the object itself: :func:`rbee.server.errors.openai_error_body`)."""

from __future__ import annotations

import re
from typing import Any

from fastapi.responses import JSONResponse

from rbee import errors
from rbee.queen.openai.schema import Call
from rbee.queen.translate import dumps
from rbee.server.errors import openai_error_body

__all__ = [
    "FIELD_PREFIX",
    "STATUS_BY_KIND",
    "end_error_response",
    "error_chunk",
    "error_response",
    "openai_error_body",
    "param_name",
    "rbee_error_response",
    "status_of",
]

STATUS_BY_KIND: dict[str, int] = {
    cls.kind: cls.status_code
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, errors.RbeeError) and cls is not errors.RbeeError
}


def status_of(kind: str) -> int:
    status = STATUS_BY_KIND.get(kind, 500)
    # OpenAI answers bad input with 400; rbee's 422 means the same here.
    return 400 if status == 422 else status


def error_response(
    message: str, *, status: int, code: str | None, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(openai_error_body(message, status=status, code=code, param=param), status, headers=headers)


def rbee_error_response(
    exc: errors.RbeeError, headers: dict[str, str] | None = None, *, chat: bool | None = None
) -> JSONResponse:
    """``chat``: the error is a chat's (True) or a completion's (False), so a prompt that does not fit
    the context is OpenAI's ``context_length_exceeded`` about ``messages`` or ``prompt``."""
    status = 400 if exc.status_code == 422 else exc.status_code
    param = None
    code = str(exc.data.get("code") or exc.kind)
    if isinstance(exc, errors.InvalidOperation):
        param = exc.field if exc.data.get("code") == "unknown_parameter" else param_name(exc.field)
        if chat is not None and ("n_ctx" in exc.data or _over_context(exc.message)):
            code, param = _context_exceeded(exc.message, chat, param)
    elif isinstance(exc, errors.ModelNotFound):
        param = "model"
    else:
        param = exc.data.get("param")
    headers = dict(headers or {})
    if isinstance(exc, errors.QueueFull):
        headers["Retry-After"] = str(exc.retry_after_s)
    return error_response(exc.message, status=status, code=code, param=param, headers=headers)


#: How the queen's and the worker's refusals of an input too long for the context begin or say it.
_OVER_CONTEXT = re.compile(r"exceed the context|does not fit the context|a slot holds|the context holds")


def _over_context(message: str) -> bool:
    return _OVER_CONTEXT.search(message) is not None


def _context_exceeded(message: str, chat: bool, param: str | None) -> tuple[str, str | None]:
    """OpenAI's code and param for an input too long: the prompt's field, or ``max_tokens`` when it alone is."""
    if "does not fit the context" in message and param in ("max_tokens", "max_completion_tokens", "n_predict"):
        return "context_length_exceeded", param
    return "context_length_exceeded", "messages" if chat else "prompt"


def end_error_response(end: dict[str, Any], headers: dict[str, str], call: Call | None = None) -> JSONResponse:
    """The answer for a job that ended unsuccessfully before its first token."""
    error = end.get("error") or {}
    kind = str(error.get("kind") or end.get("status") or "internal")
    message = str(error.get("message") or f"the job ended {end.get('status')}")
    status = status_of(kind)
    if kind == "queue_full":
        headers = {**headers, "Retry-After": "2"}
    param = None
    code = kind
    if kind == "invalid_operation":
        # The worker's refusals start with the field they are about ("logit_bias: ...").
        named = FIELD_PREFIX.match(message)
        if named is not None:
            param = named.group(1)
            if param in ("json_schema", "grammar") and call is not None and call.constrained_by:
                param = call.constrained_by
        if call is not None and _over_context(message):
            code, param = _context_exceeded(message, call.chat, param)
    return error_response(message, status=status, code=code, param=param, headers=headers)


FIELD_PREFIX = re.compile(r"([a-z_]+): ")


def param_name(field: str | None) -> str | None:
    """``messages.0.content`` (pydantic) -> ``messages[0].content`` (OpenAI)."""
    if not field or field == "operation":
        return None
    parts = field.split(".")
    out = parts[0]
    for part in parts[1:]:
        out += f"[{part}]" if part.isdigit() else f".{part}"
    return out


def error_chunk(end: dict[str, Any]) -> bytes:
    error = end.get("error") or {}
    kind = str(error.get("kind") or end.get("status") or "internal")
    message = str(error.get("message") or f"the job ended {end.get('status')}")
    body = openai_error_body(message, status=status_of(kind), code=kind)
    return f"data: {dumps(body)}\n\n".encode()
