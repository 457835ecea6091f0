"""The hive's ASGI app: job server, model catalog, worker supervisor, heartbeats."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from rbee import __version__
from rbee.config import HIVE_PORT, rbee_home
from rbee.contracts.operations import HiveOperation
from rbee.hive.addresses import WILDCARDS, reachable_host, url_host
from rbee.hive.catalog import ModelCatalog
from rbee.hive.download import Downloader
from rbee.hive.heartbeat import Deliver, DeviceProbe, HeartbeatLoop, HttpDelivery
from rbee.hive.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from rbee.hive.metrics import render as render_metrics
from rbee.hive.policy import DownloadPolicy
from rbee.hive.processes import WORKER_COMMAND
from rbee.hive.router import HiveRouter
from rbee.hive.supervisor import Supervisor
from rbee.http import install_edge
from rbee.jobs.api import PING_INTERVAL_S, JobServer, job_router
from rbee.jobs.registry import JobRegistry
from rbee.narration import narrate

__all__ = ["HiveSettings", "HiveState", "create_hive_app"]


@dataclass
class HiveSettings:
    host: str = "127.0.0.1"
    port: int = HIVE_PORT
    hive_id: str = "localhost"
    queen_url: str | None = None
    token: str | None = None
    home: Path | None = None
    #: Passed to every worker as ``--engine`` (``fake`` for tests).
    worker_engine: str = "llama"
    #: Extra flags for every worker (e.g. ``--fake-tokens 50``).
    worker_args: tuple[str, ...] = ()
    heartbeat_interval_s: float = 2.0
    worker_ready_timeout_s: float = 120.0
    job_ttl_s: float = 600.0
    ping_interval_s: float = PING_INTERVAL_S
    #: The address others reach this machine at; default: derived from ``host``.
    advertise_host: str | None = None
    #: Heartbeats go here when given (the hive inside the queen), else over HTTP to ``queen_url``.
    deliver: Deliver | None = None
    worker_command: tuple[str, ...] = WORKER_COMMAND
    #: Where ``hf:`` sources are looked up; default ``$HF_ENDPOINT``, else https://huggingface.co.
    hf_endpoint: str | None = None
    #: Download sources let in besides the default policy (CIDRs or host names; see rbee.hive.policy).
    allow_download_from: tuple[str, ...] = ()
    #: Directories local model files may be downloaded from, besides $RBEE_HOME/models.
    model_dirs: tuple[Path, ...] = ()
    #: How long a worker stays loaded once idle, unless its last job said (-1: for ever).
    keep_alive_s: float = 300.0
    #: A cap on the memory this hive's workers hold in all (None: the machine's).
    memory_limit_bytes: int | None = None
    #: The certificate and key the hive serves HTTPS with, and its workers too (None: plain HTTP).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: The fingerprint of ``tls_cert``, reported in every heartbeat for the queen to pin.
    tls_fingerprint: str | None = None
    #: The queen's certificate must have this fingerprint (None: the usual verification of https).
    queen_fingerprint: str | None = None


class HiveState:
    """Everything the hive's endpoints need, built in the lifespan."""

    def __init__(self, settings: HiveSettings) -> None:
        self.settings = settings
        self.home = settings.home or rbee_home()
        self.public_host = settings.advertise_host or reachable_host(settings.host, settings.queen_url)
        tls = settings.tls_cert is not None and settings.tls_key is not None
        self.scheme = "https" if tls else "http"
        self.url = f"{self.scheme}://{url_host(self.public_host)}:{settings.port}"
        self.started_at = time.time()
        # The workers serve the hive's own certificate: the client that polls them trusts exactly it.
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(5.0),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            verify=_trusting_file(settings.tls_cert) if tls and settings.tls_cert else True,
        )
        self.queen_http: httpx.AsyncClient | None = None
        self.catalog = ModelCatalog(self.home / "hives" / settings.hive_id / "models.sqlite", hive_id=settings.hive_id)
        self.devices = DeviceProbe()
        self.supervisor = Supervisor(
            home=self.home,
            http=self.http,
            host=settings.host,
            advertise_host=self.public_host,
            token=settings.token,
            engine=settings.worker_engine,
            extra_args=settings.worker_args,
            ready_timeout_s=settings.worker_ready_timeout_s,
            on_change=self._workers_changed,
            command=settings.worker_command,
            state_dir=self.home / "hives" / settings.hive_id / "workers",
            keep_alive_s=settings.keep_alive_s,
            memory_limit_bytes=settings.memory_limit_bytes,
            tls_cert=settings.tls_cert,
            tls_key=settings.tls_key,
        )
        deliver: Deliver | None = settings.deliver
        target = "the queen"
        if deliver is None and settings.queen_url:
            from rbee.jobs.client import JobHttp
            from rbee.wire.tls import Trust

            trust = Trust()
            trust.pin("queen", settings.queen_fingerprint, [settings.queen_url])
            self.queen_http = JobHttp(timeout=httpx.Timeout(5.0), trust=trust)
            deliver = HttpDelivery(settings.queen_url, self.queen_http, token=settings.token)
            target = f"the queen at {settings.queen_url}"
        self.heartbeat: HeartbeatLoop | None = None
        if deliver is not None:
            # Bound to every address and told none to advertise, the hive is reached at the
            # address its machine routes toward the queen from, looked up again each beat.
            follows = settings.advertise_host is None and settings.host in WILDCARDS
            self.heartbeat = HeartbeatLoop(
                hive_id=settings.hive_id,
                url=self.url,
                supervisor=self.supervisor,
                catalog=self.catalog,
                deliver=deliver,
                interval_s=settings.heartbeat_interval_s,
                devices=self.devices,
                target=target,
                address=self.follow_address if follows else None,
                tls_fingerprint=settings.tls_fingerprint if tls else None,
            )
        self.models_dir = self.home / "models" / settings.hive_id
        policy = DownloadPolicy(allow=settings.allow_download_from, model_dirs=settings.model_dirs, home=self.home)
        self.downloads = Downloader(
            catalog=self.catalog,
            models_dir=self.models_dir,
            hive_id=settings.hive_id,
            hf_endpoint=settings.hf_endpoint,
            policy=policy,
        )
        self.router = HiveRouter(
            hive_id=settings.hive_id,
            catalog=self.catalog,
            supervisor=self.supervisor,
            devices=self.devices,
            downloads=self.downloads,
            models_dir=self.models_dir,
            catalog_changed=self._catalog_changed,
        )
        self.registry = JobRegistry(actor="hive", ttl_s=settings.job_ttl_s)
        self.jobs = JobServer(
            self.registry, self.router, admit=self.router.admit, ping_interval_s=settings.ping_interval_s
        )

    def follow_address(self) -> str:
        """The hive's URL now; when its machine's address changed, the workers' URLs follow."""
        host = reachable_host(self.settings.host, self.settings.queen_url)
        if host != self.public_host:
            old = self.public_host
            self.public_host = host
            self.url = f"{self.scheme}://{url_host(host)}:{self.settings.port}"
            self.supervisor.readdress(host)
            narrate(
                "hive_address_changed",
                f"This machine's address changed from {old} to {host}; the hive is now at {self.url}",
                actor="hive",
                old=old,
                new=host,
            )
        return self.url

    def _workers_changed(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.poke()

    async def _catalog_changed(self) -> None:
        if self.heartbeat is not None:
            await self.heartbeat.sync()

    async def final_heartbeat(self) -> None:
        """Say goodbye to the queen, bounded: this hive and its workers are gone (it shows it offline)."""
        if self.heartbeat is None:
            return
        try:
            async with asyncio.timeout(2.0):
                await self.heartbeat.beat(goodbye=True)
        except TimeoutError:
            pass


def _trusting_file(cert: Path) -> ssl.SSLContext:
    from rbee.wire.tls import trusting_pem

    return trusting_pem(cert.read_text())


def create_hive_app(settings: HiveSettings | None = None) -> FastAPI:
    settings = settings or HiveSettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = HiveState(settings)
        app.state.hive = state
        state.catalog.warm()
        # Before the first heartbeat: workers a previous run of this hive left behind are stopped.
        await state.supervisor.reap_orphans()
        tasks = [
            asyncio.create_task(state.registry.run_sweeper(), name="hive:sweeper"),
            asyncio.create_task(state.supervisor.run_keepalive(settings.heartbeat_interval_s), name="hive:keepalive"),
        ]
        if state.heartbeat is not None:
            tasks.append(asyncio.create_task(state.heartbeat.run(), name="hive:heartbeat"))
        narrate(
            "hive_started",
            f"Hive {settings.hive_id} serving at {state.url}"
            + (f", heartbeats to {settings.queen_url}" if settings.queen_url else ""),
            actor="hive",
            hive_id=settings.hive_id,
            url=state.url,
        )
        try:
            yield
        finally:
            await state.registry.aclose()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await state.supervisor.aclose()
            await state.final_heartbeat()
            await state.downloads.aclose()
            await state.http.aclose()
            if state.queen_http is not None:
                await state.queen_http.aclose()
            await state.catalog.aclose()
            narrate("hive_stopped", f"Hive {settings.hive_id} stopped", actor="hive", hive_id=settings.hive_id)

    app = FastAPI(title="rbee-hive", version=__version__, lifespan=lifespan)
    install_edge(app, token=settings.token, api_families=False)

    def hive(request: Request) -> HiveState:
        state: HiveState = request.app.state.hive
        return state

    app.include_router(job_router(lambda request: hive(request).jobs, HiveOperation))

    @app.get("/health", tags=["meta"])
    async def health() -> dict[str, Any]:
        return {"status": "ok", "component": "hive", "hive_id": settings.hive_id}

    @app.get("/metrics", tags=["meta"], response_class=PlainTextResponse, summary="Prometheus metrics (rbee_hive_*)")
    async def metrics(request: Request) -> PlainTextResponse:
        state = hive(request)
        body = render_metrics(
            hive_id=settings.hive_id, supervisor=state.supervisor, catalog=state.catalog, registry=state.registry
        )
        return PlainTextResponse(body, media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/info", tags=["meta"])
    async def info(request: Request) -> dict[str, Any]:
        state = hive(request)
        beat = state.heartbeat
        return {
            "component": "hive",
            "hive_id": settings.hive_id,
            "version": __version__,
            "url": state.url,
            "port": settings.port,
            "pid": os.getpid(),
            "started_at": state.started_at,
            "home": str(state.home),
            "models_dir": str(state.models_dir),
            "hf_endpoint": state.downloads.hf_endpoint,
            "queen_url": settings.queen_url,
            "auth": settings.token is not None,
            "tls_fingerprint": settings.tls_fingerprint,
            "worker_engine": settings.worker_engine,
            "workers": len(state.supervisor.workers),
            "models": len(state.catalog.models_now()),
            "jobs_live": state.registry.live,
            # Live asyncio tasks: the fault tests check that nothing is left running after a failure.
            "tasks": len(asyncio.all_tasks()),
            "heartbeats": None
            if beat is None
            else {"sent": beat.sent, "failing": beat.failures > 0, "interval_s": beat.interval_s},
        }

    return app
