"""Hives that join with an invite: one-time invites, each hive's own credentials, and revoking them.

```
queen's machine: rbee hive invite ─POST /v1/hives/invites (admin)─▶ a code, valid 15 min, stored hashed
other machine:   rbee hive join INVITE ─POST /v1/hives/join {invite, hive_id}─▶ the hive's own token
                 rbee-hive --token <it> ─heartbeats─▶ queen ─its calls to that hive carry the same token
queen's machine: rbee hive remove NAME ─DELETE /v1/hives/NAME/credentials (admin)─▶ the next heartbeat: 401
```

* An invite is a random code; the queen keeps only its SHA-256, its expiry and
  whether it was used (``$RBEE_HOME/hives.sqlite``). Exchanging it is one
  conditional ``UPDATE``, so two joins racing with one code cannot both win.
* A hive's token is ``HMAC(key, hive_id, salt)`` with a key kept in
  ``$RBEE_HOME/hive-credentials.key`` (mode 0600): the database holds no secret,
  and the queen can present the token to the hive when it calls it.
* :class:`HiveGate` sits in front of the bearer check. A hive's token reaches
  ``POST /v1/hives/heartbeat`` only, and only for its own ``hive_id``; there it
  counts as the admin token did for hives before. Everything else it asks for is
  ``403``; a revoked one is ``401``. ``POST /v1/hives/join`` needs no token: the
  invite is the credential.
* The queen's calls to a joined hive (its HTTP pool, both the httpx client and
  the plain HTTP/1.1 pool) carry that hive's token instead of the admin token,
  so the admin token never reaches a joined machine.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rbee import errors
from rbee.config import rbee_home
from rbee.http import MAX_BODY_BYTES, VOUCHED, BearerAuth, Principal, error_body, is_admin, token_id
from rbee.narration import narrate
from rbee.queen.settings import QueenSettings

__all__ = [
    "HiveCredentials",
    "HiveGate",
    "INVITE_TTL_S",
    "JOIN_PATH",
    "TOKEN_PREFIX",
    "invites_router",
    "mount_invites",
]

INVITE_TTL_S = 15 * 60.0
JOIN_PATH = "/v1/hives/join"
HEARTBEAT_PATH = "/v1/hives/heartbeat"
#: Every hive token starts so: the gate looks only at these.
TOKEN_PREFIX = "rbh_"
_HIVE_ID = r"^[A-Za-z0-9._:-]{1,128}$"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS invites (
    code_hash TEXT PRIMARY KEY, created_at REAL NOT NULL, expires_at REAL NOT NULL,
    used_at REAL, hive_id TEXT
);
CREATE TABLE IF NOT EXISTS hive_credentials (
    hive_id TEXT NOT NULL, salt TEXT NOT NULL, token_hash TEXT NOT NULL UNIQUE,
    joined_at REAL NOT NULL, revoked_at REAL
);
"""


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _private_file(path: Path, content: bytes | None = None) -> bytes:
    """Read ``path``, creating it with mode 0600 and ``content`` first when it does not exist."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if content is not None:
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(content)
    return path.read_bytes()


class HiveCredentials:
    """Invites and joined hives' credentials, in ``home``; the live lookups are kept in memory."""

    def __init__(self, home: Path) -> None:
        self._key = _private_file(home / "hive-credentials.key", secrets.token_bytes(32))
        db = home / "hives.sqlite"
        with contextlib.suppress(FileExistsError):
            os.close(os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        self._db = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        self._db.executescript(_SCHEMA)
        self._active: dict[str, str] = {}  # token hash -> hive id
        self._revoked: set[str] = set()
        self._tokens: dict[str, str] = {}  # hive id -> its token, for the queen's calls to it
        for hive_id, salt, token_hash, revoked_at in self._db.execute(
            "SELECT hive_id, salt, token_hash, revoked_at FROM hive_credentials"
        ):
            if revoked_at is None:
                self._active[token_hash] = hive_id
                self._tokens[hive_id] = self._token(hive_id, salt)
            else:
                self._revoked.add(token_hash)

    def close(self) -> None:
        self._db.close()

    def _token(self, hive_id: str, salt: str) -> str:
        mac = hmac.new(self._key, f"{hive_id}\0{salt}".encode(), hashlib.sha256).digest()
        return TOKEN_PREFIX + base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def invite(self, ttl_s: float = INVITE_TTL_S) -> tuple[str, float]:
        """A new one-time code and when it expires (seconds since the epoch)."""
        code = secrets.token_urlsafe(18)
        now = time.time()
        self._db.execute("DELETE FROM invites WHERE expires_at < ?", (now - 86_400,))
        self._db.execute(
            "INSERT INTO invites (code_hash, created_at, expires_at) VALUES (?, ?, ?)",
            (_sha256(code), now, now + ttl_s),
        )
        return code, now + ttl_s

    def join(self, code: str, hive_id: str) -> str:
        """Spend ``code`` for ``hive_id``'s own token; refused when the code is unknown, spent or expired."""
        if hive_id in self._tokens:
            raise errors.JobConflict(
                f"a hive named {hive_id!r} has joined already; remove it on the queen's machine"
                f" (rbee hive remove {hive_id}) or join under another name (--hive-id)"
            )
        now, code_hash = time.time(), _sha256(code)
        spent = self._db.execute(
            "UPDATE invites SET used_at = ?, hive_id = ? WHERE code_hash = ? AND used_at IS NULL AND expires_at > ?",
            (now, hive_id, code_hash, now),
        )
        if spent.rowcount != 1:
            row = self._db.execute(
                "SELECT used_at, expires_at FROM invites WHERE code_hash = ?", (code_hash,)
            ).fetchone()
            if row is None:
                raise errors.Forbidden("the invite is not valid here (mistyped, or from another queen)")
            if row[0] is not None:
                raise errors.Forbidden("the invite was used already; make a new one with `rbee hive invite`")
            raise errors.Forbidden(
                f"the invite expired {time.strftime('%H:%M:%S', time.localtime(row[1]))};"
                " make a new one with `rbee hive invite`"
            )
        salt = secrets.token_hex(16)
        token = self._token(hive_id, salt)
        self._db.execute(
            "INSERT INTO hive_credentials (hive_id, salt, token_hash, joined_at) VALUES (?, ?, ?, ?)",
            (hive_id, salt, _sha256(token), now),
        )
        self._active[_sha256(token)] = hive_id
        self._tokens[hive_id] = token
        return token

    def revoke(self, hive_id: str) -> bool:
        """Revoke ``hive_id``'s credentials; False when it has none."""
        token = self._tokens.pop(hive_id, None)
        if token is None:
            return False
        self._db.execute(
            "UPDATE hive_credentials SET revoked_at = ? WHERE hive_id = ? AND revoked_at IS NULL",
            (time.time(), hive_id),
        )
        token_hash = _sha256(token)
        self._active.pop(token_hash, None)
        self._revoked.add(token_hash)
        return True

    def hive_for(self, token: str) -> str | None:
        """The hive whose live token this is."""
        return self._active.get(_sha256(token))

    def was_revoked(self, token: str) -> bool:
        return _sha256(token) in self._revoked

    def token_of(self, hive_id: str) -> str | None:
        return self._tokens.get(hive_id)

    def joined(self) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT hive_id, joined_at, revoked_at FROM hive_credentials ORDER BY joined_at"
        ).fetchall()
        return [{"hive_id": h, "joined_at": j, "revoked_at": r} for h, j, r in rows]


