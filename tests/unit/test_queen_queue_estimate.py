"""The estimated start a queued job is shown, from the model's recent job durations."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx
import pytest

from rbee.contracts.cluster import WorkerReport
from rbee.queen.scheduler import Lease, Scheduler
from rbee.queen.telemetry import Telemetry, WorkerView


def worker(worker_id: str, slots: int = 1) -> WorkerView:
    return WorkerView("h1", WorkerReport(worker_id=worker_id, model="m", state="busy", slots=slots))


@pytest.fixture
async def scheduler() -> AsyncIterator[Scheduler]:
    async with httpx.AsyncClient() as http:
        yield Scheduler(Telemetry(), http)


def finished(scheduler: Scheduler, w: WorkerView, seconds: float) -> None:
    lease = Lease(w, "h1", started=time.monotonic() - seconds)
    scheduler.inflight[w.worker_id] = scheduler.inflight.get(w.worker_id, 0) + 1
    scheduler.release(lease, "m", completed=True)


async def test_no_history_means_no_estimate(scheduler: Scheduler) -> None:
    assert scheduler.estimate_start_s("m", 1, [worker("w1")]) is None


async def test_queued_jobs_start_as_running_ones_reach_the_typical_duration(scheduler: Scheduler) -> None:
    w1, w2 = worker("w1"), worker("w2")
    for _ in range(3):
        finished(scheduler, w1, 4.0)
    # Both workers busy: one job 1 s in, the other 3 s in (typical: 4 s).
    now = time.monotonic()
    scheduler._leases.update({Lease(w1, "h1", started=now - 1.0), Lease(w2, "h1", started=now - 3.0)})

    first, second, third = (scheduler.estimate_start_s("m", p, [w1, w2]) for p in (1, 2, 3))
    assert first == pytest.approx(1.0, abs=0.2)  # w2 frees up first
    assert second == pytest.approx(3.0, abs=0.2)  # then w1
    assert third == pytest.approx(5.0, abs=0.2)  # then w2 again, after one more job


async def test_a_job_running_past_the_typical_duration_is_expected_to_end_now(scheduler: Scheduler) -> None:
    w1 = worker("w1")
    finished(scheduler, w1, 2.0)
    scheduler._leases.add(Lease(w1, "h1", started=time.monotonic() - 10.0))
    assert scheduler.estimate_start_s("m", 1, [w1]) == 0.0
    assert scheduler.estimate_start_s("m", 2, [w1]) == pytest.approx(2.0, abs=0.1)
