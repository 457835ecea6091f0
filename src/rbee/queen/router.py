"""The queen's admission and executor: one operation in, a ticket out, then the right handler run.

Admission (:meth:`QueenRouter.admit`) runs during the client's ``POST``,
before a job exists, and returns a :class:`Ticket`. An operation forwarded to
a hive is submitted to the hive right there (so the hive's own refusal is the
``POST``'s answer); the ticket carries that hive job into the queen job's
execution, which follows it instead of submitting again. A ticket whose job is
refused after admission, or ends before it ran, cancels its hive job: nothing
is left running on a hive for a job that does not exist.
"""

from __future__ import annotations

import asyncio
import os
import platform
from dataclasses import dataclass

import httpx

from rbee import __version__, errors
from rbee.contracts.operations import (
    HiveList,
    Infer,
    OperationBase,
    QueenCheck,
    Status,
    WorkerStopAll,
)
from rbee.errors import Unreachable
from rbee.http import is_admin
from rbee.jobs.client import JobClient
from rbee.jobs.registry import emit_progress, emit_result
from rbee.narration import narrate
from rbee.queen.relay import cancel_remote, raise_for_end, relay_job
from rbee.queen.scheduler import Scheduler
from rbee.queen.telemetry import Telemetry

__all__ = ["QueenRouter", "Ticket", "HiveJob", "ADMIN_OPERATIONS"]

#: How long a client's POST waits for a hive to take a forwarded operation.
PRESUBMIT_TIMEOUT_S = 10.0
#: How long a submission given up on may still land (and then be cancelled on the hive).
LATE_SUBMIT_S = 5.0

#: Operations that change the cluster for everyone: with several tokens, only the admin token runs them.
ADMIN_OPERATIONS = frozenset({"worker_spawn", "worker_stop", "worker_stop_all", "model_download", "model_delete"})


@dataclass(frozen=True, slots=True)
class HiveJob:
    """A job a hive took during the client's ``POST``, before the queen's own job existed."""

    hive_id: str
    client: JobClient
    remote_id: str


class Ticket:
    """An admitted operation, and what admission started for it.

    Its hive job (if any) goes to exactly one place: the job's execution
    (:meth:`take`), or :meth:`cancel` when the job is refused or ends before
    it ran.
    """

    __slots__ = ("_hive_job", "operation")

    def __init__(self, operation: OperationBase, hive_job: HiveJob | None = None) -> None:
        self.operation = operation
        self._hive_job = hive_job

    @property
    def hive_job(self) -> HiveJob | None:
        """The hive job not yet taken or cancelled."""
        return self._hive_job

    def take(self) -> HiveJob | None:
        """The hive job, now the caller's to follow (None: there is none, or it was taken)."""
        hive_job, self._hive_job = self._hive_job, None
        return hive_job

    async def cancel(self) -> None:
        """Cancel the hive job nobody will follow (bounded; a no-op once taken)."""
        hive_job = self.take()
        if hive_job is not None:
            await cancel_remote(hive_job.client, hive_job.remote_id)