# -- the edge -----------------------------------------------------------------------


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").strip().partition(" ")
            return credentials.strip() if scheme.lower() == "bearer" else None
    return None


async def _answer(scope: Scope, receive: Receive, send: Send, refused: errors.RbeeError) -> None:
    headers = {"www-authenticate": "Bearer"} if refused.status_code == 401 else None
    await JSONResponse(error_body(refused), status_code=refused.status_code, headers=headers)(scope, receive, send)


class HiveGate:
    """In front of the bearer check: the join path needs no token; a hive's token only sends its own heartbeats."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        credentials: HiveCredentials | None = None
        if scope["type"] == "http":
            credentials = getattr(scope["app"].state, "hive_credentials", None)
        if credentials is None:
            await self.app(scope, receive, send)
            return
        if scope["path"] == JOIN_PATH:
            await self.app({**scope, VOUCHED: Principal("invitee", admin=False)}, receive, send)
            return
        token = _bearer(scope)
        if token is None or not token.startswith(TOKEN_PREFIX):
            await self.app(scope, receive, send)
            return
        hive_id = credentials.hive_for(token)
        if hive_id is None:
            if credentials.was_revoked(token):
                refused: errors.RbeeError = errors.Unauthorized(
                    "this hive's credentials were revoked (rbee hive remove); join again with a new invite"
                )
                await _answer(scope, receive, send, refused)
            else:
                await self.app(scope, receive, send)  # the bearer check refuses it
            return
        if scope["path"] != HEARTBEAT_PATH or scope.get("method") != "POST":
            await _answer(scope, receive, send, errors.Forbidden("a hive's credentials only send its heartbeats"))
            return
        body, too_large = await _read_body(receive)
        if too_large:
            await _answer(scope, receive, send, errors.PayloadTooLarge(f"the body is over {MAX_BODY_BYTES} bytes"))
            return
        try:
            claimed = json.loads(body).get("hive_id")
        except (ValueError, AttributeError):
            claimed = None
        if claimed is not None and claimed != hive_id:
            refusal = errors.Forbidden(
                f"these credentials are hive {hive_id}'s; they cannot send heartbeats as {claimed}"
            )
            await _answer(scope, receive, send, refusal)
            return
        await self.app({**scope, VOUCHED: Principal(token_id(token), admin=True)}, _replay(body), send)


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"", False
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return b"", True
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), False


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


# -- the queen's calls to joined hives -----------------------------------------------


def _origin(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return (parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))


class _HiveTokens:
    """Which token the queen presents at an address: a joined hive's own, else what the caller set.

    The hive's own address gets the hive's token. So does one of its workers' addresses when the
    caller would send the admin token there (a worker it reported without a token of its own):
    whatever a joined machine reports, the admin token never goes to it.
    """

    def __init__(self, credentials: HiveCredentials, hives: Callable[[], list[Any]], admin: str | None) -> None:
        self.credentials = credentials
        self.hives = hives
        self.admin = f"Bearer {admin}" if admin else None

    def token_at(self, host: str, port: int, authorization: str | None = None) -> str | None:
        at = (host, port)
        for hive in self.hives():
            token = self.credentials.token_of(hive.hive_id)
            if token is None:
                continue
            if _origin(hive.url) == at:
                return token
            ours = authorization is not None and authorization == self.admin
            if ours and any(w.report.url and _origin(w.report.url) == at for w in hive.workers.values()):
                return token
        return None

    def sign(self, key: tuple[str, int], headers: dict[str, str]) -> dict[str, str]:
        given = next((v for k, v in headers.items() if k.lower() == "authorization"), None)
        token = self.token_at(*key, given)
        if token is None:
            return headers
        kept = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        return {**kept, "Authorization": f"Bearer {token}"}

    async def on_request(self, request: httpx.Request) -> None:
        port = request.url.port or (443 if request.url.scheme == "https" else 80)
        token = self.token_at(request.url.host, port, request.headers.get("authorization"))
        if token is not None:
            request.headers["Authorization"] = f"Bearer {token}"


class _SignedPool:
    """The queen's plain HTTP/1.1 pool, presenting each joined hive's own token to it."""

    def __init__(self, pool: Any, tokens: _HiveTokens) -> None:
        self._pool = pool
        self._tokens = tokens

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    async def request(
        self, key: tuple[str, int], method: str, target: str, headers: dict[str, str], *a: Any, **kw: Any
    ) -> Any:
        return await self._pool.request(key, method, target, self._tokens.sign(key, headers), *a, **kw)

    def stream(
        self, key: tuple[str, int], method: str, target: str, headers: dict[str, str], *a: Any, **kw: Any
    ) -> Any:
        return self._pool.stream(key, method, target, self._tokens.sign(key, headers), *a, **kw)


def _present_hive_tokens(http: Any, tokens: _HiveTokens) -> Callable[[], None]:
    """Make the queen's HTTP client sign its calls to joined hives; returns the undo."""
    http.event_hooks = {**http.event_hooks, "request": [*http.event_hooks["request"], tokens.on_request]}
    pool = getattr(http, "http1", None)
    if pool is not None:
        http.http1 = _SignedPool(pool, tokens)

    def undo() -> None:
        if pool is not None:
            http.http1 = pool

    return undo


