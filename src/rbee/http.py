"""The HTTP edge shared by every server.

One place maps :class:`~rbee.errors.RbeeError` to statuses; request validation
errors become ``422`` naming the field and the reason; bodies over 1 MiB are
refused with ``413``; when the server has a token every endpoint but
``/health`` requires ``Authorization: Bearer``, compared in constant time.

The edge's own refusals (401, 403, 404, 405, 413, 415) are answered in the error shape of
the API a path belongs to (:func:`api_family`): Anthropic's on ``/v1/messages*``,
Ollama's ``{"error": "..."}`` on ``/api/*``, OpenAI's on the OpenAI-compatible paths
(every ``/v1/`` path that is not rbee's own, and llama.cpp's ``/tokenize``,
``/detokenize``, ``/infill``), rbee's own everywhere else; each is made in one place
(:func:`edge_error_body`).

Every server refuses what a web page on another site could send it
(:class:`BrowserGuard`): a ``Host`` it does not serve (DNS rebinding), an
``Origin`` other than its own page's or a configured one, and a body that is
not ``application/json`` (a browser's "simple" cross-site POST).

A server may accept several tokens (the queen does). The first is the admin
token; the one a request presented is its :class:`Principal`, readable inside
the request (and inside every job it creates, through the job's copied
context) with :func:`current_principal`.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import ipaddress
import json
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rbee.errors import InvalidOperation, PayloadTooLarge, QueueFull, RbeeError
from rbee.server.errors import openai_error_body

__all__ = [
    "install_edge",
    "api_family",
    "edge_error_body",
    "anthropic_error_body",
    "error_body",
    "BodyLimit",
    "BearerAuth",
    "BrowserGuard",
    "MAX_BODY_BYTES",
    "Principal",
    "current_principal",
    "is_admin",
    "token_id",
    "VOUCHED",
]

MAX_BODY_BYTES = 1 << 20


@dataclass(frozen=True)
class Principal:
    """Who made a request: a token's fingerprint (never the token) and whether it is the admin token."""

    id: str
    admin: bool


#: The ASGI scope key under which an authenticator placed in front of :class:`BearerAuth`
#: leaves the :class:`Principal` it has checked (a scope is the server's, never the client's).
VOUCHED = "rbee.principal"

_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("rbee_principal", default=None)


def token_id(token: str) -> str:
    """A stable, non-reversible name for a token (what job records store as their owner)."""
    return "tok-" + hashlib.sha256(token.encode()).hexdigest()[:16]


def current_principal() -> Principal | None:
    """The caller of the current request; None when the server has no token."""
    return _principal.get()


def is_admin() -> bool:
    """True for the admin token, and for everyone on a server without a token."""
    principal = _principal.get()
    return principal is None or principal.admin


def error_body(exc: RbeeError) -> dict[str, Any]:
    body: dict[str, Any] = {"error": {"kind": exc.kind, "message": exc.message}}
    if isinstance(exc, InvalidOperation):
        body["error"]["field"] = exc.field
        if "problems" in exc.data:
            body["error"]["problems"] = exc.data["problems"]
    return body


#: Anthropic's error ``type`` for each status it answers (others: ``invalid_request_error``
#: below 500, ``api_error`` from 500).
_ANTHROPIC_ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_error_body(message: str, *, status: int) -> dict[str, Any]:
    """Anthropic's error object: ``{"type": "error", "error": {"type", "message"}}``."""
    kind = _ANTHROPIC_ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


async def _rbee_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RbeeError)
    if isinstance(exc, PayloadTooLarge):
        # The edge's own refusal (a streamed body over the limit, found while a handler read it).
        path = request.url.path
        body = edge_error_body(path, 413, exc.kind, exc.message, families=_families(request))
        return JSONResponse(body, status_code=413)
    headers = {}
    if isinstance(exc, QueueFull):
        headers["Retry-After"] = str(exc.retry_after_s)
    return JSONResponse(error_body(exc), status_code=exc.status_code, headers=headers)