class QueenRouter:
    def __init__(self, telemetry: Telemetry, scheduler: Scheduler, http: httpx.AsyncClient, token: str | None):
        self.telemetry = telemetry
        self.scheduler = scheduler
        self.http = http
        self.token = token
        # Cancellations of hive jobs nobody follows: their queen job ended before it ran, or their
        # POST was given up on and landed later (awaited by aclose, each bounded).
        self._cancelling: set[asyncio.Task[None]] = set()

    async def admit(self, op: OperationBase) -> Ticket:
        """Checks done at POST time, before a job exists; a refusal raises."""
        if op.name in ADMIN_OPERATIONS and not is_admin():
            raise errors.Forbidden(f"{op.name} changes the cluster for everyone; it needs the admin token")
        if isinstance(op, Infer):
            counting = self.scheduler.admit(op)
            if counting is not None:
                await counting
        elif isinstance(op, WorkerStopAll):
            self._stop_targets(op)
        elif op.forwarded_to_hive:
            self.telemetry.hive(getattr(op, "hive_id", "localhost"))
            return Ticket(op, await self._presubmit(op))
        return Ticket(op)

    def settle(self, ticket: Ticket) -> None:
        """The ticket's job ended: a hive job it never took is cancelled (in a task of the router's own)."""
        if ticket.hive_job is None:
            return
        name = f"cancel-untaken:{ticket.hive_job.remote_id}"
        self._own(asyncio.get_running_loop().create_task(ticket.cancel(), name=name))

    async def aclose(self, deadline_s: float = 2.0) -> None:
        """Wait (bounded) for the cancellations still in flight; cancel what is left."""
        if not self._cancelling:
            return
        _, pending = await asyncio.wait(set(self._cancelling), timeout=deadline_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _presubmit(self, op: OperationBase) -> HiveJob:
        """Submit a hive operation to its hive while the client's POST is open.

        The hive validates the operation against its own state (a model in use,
        an unknown worker, a source that is not a model); its 4xx then becomes
        this POST's answer instead of a failed job. The executor follows the
        hive job that was started here (it rides on the ticket).
        """
        hive_id = str(getattr(op, "hive_id", "localhost"))
        hive = self.telemetry.hive(hive_id)
        if self.telemetry.state_of(hive) != "online":
            raise self.telemetry.offline(hive)
        client = JobClient(hive.url, token=self.token, client=self.http)
        # Shielded: a POST given up on (timeout, or the client gone) may still land, and is then cancelled.
        submitting = asyncio.get_running_loop().create_task(client.submit(op), name=f"presubmit@{hive_id}")
        try:
            async with asyncio.timeout(PRESUBMIT_TIMEOUT_S):
                remote_id = await asyncio.shield(submitting)
        except Unreachable as exc:
            raise errors.HiveUnreachable(f"hive {hive_id} did not answer: {exc.message}") from None
        except TimeoutError:
            self._cancel_if_it_lands(client, submitting)
            raise errors.HiveUnreachable(
                f"hive {hive_id} did not take the operation within {PRESUBMIT_TIMEOUT_S:g} s"
            ) from None
        except asyncio.CancelledError:
            self._cancel_if_it_lands(client, submitting)
            raise
        return HiveJob(hive_id, client, remote_id)

    def _cancel_if_it_lands(self, client: JobClient, submitting: asyncio.Task[str]) -> None:
        """A submission nobody waits for: if the hive takes the job after all (soon), cancel it there."""

        async def cancel() -> None:
            try:
                remote_id = await asyncio.wait_for(submitting, LATE_SUBMIT_S)  # cancels it on timeout
            except asyncio.CancelledError:
                submitting.cancel()
                raise
            except Exception:  # it did not land: nothing to cancel
                return
            await cancel_remote(client, remote_id)

        self._own(asyncio.get_running_loop().create_task(cancel(), name=f"cancel-late:{submitting.get_name()}"))

    def _own(self, task: asyncio.Task[None]) -> None:
        self._cancelling.add(task)
        task.add_done_callback(self._cancelling.discard)

    async def __call__(self, op: OperationBase, ticket: Ticket | None = None) -> None:
        """Run ``op`` as the current job; ``ticket`` is what its admission started."""
        narrate("route_job", f"Executing operation: {op.name}", operation=op.name)
        if isinstance(op, Infer):
            await self.scheduler.infer(op)
        elif isinstance(op, Status):
            self.status()
        elif isinstance(op, HiveList):
            self.hive_list()
        elif isinstance(op, QueenCheck):
            await queen_check()
        elif isinstance(op, WorkerStopAll):
            await self.worker_stop_all(op)
        elif op.forwarded_to_hive:
            await self.forward(op, ticket.take() if ticket is not None else None)
        else:
            raise errors.UnsupportedOperation(f"the queen has no handler for {op.name!r}")

    def status(self) -> None:
        snap = self.telemetry.snapshot()
        snap["queues"] = self.scheduler.queue_depths()
        n_h, n_w = len(snap["hives"]), len(snap["workers"])
        if n_h == 0:
            narrate("status_empty", "No hives are connected yet")
        else:
            narrate("status", f"{n_h} hive(s), {n_w} worker(s)", hives=n_h, workers=n_w)
        emit_result(snap)

    def hive_list(self) -> None:
        hives = self.telemetry.snapshot()["hives"]
        narrate("hive_list", f"{len(hives)} hive(s) known")
        emit_result({"hives": hives})

    async def forward(self, op: OperationBase, presubmitted: HiveJob | None = None) -> None:
        """Run ``op`` on its hive: follow the hive job admission started, else submit it now."""
        hive_id = str(getattr(op, "hive_id", "localhost"))
        hive = self.telemetry.hive(hive_id)
        if presubmitted is None and self.telemetry.state_of(hive) != "online":
            raise self.telemetry.offline(hive)
        narrate("forward_start", f"Forwarding {op.name} to hive {hive_id} at {hive.url}", hive_id=hive_id)
        if presubmitted is not None:
            client, remote_id = presubmitted.client, presubmitted.remote_id
        else:
            client, remote_id = JobClient(hive.url, token=self.token, client=self.http), None
        end = await relay_job(client, op, where=f"hive {hive_id}", remote_id=remote_id)
        raise_for_end(end, f"hive {hive_id}")
        narrate("forward_complete", f"{op.name} completed on hive {hive_id}", hive_id=hive_id)

    def _stop_targets(self, op: WorkerStopAll) -> list[str]:
        """The hives a ``worker_stop_all`` goes to; 404 for an unknown hive or model, 409 for an offline hive."""
        if op.hive_id is not None:
            hive = self.telemetry.hive(op.hive_id)
            if self.telemetry.state_of(hive) != "online":
                raise self.telemetry.offline(hive)
            hives = [hive]
        else:
            hives = self.telemetry.fresh_hives()
        if op.model is None:
            return [h.hive_id for h in hives]
        model = op.model
        known = [h for h in hives if h.has_model(model) or any(w.serves(model) for w in h.workers.values())]
        if not known and not any(h.has_model(model) for h in self.telemetry.hives()):
            names = sorted({m.alias or m.id for h in self.telemetry.hives() for m in h.models})
            where = f"hive {op.hive_id!r}" if op.hive_id else "no hive"
            raise errors.ModelNotFound(
                f"model: {where} has no model {model!r} (models: {', '.join(names) or 'none'})",
                model=model,
                field="model",
            )
        return [h.hive_id for h in known]

    async def worker_stop_all(self, op: WorkerStopAll) -> None:
        """Stop the workers (of a model) on one hive or on every online hive, all hives at once."""
        targets = self._stop_targets(op)
        what = f"of {op.model} " if op.model else ""
        narrate("stop_workers", f"Stopping every worker {what}on {', '.join(targets) or 'no hive'}", hives=targets)

        async def on(hive_id: str) -> list[dict[str, object]]:
            hive = self.telemetry.hive(hive_id)
            client = JobClient(hive.url, token=self.token, client=self.http)
            end = await relay_job(
                client, op.model_copy(update={"hive_id": hive_id}), where=f"hive {hive_id}", results=False
            )
            raise_for_end(end, f"hive {hive_id}")
            rows = end.get("stopped") or []
            for row in rows:
                self.telemetry.drop_worker(hive_id, str(row.get("worker_id")))
            return list(rows)

        tasks = [
            asyncio.get_running_loop().create_task(on(hive_id), name=f"stop_workers@{hive_id}") for hive_id in targets
        ]
        try:
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for task in tasks:
                task.cancel()
        stopped = [row for outcome in outcomes if isinstance(outcome, list) for row in outcome]
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        narrate("stop_workers_done", f"Stopped {len(stopped)} worker(s) {what}".strip(), stopped=len(stopped))
        emit_result({"stopped": stopped})
        if failed:
            first = failed[0]
            if isinstance(first, errors.RbeeError):
                raise first
            raise errors.HiveUnreachable(f"a hive did not stop its workers: {first!r}")


async def _check_nested(depth: int) -> None:
    narrate("check_nested", f"Narration from a nested call (depth {depth})", depth=depth)
    if depth < 2:
        await _check_nested(depth + 1)


async def _check_spawned(n: int) -> None:
    await asyncio.sleep(0.01 * n)
    narrate("check_task", f"Narration from spawned task {n}", task=n)


async def queen_check() -> None:
    """A self-test that narrates through every path of the job flow."""
    narrate("check_start", "Queen self-check: narration, progress, result")
    narrate("check_direct", "Narration from the executor itself")
    await _check_nested(0)
    async with asyncio.TaskGroup() as tg:
        for n in range(3):
            tg.create_task(_check_spawned(n), name=f"queen_check:{n}")
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, lambda: None)  # the thread bridge leaves context intact
    for done in range(1, 4):
        emit_progress("check_progress", done, 3, "steps")
    narrate("check_levels", "A warning-level narration (expected)", level="warn")
    emit_result(
        {
            "queen": "ok",
            "version": __version__,
            "python": platform.python_version(),
            "pid": os.getpid(),
            "paths": ["direct", "nested", "spawned_tasks", "progress", "result"],
        }
    )
    narrate("check_complete", "Queen self-check passed")
