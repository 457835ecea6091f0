"""The HTTP edge shared by every server.

One place maps :class:`~rbee.errors.RbeeError` to statuses; request validation
errors become ``422`` naming the field and the reason; bodies over 1 MiB are
refused with ``413``; when the server has a token every endpoint but
``/health`` requires ``Authorization: Bearer``, compared in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rbee.errors import InvalidOperation, PayloadTooLarge, QueueFull, RbeeError

__all__ = ["install_edge", "error_body", "BodyLimit", "BearerAuth", "MAX_BODY_BYTES"]

MAX_BODY_BYTES = 1 << 20


def error_body(exc: RbeeError) -> dict[str, Any]:
    body: dict[str, Any] = {"error": {"kind": exc.kind, "message": exc.message}}
    if isinstance(exc, InvalidOperation):
        body["error"]["field"] = exc.field
        if "problems" in exc.data:
            body["error"]["problems"] = exc.data["problems"]
    return body


async def _rbee_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RbeeError)
    headers = {}
    if isinstance(exc, QueueFull):
        headers["Retry-After"] = str(exc.retry_after_s)
    return JSONResponse(error_body(exc), status_code=exc.status_code, headers=headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
        reason = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        problems.append({"field": ".".join(loc) or "request", "reason": reason})
    first = problems[0] if problems else {"field": "request", "reason": "invalid"}
    message = "; ".join(f"{p['field']}: {p['reason']}" for p in problems)
    return JSONResponse(
        {"error": {"kind": "invalid_request", "message": message, "field": first["field"], "problems": problems}},
        status_code=422,
    )


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, streamed or not."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    await _send_json(send, 413, error_body(PayloadTooLarge(f"the body is over {self.limit} bytes")))
                    return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise PayloadTooLarge(f"the body is over {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


class BearerAuth:
    """Require ``Authorization: Bearer <token>`` on everything but ``/health``.

    ``public`` names further paths a ``GET`` (or ``HEAD``) reaches without the
    token; an entry ending in ``*`` is a prefix. The queen's web page uses it
    for its static shell, which a browser navigation must load before the page
    can ask for the token (a navigation cannot send the header).
    """

    def __init__(self, app: ASGIApp, token: str | None, public: Iterable[str] = ()) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode() if token else None
        self.public = frozenset(p for p in public if not p.endswith("*"))
        self.public_prefixes = tuple(p[:-1] for p in public if p.endswith("*"))

    def _is_public(self, scope: Scope) -> bool:
        path = scope["path"]
        if path == "/health":
            return True
        if scope["type"] != "http" or scope.get("method") not in ("GET", "HEAD"):
            return False
        return path in self.public or (bool(self.public_prefixes) and path.startswith(self.public_prefixes))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is None or scope["type"] not in ("http", "websocket") or self._is_public(scope):
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                given = value.strip()
                break
        if not hmac.compare_digest(given, self.expected):
            message = "a valid bearer token is required (Authorization: Bearer ...)"
            if _is_openai_path(scope["path"]):
                # OpenAI clients read their own error shape.
                body = {"error": {"message": message, "type": "invalid_request_error", "param": None}}
                body["error"]["code"] = "invalid_api_key"
                await _send_json(send, 401, body, extra_headers=[(b"www-authenticate", b"Bearer")])
                return
            await _send_json(
                send,
                401,
                error_body(RbeeError(message)) | {},
                extra_headers=[(b"www-authenticate", b"Bearer")],
                kind="unauthorized",
            )
            return
        await self.app(scope, receive, send)


def _is_openai_path(path: str) -> bool:
    return path in ("/v1/completions", "/v1/chat/completions", "/v1/models") or path.startswith("/v1/models/")


async def _send_json(
    send: Send,
    status: int,
    body: dict[str, Any],
    *,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
    kind: str | None = None,
) -> None:
    import json

    if kind is not None:
        body["error"]["kind"] = kind
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": payload})


def install_edge(
    app: FastAPI, *, token: str | None = None, max_body: int = MAX_BODY_BYTES, public: Iterable[str] = ()
) -> None:
    """Error mapping, body limit and auth for one server (``public``: see :class:`BearerAuth`)."""
    app.add_exception_handler(RbeeError, _rbee_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(BodyLimit, limit=max_body)
    app.add_middleware(BearerAuth, token=token, public=tuple(public))
