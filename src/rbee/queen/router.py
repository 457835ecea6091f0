"""The queen's executor: one operation in, the right handler run."""

from __future__ import annotations

import asyncio
import os
import platform
import time
from collections.abc import Awaitable

import httpx

from rbee import __version__, errors
from rbee.contracts.operations import (
    HiveList,
    Infer,
    OperationBase,
    QueenCheck,
    Status,
)
from rbee.http import is_admin
from rbee.jobs.client import JobClient, Unreachable
from rbee.jobs.registry import emit_progress, emit_result
from rbee.narration import narrate
from rbee.queen.relay import raise_for_end, relay_job
from rbee.queen.scheduler import Scheduler
from rbee.queen.telemetry import Telemetry

__all__ = ["QueenRouter", "ADMIN_OPERATIONS"]

#: Operations that change the cluster for everyone: with several tokens, only the admin token runs them.
#: How long a client's POST waits for a hive to take a forwarded operation.
PRESUBMIT_TIMEOUT_S = 10.0

ADMIN_OPERATIONS = frozenset({"worker_spawn", "worker_stop", "model_download", "model_delete"})


class QueenRouter:
    def __init__(self, telemetry: Telemetry, scheduler: Scheduler, http: httpx.AsyncClient, token: str | None):
        self.telemetry = telemetry
        self.scheduler = scheduler
        self.http = http
        self.token = token
        self._presubmitted: dict[int, tuple[str, float]] = {}

    def admit(self, op: OperationBase) -> Awaitable[None] | None:
        """Checks done at POST time, before a job exists."""
        if op.name in ADMIN_OPERATIONS and not is_admin():
            raise errors.Forbidden(f"{op.name} changes the cluster for everyone; it needs the admin token")
        if isinstance(op, Infer):
            return self.scheduler.admit(op)
        if op.forwarded_to_hive:
            self.telemetry.hive(getattr(op, "hive_id", "localhost"))
            return self._presubmit(op)
        return None

    async def _presubmit(self, op: OperationBase) -> None:
        """Submit a hive operation to its hive while the client's POST is open.

        The hive validates the operation against its own state (a model in use,
        an unknown worker, a source that is not a model); its 4xx then becomes
        this POST's answer instead of a failed job. The executor follows the
        hive job that was started here.
        """
        hive_id = str(getattr(op, "hive_id", "localhost"))
        hive = self.telemetry.hive(hive_id)
        if self.telemetry.state_of(hive) != "online":
            raise self.telemetry.offline(hive)
        client = JobClient(hive.url, token=self.token, client=self.http)
        try:
            async with asyncio.timeout(PRESUBMIT_TIMEOUT_S):
                remote_id = await client.submit(op)
        except Unreachable as exc:
            raise errors.HiveUnreachable(f"hive {hive_id} did not answer: {exc.message}") from None
        except TimeoutError:
            raise errors.HiveUnreachable(
                f"hive {hive_id} did not take the operation within {PRESUBMIT_TIMEOUT_S:g} s"
            ) from None
        self._presubmitted[id(op)] = (remote_id, time.monotonic())
        self._forget_stale()

    def _forget_stale(self) -> None:
        # An admitted operation whose job was then never created leaves an entry behind.
        cutoff = time.monotonic() - 60.0
        for key in [k for k, (_, at) in self._presubmitted.items() if at < cutoff]:
            del self._presubmitted[key]

    async def __call__(self, op: OperationBase) -> None:
        narrate("route_job", f"Executing operation: {op.name}", operation=op.name)
        if isinstance(op, Infer):
            await self.scheduler.infer(op)
        elif isinstance(op, Status):
            self.status()
        elif isinstance(op, HiveList):
            self.hive_list()
        elif isinstance(op, QueenCheck):
            await queen_check()
        elif op.forwarded_to_hive:
            await self.forward(op)
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

    async def forward(self, op: OperationBase) -> None:
        hive_id = str(getattr(op, "hive_id", "localhost"))
        hive = self.telemetry.hive(hive_id)
        presubmitted = self._presubmitted.pop(id(op), None)
        if presubmitted is None and self.telemetry.state_of(hive) != "online":
            raise self.telemetry.offline(hive)
        narrate("forward_start", f"Forwarding {op.name} to hive {hive_id} at {hive.url}", hive_id=hive_id)
        client = JobClient(hive.url, token=self.token, client=self.http)
        remote_id = presubmitted[0] if presubmitted is not None else None
        end = await relay_job(client, op, where=f"hive {hive_id}", remote_id=remote_id)
        raise_for_end(end, f"hive {hive_id}")
        narrate("forward_complete", f"{op.name} completed on hive {hive_id}", hive_id=hive_id)


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