# -- the API -------------------------------------------------------------------------


class InviteBody(BaseModel):
    ttl_s: float = Field(default=INVITE_TTL_S, ge=1, le=7 * 86_400, description="How long the invite is valid.")


class JoinBody(BaseModel):
    invite: str = Field(min_length=1, max_length=200, description="The code `rbee hive invite` printed.")
    hive_id: str = Field(pattern=_HIVE_ID, description="The joining hive's name.")


def _credentials(request: Request) -> HiveCredentials:
    credentials: HiveCredentials = request.app.state.hive_credentials
    return credentials


def _admin_only(what: str) -> None:
    if not is_admin():
        raise errors.Forbidden(f"{what} needs the admin token")


def invites_router() -> APIRouter:
    router = APIRouter(tags=["cluster"])

    @router.post("/v1/hives/invites", status_code=201, summary="Make a one-time invite for a hive (admin token)")
    async def make_invite(request: Request, body: InviteBody) -> dict[str, Any]:
        _admin_only("making an invite")
        code, expires_at = _credentials(request).invite(body.ttl_s)
        narrate("hive_invited", f"Made an invite for a hive, valid for {body.ttl_s:g} s", expires_at=expires_at)
        return {"invite": code, "expires_at": expires_at, "ttl_s": body.ttl_s}

    @router.post(
        JOIN_PATH,
        summary="Exchange an invite for a hive's own credentials (no token: the invite is one)",
        responses={
            403: {"description": "the invite is unknown, used already or expired"},
            409: {"description": "a hive of that name has joined already, or is online"},
        },
    )
    async def join(request: Request, body: JoinBody) -> dict[str, Any]:
        credentials = _credentials(request)
        known = {h.hive_id: h for h in request.app.state.queen.telemetry.hives()}.get(body.hive_id)
        if known is not None and not known.gone and credentials.token_of(body.hive_id) is None:
            # A hive with the admin token has that name: its heartbeats and the newcomer's would mix.
            raise errors.JobConflict(f"a hive named {body.hive_id!r} is online already; join under another name")
        token = credentials.join(body.invite, body.hive_id)
        narrate("hive_joined", f"Hive {body.hive_id} joined with an invite", hive_id=body.hive_id)
        return {"hive_id": body.hive_id, "token": token, "heartbeat_path": HEARTBEAT_PATH}

    @router.get("/v1/hives/credentials", summary="The hives that joined with an invite (admin token)")
    async def joined(request: Request) -> dict[str, Any]:
        _admin_only("listing hives' credentials")
        return {"hives": _credentials(request).joined()}

    @router.delete(
        "/v1/hives/{hive_id}/credentials",
        summary="Revoke a joined hive's credentials (admin token)",
        responses={404: {"description": "no hive of that name joined with an invite"}},
    )
    async def remove(request: Request, hive_id: str) -> dict[str, Any]:
        _admin_only("removing a hive")
        if not _credentials(request).revoke(hive_id):
            raise errors.HiveNotFound(f"no hive {hive_id!r} joined with an invite", hive_id=hive_id)
        # Its workers leave scheduling now, not when its heartbeats are missed.
        telemetry = request.app.state.queen.telemetry
        was_online = telemetry._hives.pop(hive_id, None) is not None
        telemetry.notify()
        narrate("hive_removed", f"Hive {hive_id}'s credentials are revoked; it is no longer scheduled", hive_id=hive_id)
        return {"hive_id": hive_id, "revoked": True, "was_online": was_online}

    return router


def mount_invites(app: FastAPI, settings: QueenSettings) -> None:
    """Add joining to the queen's app: the routes, the gate in front of its bearer check, and the
    credentials store with the signing of its calls to joined hives (built in its lifespan)."""
    app.include_router(invites_router())
    at = next((i for i, m in enumerate(app.user_middleware) if m.cls is BearerAuth), None)  # type: ignore[comparison-overlap]
    if at is None:
        raise RuntimeError("mount_invites goes after install_edge: the gate sits in front of the bearer check")
    app.user_middleware.insert(at, Middleware(HiveGate))
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[Any]:
        async with inner(app) as value:
            credentials = HiveCredentials(settings.home or rbee_home())
            state = app.state.queen
            undo = _present_hive_tokens(state.http, _HiveTokens(credentials, state.telemetry.hives, settings.token))
            app.state.hive_credentials = credentials
            try:
                yield value
            finally:
                app.state.hive_credentials = None
                undo()
                credentials.close()

    app.router.lifespan_context = lifespan
