"""The queen's parts, built in the lifespan and wired together here.

Each part receives only what it uses; none imports this module or the app
back. The job lifecycle hooks (:class:`rbee.jobs.registry.JobHooks`) are
registered with the registry in one place, in this order:

1. the history (:class:`~rbee.queen.store.JobStore`): the record first, so an
   accepted job is on record before anyone hears of it;
2. the scheduler: an ``infer`` counts against its model's queue bound;
3. the metrics: counters and histograms of finished jobs;
4. the placements (:class:`~rbee.queen.placements.Placements`): the live jobs
   the page shows, which wakes the page's feed last, once the bookkeeping is done.

The API routers (job API, OpenAI, Ollama, Anthropic, the page) reach the parts
through :class:`QueenState`, from ``request.app.state.queen``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from rbee.config import rbee_home
from rbee.contracts.operations import OperationBase
from rbee.http import current_principal
from rbee.jobs.api import JobServer
from rbee.jobs.client import JobHttp
from rbee.jobs.job import Job
from rbee.jobs.registry import JobRegistry
from rbee.narration import narrate
from rbee.queen.metrics import QueenMetrics
from rbee.queen.placements import Placements
from rbee.queen.router import QueenRouter
from rbee.queen.scheduler import Scheduler
from rbee.queen.settings import QueenSettings
from rbee.queen.store import JobStore
from rbee.queen.telemetry import Telemetry
from rbee.queen.web import ClusterPage
from rbee.wire.tls import Trust

__all__ = ["QueenState", "QueenJobs"]


class QueenJobs(JobServer):
    """The job API's server in the queen: admission returns a ticket, which rides into the job.

    A job the registry refuses after admission (too many live jobs) cancels
    what its ticket started on a hive; so does a job that ends before it ran.
    """

    def __init__(self, registry: JobRegistry, router: QueenRouter, **kwargs: Any) -> None:
        super().__init__(registry, router, **kwargs)
        self.router = router

    async def submit(self, operation: OperationBase) -> Job:
        ticket = await self.router.admit(operation)
        timeout_s = getattr(operation, "timeout_s", None)

        async def execute(op: OperationBase) -> None:
            await self.router(op, ticket)

        try:
            job = self.registry.submit(operation, execute, timeout_s=timeout_s)
        except Exception:
            await ticket.cancel()  # refused: what admission started would run for nobody
            raise
        if ticket.hive_job is not None and job.task is not None:
            job.task.add_done_callback(lambda _: self.router.settle(ticket))
        if self.durable is not None:
            await self.durable()  # the job's record is committed before anyone hears of the job
        return job


def _owner() -> str | None:
    # Asked inside the request that creates a job, so its caller is known.
    principal = current_principal()
    return principal.id if principal is not None else None


class QueenState:
    """The queen's parts, for the endpoints that use them."""

    def __init__(self, settings: QueenSettings) -> None:
        self.settings = settings
        home = settings.home or rbee_home()
        self.store = JobStore(home / "queen.sqlite", owner=_owner)
        self.interrupted = self.store.mark_interrupted()
        self.telemetry = Telemetry(interval_s=settings.heartbeat_interval_s, forget_after_s=settings.forget_after_s)
        #: The certificate each hive reported (its own and its workers'), pinned from its heartbeats.
        self.trust = Trust()
        self.http = JobHttp(
            timeout=httpx.Timeout(10.0, read=None),
            limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256),
            trust=self.trust,
        )
        self.placements = Placements(notify=self.telemetry.notify)
        self.scheduler = Scheduler(
            self.telemetry,
            self.http,
            token=settings.token,
            queue_size=settings.queue_size,
            placements=self.placements,
        )
        self.router = QueenRouter(self.telemetry, self.scheduler, self.http, settings.token)
        self.registry = JobRegistry(actor="queen", ttl_s=settings.job_ttl_s)
        self.jobs = QueenJobs(
            self.registry,
            self.router,
            history=self.store.get,
            history_list=self._recent,
            history_events=self.store.events,
            history_prefix=self.store.matching,
            visible=self.visible,
            durable=self.store.durable,
            ping_interval_s=settings.ping_interval_s,
        )
        self.metrics = QueenMetrics(self.registry, self.scheduler, self.telemetry, lambda: self.jobs.active_streams)
        self.registry.hooks.extend([self.store, self.scheduler, self.metrics, self.placements])
        self.page = ClusterPage(self.telemetry, self.scheduler, self.placements, self.store.records)
        self.started_at = time.time()
        self.local_hive: Any = None

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

    async def sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.registry.sweep()
            for hive_id in self.telemetry.sweep():
                self.trust.forget(hive_id)
                narrate("hive_forgotten", f"Hive {hive_id} was not heard from for 60 s; forgotten", hive_id=hive_id)

    async def aclose(self) -> None:
        """End every live job, the local hive, the hive cancellations in flight, the HTTP pool and the history."""
        await self.registry.aclose()
        await self.router.aclose()
        if self.local_hive is not None:
            await self.local_hive.stop()
        await self.http.aclose()
        self.store.close()