def _families(request: Request) -> bool:
    """Whether the app answers each API's paths in that API's error shape (the queen does)."""
    return bool(getattr(request.app.state, "api_families", True))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """Routing's own answers (no such path, wrong method) in the error shape of the path's API."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
        # FastAPI's answer to a body that is not UTF-8 where a model is declared: bad input like any other.
        problem = {"field": "body", "reason": "not valid JSON (UTF-8)"}
        message = "body: not valid JSON (UTF-8)"
        error = {"kind": "invalid_request", "message": message, "field": "body", "problems": [problem]}
        return JSONResponse({"error": error}, status_code=422)
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = f"{request.method} {request.url.path}: {exc.detail}"
    body = edge_error_body(request.url.path, exc.status_code, kind, message, families=_families(request))
    return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


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

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES, families: bool = True) -> None:
        self.app = app
        self.families = families
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
                    message = f"the body is over {self.limit} bytes"
                    await _refuse(send, scope["path"], 413, "payload_too_large", message, families=self.families)
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

    ``x-api-key: <token>`` (what Anthropic's clients send) is accepted as the same token.

    ``token`` is one token or several; the first is the admin token. Every
    accepted token is compared in constant time, all of them on every request,
    so the time taken says nothing about which one (if any) came close.

    ``public`` names further paths a ``GET`` (or ``HEAD``) reaches without the
    token; an entry ending in ``*`` is a prefix. The queen's web page uses it
    for its static shell, which a browser navigation must load before the page
    can ask for the token (a navigation cannot send the header).
    """

    def __init__(
        self, app: ASGIApp, token: str | Sequence[str] | None, public: Iterable[str] = (), families: bool = True
    ) -> None:
        self.app = app
        self.families = families
        tokens = [token] if isinstance(token, str) else [t for t in (token or ()) if t]
        self.accepted = [(f"Bearer {t}".encode(), Principal(token_id(t), admin=(i == 0))) for i, t in enumerate(tokens)]
        self.expected = self.accepted[0][0] if self.accepted else None
        self.public = frozenset(p for p in public if not p.endswith("*"))
        self.public_prefixes = tuple(p[:-1] for p in public if p.endswith("*"))

    def _is_public(self, scope: Scope) -> bool:
        path = scope["path"]
        if path == "/health":
            return True
        if scope["type"] != "http" or scope.get("method") not in ("GET", "HEAD"):
            return False
        return path in self.public or (bool(self.public_prefixes) and path.startswith(self.public_prefixes))

    def _match(self, given: bytes) -> Principal | None:
        found = None
        for expected, principal in self.accepted:
            if hmac.compare_digest(given, expected) and found is None:
                found = principal
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        vouched = scope.get(VOUCHED)
        if isinstance(vouched, Principal):
            # An authenticator in front of this one (the queen's hive credentials) checked the caller.
            reset = _principal.set(vouched)
            try:
                await self.app(scope, receive, send)
            finally:
                _principal.reset(reset)
            return
        if self.expected is None or scope["type"] not in ("http", "websocket") or self._is_public(scope):
            await self.app(scope, receive, send)
            return
        given = b""
        api_key = None
        for name, value in scope.get("headers", ()):
            if name == b"authorization" and not given:
                # The scheme is case-insensitive (RFC 9110): "bearer x" is "Bearer x".
                scheme, _, credentials = value.strip().partition(b" ")
                given = b"Bearer " + credentials.strip() if scheme.lower() == b"bearer" else value.strip()
            elif name == b"x-api-key" and api_key is None:
                api_key = b"Bearer " + value.strip()  # Anthropic's clients send the token so
        principal = self._match(given)
        if principal is None and api_key is not None:
            principal = self._match(api_key)
        if principal is None:
            message = "a valid bearer token is required (Authorization: Bearer ...)"
            if self.families and api_family(scope["path"]) == "anthropic":
                message = "a valid API key is required (x-api-key: ..., or Authorization: Bearer ...)"
            challenge = [(b"www-authenticate", b"Bearer")]
            await _refuse(
                send, scope["path"], 401, "unauthorized", message, extra_headers=challenge, families=self.families
            )
            return
        reset = _principal.set(principal)
        try:
            await self.app(scope, receive, send)
        finally:
            _principal.reset(reset)


def _env_list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


