"""The queen's ASGI app: its routes, its middleware, and the lifespan that builds its parts (rbee.queen.state)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from rbee import __version__, errors
from rbee.contracts.cluster import Heartbeat
from rbee.contracts.operations import Operation
from rbee.errors import RbeeError
from rbee.http import error_body, install_edge, is_admin
from rbee.jobs.api import job_router
from rbee.narration import narrate
from rbee.queen.anthropic import anthropic_router
from rbee.queen.infill import infill_router
from rbee.queen.invites import mount_invites
from rbee.queen.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from rbee.queen.ollama import ollama_router
from rbee.queen.openai import openai_router
from rbee.queen.responses import responses_router
from rbee.queen.settings import QueenSettings
from rbee.queen.state import QueenState
from rbee.queen.tokens import tokens_router
from rbee.queen.web import PUBLIC_PATHS, web_router

__all__ = ["QueenSettings", "create_queen_app", "ADMIN_PATHS"]


#: Paths only the admin token reaches: heartbeats (a fake hive would receive
#: other people's prompts) and the web page's feed (every job, every prompt).
ADMIN_PATHS = frozenset({"/v1/hives/heartbeat", "/v1/cluster/events"})
_JOB_PATH = re.compile(r"^/v1/jobs/([^/]+)(?:/stream)?/?$")


class _Ownership:
    """With several tokens, a job is visible, streamable and cancellable only with the token that created it.

    Another token's job answers 404, as if it did not exist; the admin token
    sees every job. Without tokens, everyone is the admin.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_admin():
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        refused: RbeeError | None = None
        if path in ADMIN_PATHS:
            refused = errors.Forbidden(f"{path} needs the admin token")
        else:
            match = _JOB_PATH.match(path)
            state: QueenState | None = getattr(scope["app"].state, "queen", None)
            if match and state is not None and not state.visible(match.group(1)):
                refused = errors.JobNotFound(f"no job {match.group(1)!r}", job_id=match.group(1))
        if refused is None:
            await self.app(scope, receive, send)
            return
        response = JSONResponse(error_body(refused), status_code=refused.status_code)
        await response(scope, receive, send)


def create_queen_app(settings: QueenSettings | None = None) -> FastAPI:
    settings = settings or QueenSettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = QueenState(settings)
        app.state.queen = state
        if state.interrupted:
            narrate("queen_restarted", f"Marked {state.interrupted} interrupted job(s) failed (queen_restarted)")
        sweeper = asyncio.create_task(state.sweep_forever(), name="queen:sweeper")
        try:
            if settings.local_hive:
                from rbee.hive.embedded import EmbeddedHive

                state.local_hive = EmbeddedHive(
                    queen_url=settings.url,
                    token=settings.token,
                    port=settings.local_hive_port,
                    home=settings.home,
                    options=settings.hive_options,
                    deliver=lambda beat: state.telemetry.heartbeat(beat),
                )
                await state.local_hive.start()
            yield
        finally:
            sweeper.cancel()
            await asyncio.gather(sweeper, return_exceptions=True)
            await state.aclose()

    app = FastAPI(title="queen-rbee", version=__version__, lifespan=lifespan)
    # Added before the edge, so it runs inside the bearer check and knows the caller.
    app.add_middleware(_Ownership)
    tokens = [t for t in (settings.token, *settings.user_tokens) if t]
    install_edge(app, token=tokens or None, public=PUBLIC_PATHS)
    mount_invites(app, settings)  # joining hives: its routes, and its gate in front of the bearer check

    def queen(request: Request) -> QueenState:
        state: QueenState = request.app.state.queen
        return state

    app.include_router(job_router(lambda request: queen(request).jobs, Operation))
    app.include_router(openai_router())
    app.include_router(responses_router())
    app.include_router(ollama_router())
    app.include_router(anthropic_router())
    app.include_router(tokens_router())
    app.include_router(infill_router())
    app.include_router(web_router(lambda request: queen(request).page))

    @app.get("/metrics", tags=["meta"], response_class=Response)
    async def metrics(request: Request) -> Response:
        return Response(queen(request).metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/health", tags=["meta"])
    async def health() -> dict[str, Any]:
        return {"status": "ok", "component": "queen"}

    @app.get("/v1/info", tags=["meta"])
    async def info(request: Request) -> dict[str, Any]:
        state = queen(request)
        fingerprint = getattr(request.app.state, "tls_fingerprint", None)  # set by queen-rbee --tls
        return {
            "component": "queen",
            "version": __version__,
            "base_url": settings.url.replace("http://", "https://", 1) if fingerprint else settings.url,
            "tls_fingerprint": fingerprint,
            "port": settings.port,
            "pid": os.getpid(),
            "started_at": state.started_at,
            "local_hive": settings.local_hive,
            "auth": settings.token is not None,
            "jobs_live": state.registry.live,
            "hives": len(state.telemetry.hives()),
            # Live asyncio tasks: the fault tests check that nothing is left running after a failure.
            "tasks": len(asyncio.all_tasks()),
        }

    @app.post("/v1/hives/heartbeat", tags=["cluster"])
    async def heartbeat(request: Request, beat: Heartbeat) -> dict[str, Any]:
        state = queen(request)
        if getattr(request.app.state, "tls_fingerprint", None) and settings.token and _in_clear_off_host(beat.url):
            # Calling it would send a token in clear over the network this queen encrypts.
            raise errors.Forbidden(
                f"url: this queen serves TLS and sends tokens only over HTTPS off its machine, not to {beat.url}"
                " (start the hive with --tls auto)"
            )
        # The hive and its workers are reached pinned to the certificate the hive reports.
        state.trust.pin(beat.hive_id, beat.tls_fingerprint, [beat.url, *(w.url for w in beat.workers)])
        hive, new = state.telemetry.heartbeat(beat)
        if beat.goodbye:
            narrate("hive_goodbye", f"Hive {hive.hive_id} stopped; it is offline", hive_id=hive.hive_id)
        elif new:
            narrate(
                "hive_registered",
                f"Hive {hive.hive_id} is online at {hive.url} with {len(hive.workers)} worker(s)",
                hive_id=hive.hive_id,
            )
        return {"ok": True, "interval_s": settings.heartbeat_interval_s}

    return app


def _in_clear_off_host(url: str) -> bool:
    """``url`` is plain HTTP to another machine (loopback stays on this one)."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        return False
    host = parts.hostname or ""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a name: another machine as far as the queen can tell
