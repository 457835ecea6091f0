"""Where each live job of the queen is: the step it reached and the worker it runs on.

The scheduler publishes here as it goes (:meth:`Placements.step`,
:meth:`Placements.placed`); the web page reads it (:meth:`Placements.live`).
Nobody learns a job's worker by reading its narration back. The steps are the
timeline's (:class:`rbee.jobs.timeline.Step`), so the page and
``GET /v1/jobs/{id}`` name them alike.

It is a job hook (:class:`rbee.jobs.registry.JobHooks`): a job is here from
its acceptance to its end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rbee.jobs.job import Job
from rbee.jobs.registry import JobHooks
from rbee.jobs.timeline import Step

__all__ = ["Placement", "LiveJob", "Placements"]


@dataclass(frozen=True, slots=True)
class Placement:
    """A job placed on a worker: the scheduler's decision, published as it is made."""

    job_id: str
    hive_id: str
    worker_id: str
    #: 1 for the job's first worker; each retry or failover places it again.
    attempt: int = 1

    def fields(self) -> dict[str, Any]:
        """What the placement's narration (``infer_worker``) carries: the job's log keeps it, and the
        timeline marks the step :attr:`~rbee.jobs.timeline.Step.PLACED` by it, for live and stored jobs alike."""
        return {"worker_id": self.worker_id, "hive_id": self.hive_id, "attempt": self.attempt}


@dataclass(slots=True)
class LiveJob:
    job: Job
    #: The last step the scheduler published (before any: created, then started).
    reached: Step = Step.CREATED
    placement: Placement | None = None

    @property
    def step(self) -> Step:
        """The step it is at: once tokens flow, that is what it does, whatever the scheduler said before."""
        return Step.FIRST_TOKEN if self.job.tokens else self.reached

    @property
    def worker_id(self) -> str | None:
        return self.placement.worker_id if self.placement is not None else None

    @property
    def hive_id(self) -> str | None:
        return self.placement.hive_id if self.placement is not None else None


def _nobody() -> None:
    return None


class Placements(JobHooks):
    """The queen's live jobs, each with the step and the placement the scheduler published.

    ``notify`` is called when a job appears or ends (the page's feed wakes on it).
    """

    def __init__(self, notify: Callable[[], None] = _nobody) -> None:
        self._notify = notify
        self._live: dict[str, LiveJob] = {}

    # -- job hooks -------------------------------------------------------

    def on_accepted(self, job: Job) -> None:
        self._live[job.id] = LiveJob(job)
        self._notify()

    def on_started(self, job: Job) -> None:
        self.step(job.id, Step.STARTED)

    def on_finished(self, job: Job, end: dict[str, Any]) -> None:
        self._live.pop(job.id, None)
        self._notify()

    # -- what the scheduler publishes ------------------------------------

    def step(self, job_id: str, step: Step) -> None:
        live = self._live.get(job_id)
        if live is not None:
            live.reached = step

    def placed(self, placement: Placement) -> None:
        live = self._live.get(placement.job_id)
        if live is not None:
            live.reached = Step.PLACED
            live.placement = placement

    # -- what the page reads ---------------------------------------------

    def get(self, job_id: str) -> LiveJob | None:
        return self._live.get(job_id)

    def live(self) -> list[LiveJob]:
        return list(self._live.values())

    def __len__(self) -> int:
        return len(self._live)
