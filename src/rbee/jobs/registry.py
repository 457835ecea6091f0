"""The job registry: creates jobs, owns their tasks, cancels them, forgets them.

:meth:`JobRegistry.submit` is the seed's ``execute_and_stream`` done right: the
job context is bound once around the executor (every task started inside
inherits it); the job runs whether or not anyone is watching; the outcome is
typed (completed, failed, cancelled, timed_out) and computed after the executor
has finished, then written as exactly one ``end`` event.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from rbee import narration
from rbee.contracts.events import JobStatus
from rbee.contracts.operations import OperationBase
from rbee.errors import JobCancelled, JobConflict, JobNotFound, JobTimedOut, QueueFull, RbeeError
from rbee.jobs.job import Job
from rbee.narration import narrate

__all__ = [
    "JobRegistry",
    "JobHooks",
    "Executor",
    "current_job",
    "emit_token",
    "emit_progress",
    "emit_result",
    "set_end_fields",
]

Executor = Callable[[OperationBase], Awaitable[Any]]

_current: contextvars.ContextVar[Job | None] = contextvars.ContextVar("rbee_current_job", default=None)


def current_job() -> Job:
    job = _current.get()
    if job is None:
        raise RuntimeError("not inside a job")
    return job


async def emit_token(text: str, ids: Sequence[int] = ()) -> None:
    """Send one piece of generated text on the current job's stream (lossless).

    ``ids`` are the model's token ids behind it (sent as the event's ``ids``).
    """
    await current_job().add_token(text, ids)


def emit_progress(action: str, done: float, total: float | None = None, unit: str = "", **fields: Any) -> None:
    data = {"action": action, "done": done, "total": total, "unit": unit, **fields}
    current_job().add_progress(data)


def emit_result(data: Any) -> None:
    current_job().add_result(data)


def set_end_fields(**fields: Any) -> None:
    """Extra fields for the job's ``end`` event (token counts, timings...)."""
    current_job().end_fields.update(fields)


class JobHooks:
    """What a part of a server learns of each job's life: override the steps it uses.

    Every hook is called on the event loop, in the order the hooks were given:

    * :meth:`on_accepted`: the job exists (inside the request that created it,
      so the caller is known) and its task has not run yet;
    * :meth:`on_started`: its task began running it;
    * :meth:`on_finished`: its ``end`` event is in the log (``end`` is its data).
      A job cancelled before it ever ran finishes without starting.

    A hook that raises is logged and does not change the job or the other hooks.
    """

    def on_accepted(self, job: Job) -> None:
        """The job was created; its task has not run yet."""

    def on_started(self, job: Job) -> None:
        """The job's task began running it."""

    def on_finished(self, job: Job, end: dict[str, Any]) -> None:
        """The job ended; ``end`` is its ``end`` event's data."""