def _host_name(value: str) -> str:
    """``Host`` without its port, lower case (``[::1]:80`` -> ``::1``)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class BrowserGuard:
    """What a web page on another site could make a browser send here is refused.

    * ``Host`` must be one this server serves: an IP address (a rebinding
      attack needs a name that resolves to one), ``localhost``, this machine's
      names, or one in ``allowed_hosts`` (``--allow-host``, ``RBEE_ALLOW_HOSTS``).
      Otherwise ``403``: a page that rebound its own name to 127.0.0.1 reads nothing.
    * An ``Origin`` header (browsers send it on cross-origin requests and on every
      POST) must be this server's own (``scheme://Host``) or one in
      ``allowed_origins`` (``--allow-origin``, ``RBEE_ALLOW_ORIGINS``); ``*`` allows
      any. Clients that are not browsers send none.
    * A request body must be ``Content-Type: application/json`` (``415``
      otherwise): a cross-site ``text/plain`` form POST needs no preflight, so it
      would reach the handler.

    Allowed origins get CORS answers (preflight included); others get none. A
    preflight allows the headers OpenAI's and Anthropic's browser SDKs send
    (:data:`_ALLOWED_HEADERS`, ``x-stainless-*``), and answers may expose the
    job's and the request's ids.
    ``/health`` is exempt from the host check, so probes by address always work.
    """

    def __init__(
        self,
        app: ASGIApp,
        allowed_hosts: Iterable[str] = (),
        allowed_origins: Iterable[str] = (),
        families: bool = True,
    ) -> None:
        self.app = app
        self.families = families
        # The host name only: getfqdn() would ask DNS, which can take seconds on a machine without it.
        names = {"localhost", socket.gethostname().lower()}
        self.hosts = frozenset(
            names | {h.lower() for h in allowed_hosts} | {h.lower() for h in _env_list("RBEE_ALLOW_HOSTS")}
        )
        origins = [*allowed_origins, *_env_list("RBEE_ALLOW_ORIGINS")]
        self.any_origin = "*" in origins
        self.origins = frozenset(o.rstrip("/").lower() for o in origins if o != "*")

    def _host_ok(self, host: str) -> bool:
        name = _host_name(host)
        return _is_ip(name) or name in self.hosts or name.endswith(".localhost")

    def _origin_ok(self, origin: str, host: str) -> bool:
        origin = origin.strip().lower().rstrip("/")
        if self.any_origin or origin in self.origins:
            return True
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.netloc == host.strip().lower()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope.get("headers", ())}
        host = headers.get("host", "")
        path = scope["path"]
        if path != "/health" and not self._host_ok(host):
            await _refuse(
                send,
                path,
                403,
                "forbidden",
                f"this server does not answer for the host {host!r}",
                families=self.families,
            )
            return
        origin = headers.get("origin")
        if origin is not None and not self._origin_ok(origin, host):
            await _refuse(
                send,
                path,
                403,
                "forbidden",
                f"requests from the web origin {origin!r} are not allowed",
                families=self.families,
            )
            return
        cors = [] if origin is None else [(b"access-control-allow-origin", origin.encode()), (b"vary", b"Origin")]
        if cors and scope.get("method") != "OPTIONS":
            cors.append((b"access-control-expose-headers", _EXPOSED_HEADERS))
        method = scope.get("method", "GET")
        if origin is not None and method == "OPTIONS" and "access-control-request-method" in headers:
            allow = [
                (b"access-control-allow-methods", b"GET, HEAD, POST, DELETE, OPTIONS"),
                (b"access-control-allow-headers", _allowed_headers(headers.get("access-control-request-headers", ""))),
                (b"access-control-max-age", b"600"),
            ]
            await send({"type": "http.response.start", "status": 204, "headers": cors + allow})
            await send({"type": "http.response.body", "body": b""})
            return
        if method in ("POST", "PUT", "PATCH") and _has_body(headers):
            kind = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if kind != "application/json":
                shown = kind or "none"
                message = f"the body must be application/json, not {shown}"
                await _refuse(send, path, 415, "unsupported_media_type", message, families=self.families)
                return
        if not cors:
            await self.app(scope, receive, send)
            return

        async def with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *cors]}
            await send(message)

        await self.app(scope, receive, with_cors)


#: The request headers a page of an allowed origin may send: rbee's own, and what the
#: browser builds of OpenAI's and Anthropic's SDKs send (``x-stainless-*``: any of them).
_ALLOWED_HEADERS = (
    "authorization",
    "content-type",
    "last-event-id",
    "x-api-key",
    "anthropic-version",
    "anthropic-beta",
    "anthropic-dangerous-direct-browser-access",
    "openai-beta",
    "openai-organization",
    "openai-project",
    "idempotency-key",
    "x-request-id",
)
_ALLOWED_PREFIXES = ("x-stainless-",)
#: The response headers a page of an allowed origin may read (the job's id, the request's id, when to retry).
_EXPOSED_HEADERS = b"x-rbee-job-id, x-request-id, request-id, retry-after"


def _allowed_headers(requested: str) -> bytes:
    """``Access-Control-Allow-Headers`` for a preflight: the fixed list, and those it asked for by a prefix."""
    names = list(_ALLOWED_HEADERS)
    for name in requested.lower().split(","):
        name = name.strip()
        if name.startswith(_ALLOWED_PREFIXES) and name not in names and name.replace("-", "").isalnum():
            names.append(name)
    return ", ".join(names).encode()


def _has_body(headers: dict[str, str]) -> bool:
    length = headers.get("content-length")
    if length is not None:
        return length.strip() not in ("", "0")
    return "transfer-encoding" in headers


#: The APIs whose error shapes the edge speaks: rbee's own, OpenAI's, Anthropic's, Ollama's.
Family = Literal["rbee", "openai", "anthropic", "ollama"]

#: The ``/v1/`` paths of rbee's own APIs (jobs, cluster, hives, workers), whose errors keep rbee's shape.
_RBEE_V1 = ("jobs", "cluster", "hives", "info", "ready", "tokens", "workers")
#: llama.cpp server's paths (tokenizer, fill in the middle): its errors are OpenAI's shape.
_LLAMA_CPP_PATHS = ("/tokenize", "/detokenize", "/infill")


def api_family(path: str) -> Family:
    """The API ``path`` belongs to, whose error shape its refusals take.

    ``/v1/messages`` and below: Anthropic's; ``/api`` and below: Ollama's; any other
    ``/v1/`` path that is not rbee's own (OpenAI's, and those OpenAI's clients may try)
    and llama.cpp's ``/tokenize``, ``/detokenize``, ``/infill``: OpenAI's; else rbee's.
    """
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return "anthropic"
    if path == "/api" or path.startswith("/api/"):
        return "ollama"
    if path in _LLAMA_CPP_PATHS:
        return "openai"
    if path.startswith("/v1/") and path[4:].split("/", 1)[0] not in _RBEE_V1:
        return "openai"
    return "rbee"


#: OpenAI's ``code`` for an edge refusal, where it has its own word (else rbee's kind).
_OPENAI_CODES = {"unauthorized": "invalid_api_key"}


def edge_error_body(path: str, status: int, kind: str, message: str, *, families: bool = True) -> dict[str, Any]:
    """An edge refusal (``kind``: rbee's word for it) in the error shape of ``path``'s API
    (``families`` False: a server that speaks only rbee's own, as hives and workers do)."""
    family = api_family(path) if families else "rbee"
    if family == "anthropic":
        return anthropic_error_body(message, status=status)
    if family == "ollama":
        return {"error": message}
    if family == "openai":
        return openai_error_body(message, status=status, code=_OPENAI_CODES.get(kind, kind))
    return {"error": {"kind": kind, "message": message}}


async def _refuse(
    send: Send,
    path: str,
    status: int,
    kind: str,
    message: str,
    *,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
    families: bool = True,
) -> None:
    body = edge_error_body(path, status, kind, message, families=families)
    await _send_json(send, status, body, extra_headers=extra_headers)


async def _send_json(
    send: Send, status: int, body: dict[str, Any], *, extra_headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": payload})


def install_edge(
    app: FastAPI,
    *,
    token: str | Sequence[str] | None = None,
    max_body: int = MAX_BODY_BYTES,
    public: Iterable[str] = (),
    allowed_hosts: Iterable[str] = (),
    allowed_origins: Iterable[str] = (),
    api_families: bool = True,
) -> None:
    """Error mapping, body limit, browser guard and auth for one server.

    ``token``, ``public``: see :class:`BearerAuth`; ``allowed_hosts``, ``allowed_origins``:
    see :class:`BrowserGuard`; ``api_families``: each API's paths answer in that API's
    error shape (:func:`api_family`); off, every path answers in rbee's (a hive's or a
    worker's API, whose one client is the queen).
    """
    app.state.api_families = api_families
    app.add_exception_handler(RbeeError, _rbee_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(BodyLimit, limit=max_body, families=api_families)
    app.add_middleware(BearerAuth, token=token, public=tuple(public), families=api_families)
    # Added last, so it runs first: a refused page never reaches auth or a handler.
    app.add_middleware(
        BrowserGuard,
        allowed_hosts=tuple(allowed_hosts),
        allowed_origins=tuple(allowed_origins),
        families=api_families,
    )
    _document_errors(app, auth=bool(token), public=tuple(public), families=api_families)


#: The one error shape every server answers with (OpenAPI component ``Error``).
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["kind", "message"],
            "properties": {
                "kind": {"type": "string"},
                "message": {"type": "string"},
                "field": {"type": ["string", "null"]},
                "problems": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"field": {"type": "string"}, "reason": {"type": "string"}},
                    },
                },
            },
        }
    },
}

