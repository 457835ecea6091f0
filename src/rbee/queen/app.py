"""The queen's ASGI app: job server, router, scheduler, telemetry, history."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from rbee import __version__, errors
from rbee.config import QUEEN_PORT, rbee_home
from rbee.contracts.cluster import Heartbeat
from rbee.contracts.operations import Operation, OperationBase
from rbee.errors import RbeeError
from rbee.http import current_principal, error_body, install_edge, is_admin
from rbee.jobs.api import PING_INTERVAL_S, JobServer, job_router
from rbee.jobs.client import JobHttp
from rbee.jobs.job import Job
from rbee.jobs.registry import JobRegistry, current_job
from rbee.narration import narrate
from rbee.queen.anthropic import anthropic_router
from rbee.queen.infill import infill_router
from rbee.queen.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from rbee.queen.metrics import QueenMetrics
from rbee.queen.ollama import ollama_router
from rbee.queen.openai import openai_router
from rbee.queen.responses import responses_router
from rbee.queen.router import QueenRouter
from rbee.queen.scheduler import Scheduler
from rbee.queen.store import JobStore
from rbee.queen.telemetry import Telemetry
from rbee.queen.tokens import tokens_router
from rbee.queen.web import PUBLIC_PATHS, JobWatch, web_router

__all__ = ["QueenSettings", "create_queen_app", "ADMIN_PATHS"]


@dataclass
class QueenSettings:
    host: str = "127.0.0.1"
    port: int = QUEEN_PORT
    #: The admin token: every endpoint, every job, and what the queen sends to hives.
    token: str | None = None
    #: Further tokens (one per person or program): each sees only the jobs it created.
    user_tokens: tuple[str, ...] = ()
    home: Path | None = None
    local_hive: bool = False
    local_hive_port: int = 0
    queue_size: int = 64
    job_ttl_s: float = 600.0
    ping_interval_s: float = PING_INTERVAL_S
    heartbeat_interval_s: float = 2.0
    forget_after_s: float = 60.0
    hive_options: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"


class QueenState:
    """Everything the queen's endpoints need, built in the lifespan."""

    def __init__(self, settings: QueenSettings) -> None:
        self.settings = settings
        home = settings.home or rbee_home()
        self.store = JobStore(home / "queen.sqlite")
        self.interrupted = self.store.mark_interrupted()
        self.telemetry = Telemetry(interval_s=settings.heartbeat_interval_s, forget_after_s=settings.forget_after_s)
        self.http = JobHttp(
            timeout=httpx.Timeout(10.0, read=None),
            limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256),
        )
        self.scheduler = Scheduler(self.telemetry, self.http, token=settings.token, queue_size=settings.queue_size)
        self.router = QueenRouter(self.telemetry, self.scheduler, self.http, settings.token)
        # Jobs appearing and ending are written to the history, then shown on the web page.
        self.metrics = QueenMetrics(self)
        self.watch = JobWatch(self.telemetry, on_create=self._job_created, on_end=self._job_ended)
        self.registry = JobRegistry(
            actor="queen", ttl_s=settings.job_ttl_s, on_create=self.watch.created, on_end=self.watch.ended
        )
        self.jobs = JobServer(
            self.registry,
            self._execute,
            admit=self.router.admit,
            history=self.store.get,
            history_list=self._recent,
            history_events=self.store.events,
            history_prefix=self.store.matching,
            visible=self.visible,
            durable=self.store.durable,
            ping_interval_s=settings.ping_interval_s,
        )
        self.started_at = time.time()
        self.local_hive: Any = None

    async def _execute(self, op: OperationBase) -> None:
        # The start is on record too: a queen that dies now leaves a job that says when it began.
        self.store.started(current_job())
        await self.router(op)

    def _job_created(self, job: Job) -> None:
        # Runs inside the request that created the job, so its caller is known.
        principal = current_principal()
        self.store.created(job, owner=principal.id if principal is not None else None)
        self.scheduler.job_created(job)

    def _recent(self, limit: int) -> list[dict[str, Any]]:
        principal = current_principal()
        if principal is None or principal.admin:
            return self.store.recent(limit)
        return self.store.recent(limit, owner=principal.id)

    def visible(self, job_id: str) -> bool:
        """Whether the current caller may see, follow or cancel the job (unknown jobs: True, so they 404)."""
        principal = current_principal()
        if principal is None or principal.admin:
            return True
        known, owner = self.store.owner(job_id)
        return not known or owner == principal.id

    def _job_ended(self, job: Job, end: dict[str, Any]) -> None:
        self.scheduler.job_ended(job)
        self.store.ended(job, end)
        self.metrics.job_ended(job, end)

    async def sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.registry.sweep()
            for hive_id in self.telemetry.sweep():
                narrate("hive_forgotten", f"Hive {hive_id} was not heard from for 60 s; forgotten", hive_id=hive_id)


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
            await state.registry.aclose()
            if state.local_hive is not None:
                await state.local_hive.stop()
            sweeper.cancel()
            await asyncio.gather(sweeper, return_exceptions=True)
            await state.http.aclose()
            state.store.close()

    app = FastAPI(title="queen-rbee", version=__version__, lifespan=lifespan)
    # Added before the edge, so it runs inside the bearer check and knows the caller.
    app.add_middleware(_Ownership)
    tokens = [t for t in (settings.token, *settings.user_tokens) if t]
    install_edge(app, token=tokens or None, public=PUBLIC_PATHS)

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
    app.include_router(web_router(queen))

    @app.get("/metrics", tags=["meta"], response_class=Response)
    async def metrics(request: Request) -> Response:
        return Response(queen(request).metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/health", tags=["meta"])
    async def health() -> dict[str, Any]:
        return {"status": "ok", "component": "queen"}

    @app.get("/v1/info", tags=["meta"])
    async def info(request: Request) -> dict[str, Any]:
        state = queen(request)
        return {
            "component": "queen",
            "version": __version__,
            "base_url": settings.url,
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