class JobRegistry:
    """All jobs of one server, each with exactly one owned task."""

    def __init__(
        self,
        *,
        actor: str,
        ttl_s: float = 600.0,
        max_live_jobs: int = 100_000,
        hooks: Sequence[JobHooks] = (),
    ) -> None:
        self.actor = actor
        self.ttl_s = ttl_s
        self.max_live_jobs = max_live_jobs
        #: Told of every job's steps, in this order (see :class:`JobHooks`).
        self.hooks: list[JobHooks] = list(hooks)
        self._jobs: dict[str, Job] = {}
        self._live = 0

    def __len__(self) -> int:
        return len(self._jobs)

    @property
    def live(self) -> int:
        return self._live

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id!r}", job_id=job_id)
        return job

    def find(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def matching(self, prefix: str, limit: int = 10) -> list[str]:
        """The ids of jobs held here that start with ``prefix`` (at most ``limit``), for short ids."""
        found: list[str] = []
        for job_id in self._jobs:
            if job_id.startswith(prefix):
                found.append(job_id)
                if len(found) >= limit:
                    break
        return found

    def list(self, limit: int = 100) -> list[Job]:
        jobs = list(self._jobs.values())[-limit:]
        jobs.reverse()
        return jobs

    def submit(self, operation: OperationBase, executor: Executor, *, timeout_s: float | None = None) -> Job:
        """Create a job and start running ``executor(operation)`` for it."""
        if self._live >= self.max_live_jobs:
            raise QueueFull(f"{self._live} jobs are running; the limit is {self.max_live_jobs}", retry_after_s=1)
        job = Job(f"job-{uuid.uuid4()}", operation, timeout_s=timeout_s)
        self._jobs[job.id] = job
        self._live += 1
        self._tell(job, "on_accepted", lambda hook: hook.on_accepted(job))
        ctx = contextvars.copy_context()
        ctx.run(self._bind, job)
        job.task = asyncio.get_running_loop().create_task(self._run(job, executor), name=job.id, context=ctx)
        return job

    def _bind(self, job: Job) -> None:
        _current.set(job)
        narration.bind_in_context(job, self.actor)

    def _tell(self, job: Job, step: str, call: Callable[[JobHooks], None]) -> None:
        for hook in self.hooks:
            try:
                call(hook)
            except Exception:  # bookkeeping must not change the outcome
                narration.log().error(f"{step} hook failed", job_id=job.id, traceback=traceback.format_exc())

    async def _run(self, job: Job, executor: Executor) -> None:
        status = JobStatus.COMPLETED
        error: dict[str, Any] | None = None
        cancelled_by_owner = False
        try:
            job.transition(JobStatus.RUNNING)
            self._tell(job, "on_started", lambda hook: hook.on_started(job))
            narrate("job_start", f"Running {job.operation.name}", operation=job.operation.name)
            async with asyncio.timeout(job.timeout_s) as deadline:
                try:
                    await executor(job.operation)
                except TimeoutError:
                    if deadline.expired():
                        raise
                    raise RbeeError("an operation inside the job timed out") from None
        except asyncio.CancelledError:
            status = JobStatus.CANCELLED
            reason = job.cancel_reason or "server shutting down"
            error = {"kind": "cancelled", "message": reason}
            cancelled_by_owner = job.cancel_reason is None
        except TimeoutError:
            status = JobStatus.TIMED_OUT
            error = {"kind": "timed_out", "message": f"the job ran past its {job.timeout_s:g} s deadline"}
        except JobCancelled as exc:
            status, error = JobStatus.CANCELLED, exc.to_error()
        except JobTimedOut as exc:
            status, error = JobStatus.TIMED_OUT, exc.to_error()
        except RbeeError as exc:
            status, error = JobStatus.FAILED, exc.to_error()
        except Exception as exc:  # an executor bug must still end the job
            status = JobStatus.FAILED
            error = {"kind": "internal", "message": f"{type(exc).__name__}: {exc}"}
            narration.log().error("executor crashed", job_id=job.id, traceback=traceback.format_exc())
        finally:
            self._finish(job, status, error)
        if cancelled_by_owner:
            raise asyncio.CancelledError

    def _finish(self, job: Job, status: JobStatus, error: dict[str, Any] | None) -> None:
        try:
            if status is JobStatus.COMPLETED:
                narrate("job_done", f"{job.operation.name} completed")
            elif error is not None:
                narrate(
                    f"job_{status.value}",
                    f"{job.operation.name} {status.value.replace('_', ' ')}: {error['message']}",
                    level="warn" if status is JobStatus.CANCELLED else "error",
                    error_kind=error["kind"],
                )
        except Exception:  # a broken log sink must not keep the job from ending
            pass
        end = job.finish(status, error)
        self._live -= 1
        self._tell(job, "on_finished", lambda hook: hook.on_finished(job, end))

    def cancel(self, job_id: str, reason: str = "cancelled by request") -> Job:
        """Cancel a running job. A finished job raises :class:`JobConflict`."""
        job = self.get(job_id)
        if job.done or job.cancel_reason is not None:
            raise JobConflict(f"job {job_id} is already {job.status.value}", status=job.status.value)
        job.cancel_reason = reason
        if job.task is not None:
            job.task.cancel(reason)
        self._end_unstarted(job)
        return job

    def _end_unstarted(self, job: Job) -> None:
        # A task cancelled before its first step never runs its body (nor its
        # ``finally``), so a job still queued is ended here or it never ends.
        if job.status is JobStatus.QUEUED and not job.ended:
            with narration.bound(job, actor=self.actor):
                reason = job.cancel_reason or "server shutting down"
                self._finish(job, JobStatus.CANCELLED, {"kind": "cancelled", "message": reason})

    async def wait(self, job: Job) -> None:
        if job.task is not None:
            await asyncio.gather(job.task, return_exceptions=True)

    def sweep(self, now: float | None = None) -> int:
        """Forget terminal jobs that finished more than ``ttl_s`` ago."""
        now = time.time() if now is None else now
        expired = [
            jid
            for jid, job in self._jobs.items()
            if job.ended and job.finished_at is not None and now - job.finished_at >= self.ttl_s
        ]
        for jid in expired:
            self._jobs.pop(jid).release()
        return len(expired)

    async def run_sweeper(self, interval_s: float = 5.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.sweep()

    async def aclose(self, deadline_s: float = 5.0) -> None:
        """Cancel every live job and wait (bounded) for their ends."""
        tasks = []
        for job in self._jobs.values():
            if job.task is not None and not job.task.done():
                job.cancel_reason = job.cancel_reason or "server shutting down"
                job.task.cancel()
                tasks.append(job.task)
                self._end_unstarted(job)
        if tasks:
            await asyncio.wait(tasks, timeout=deadline_s)