#: OpenAI's error object, which the OpenAI-compatible endpoints answer with instead.
OPENAI_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

#: Anthropic's error object, which the Anthropic-compatible endpoints (``/v1/messages``) answer with.
ANTHROPIC_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        },
    },
}

#: Ollama's error object, which the Ollama-compatible endpoints (``/api/*``) answer with.
OLLAMA_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
}

_EDGE_ERRORS = {
    "401": "A valid bearer token is required",
    "413": "The request body is over the limit",
    "422": "Invalid input: the field and the reason",
    "403": "Forbidden (also: a Host or a web Origin this server does not serve)",
    "415": "The body is not application/json",
}


def _edge_shaped(response: dict[str, Any]) -> bool:
    """An error response whose body is the edge's error shape: all but those a route
    declared a body of its own for (a refused cancel answers with the job's record)."""
    declared = response.get("content", {}).get("application/json", {}).get("schema")
    return declared is None or str(declared.get("$ref", "")).endswith("/HTTPValidationError")


def _document_errors(app: FastAPI, *, auth: bool, public: tuple[str, ...], families: bool = True) -> None:
    """Make the OpenAPI schema say what the edge really answers.

    Every error is in the shape of its path's API (:func:`api_family`): rbee's own
    is ``{"error": {"kind", "message", ...}}`` (FastAPI's default 422 shape is never
    sent). 401 is documented wherever a token is checked, 413 and 415 wherever a
    body is taken, 403 everywhere but ``/health`` (:class:`BrowserGuard`).
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["Error"] = ERROR_SCHEMA
        components["OpenAIError"] = OPENAI_ERROR_SCHEMA
        components["AnthropicError"] = ANTHROPIC_ERROR_SCHEMA
        components["OllamaError"] = OLLAMA_ERROR_SCHEMA
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        for item in schema.get("paths", {}).values():
            for operation in item.values():
                if isinstance(operation, dict):
                    body = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
                    components.update(body.get("schema", {}).pop("$defs", {}))
        rbee_error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
        openai_error = {"application/json": {"schema": {"$ref": "#/components/schemas/OpenAIError"}}}
        anthropic_error = {"application/json": {"schema": {"$ref": "#/components/schemas/AnthropicError"}}}
        ollama_error = {"application/json": {"schema": {"$ref": "#/components/schemas/OllamaError"}}}
        errors_by_family = {
            "rbee": rbee_error,
            "openai": openai_error,
            "anthropic": anthropic_error,
            "ollama": ollama_error,
        }
        open_paths = {"/health", *(p for p in public if not p.endswith("*"))}
        for path, item in schema.get("paths", {}).items():
            for method, operation in item.items():
                if not isinstance(operation, dict) or "responses" not in operation:
                    continue
                responses = operation["responses"]
                wanted = {"422"} if operation.get("parameters") or "requestBody" in operation else set()
                if "requestBody" in operation:
                    wanted |= {"413", "415"}
                if path != "/health":
                    wanted.add("403")  # BrowserGuard
                if auth and not (path in open_paths and method in ("get", "head")):
                    wanted.add("401")
                for status in wanted:
                    responses.setdefault(status, {"description": _EDGE_ERRORS[status]})
                content = errors_by_family[api_family(path) if families else "rbee"]
                for status, response in responses.items():
                    if status[:1] in ("4", "5") and _edge_shaped(response):
                        response["content"] = content
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
