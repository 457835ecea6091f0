"""The job registry: typed outcomes, cancellation, job context, cleanup, scale."""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from rbee import narration
from rbee.contracts.events import JobStatus
from rbee.contracts.operations import Infer, OperationBase, Status
from rbee.errors import JobConflict, JobNotFound, QueueFull, WorkerFailed
from rbee.jobs import JobRegistry, current_job, emit_progress, emit_result, emit_token, set_end_fields
from rbee.jobs.job import Job
from rbee.jobs.registry import JobHooks
from rbee.narration import narrate

Exec = Callable[[OperationBase], Awaitable[Any]]


def end_of(job: Job) -> dict[str, Any]:
    _, kind, data = job.events[-1]
    assert kind == "end"
    result: dict[str, Any] = json.loads(data)
    return result


def kinds(job: Job) -> list[str]:
    return [kind for _, kind, _ in job.events]


def narrations(job: Job) -> list[dict[str, Any]]:
    return [json.loads(d) for _, k, d in job.events if k == "narration"]


async def run(registry: JobRegistry, executor: Exec, op: OperationBase | None = None, **kw: Any) -> Job:
    job = registry.submit(op or Status(), executor, **kw)
    async with asyncio.timeout(10):
        await registry.wait(job)
    return job


@pytest.fixture
def registry() -> JobRegistry:
    return JobRegistry(actor="test")


# -- outcomes ------------------------------------------------------------------


async def test_tokens_then_exactly_one_end(registry: JobRegistry) -> None:
    async def executor(op: OperationBase) -> None:
        for text in ("token1", "token2"):
            await emit_token(text)

    job = await run(registry, executor)
    assert [json.loads(d)["t"] for _, k, d in job.events if k == "token"] == ["token1", "token2"]
    assert kinds(job).count("end") == 1 and kinds(job)[-1] == "end"
    assert end_of(job)["status"] == "completed" and end_of(job)["error"] is None
    assert job.status is JobStatus.COMPLETED


async def test_ten_tokens_arrive_in_order(registry: JobRegistry) -> None:
    async def executor(op: OperationBase) -> None:
        for i in range(10):
            await emit_token(f"t{i}")

    job = await run(registry, executor)
    tokens = [json.loads(d) for _, k, d in job.events if k == "token"]
    assert tokens == [{"t": f"t{i}", "i": i} for i in range(10)]


async def test_job_that_emits_nothing_still_ends(registry: JobRegistry) -> None:
    async def executor(op: OperationBase) -> None:
        return None

    job = await run(registry, executor)
    assert kinds(job)[-1] == "end" and end_of(job)["status"] == "completed"


async def test_failure_ends_failed_with_the_errors_message(registry: JobRegistry) -> None:
    async def executor(op: OperationBase) -> None:
        await emit_token("token1")
        raise WorkerFailed("Test error")

    job = await run(registry, executor)
    end = end_of(job)
    assert job.status is JobStatus.FAILED
    assert end["status"] == "failed"
    assert end["error"] == {"kind": "worker_failed", "message": "Test error"}
    assert kinds(job)[0] == "narration" and "token" in kinds(job)


async def test_executor_bug_ends_failed_with_kind_internal(registry: JobRegistry) -> None:
    async def executor(op: OperationBase) -> None:
        raise ValueError("division by zero somewhere")

    job = await run(registry, executor)
    end = end_of(job)
    assert end["status"] == "failed"
    assert end["error"]["kind"] == "internal"
    assert "division by zero somewhere" in end["error"]["message"]


async def test_failure_is_narrated_on_the_jobs_stream(registry: JobRegistry) -> None:
    async def executor(op: OperationBase) -> None:
        raise WorkerFailed("model exploded")

    job = await run(registry, executor)
    failed = [n for n in narrations(job) if n["action"] == "job_failed"]
    assert failed and "model exploded" in failed[0]["human"] and failed[0]["job_id"] == job.id


async def test_timeout_ends_timed_out(registry: JobRegistry) -> None:
    async def executor(op: OperationBase) -> None:
        await emit_token("token1")
        await asyncio.sleep(30)

    job = await run(registry, executor, timeout_s=0.1)
    end = end_of(job)
    assert job.status is JobStatus.TIMED_OUT
    assert end["status"] == "timed_out" and end["error"]["kind"] == "timed_out"
    assert "token" in kinds(job)


async def test_job_within_its_deadline_completes(registry: JobRegistry) -> None:
    async def executor(op: OperationBase) -> None:
        await asyncio.sleep(0.01)
        await emit_token("token1")

    job = await run(registry, executor, timeout_s=5)
    assert job.status is JobStatus.COMPLETED


async def test_inner_timeout_is_a_failure_not_the_jobs_deadline(registry: JobRegistry) -> None:
    async def executor(op: OperationBase) -> None:
        async with asyncio.timeout(0.01):
            await asyncio.sleep(1)

    job = await run(registry, executor, timeout_s=30)
    assert end_of(job)["status"] == "failed"


async def test_result_progress_and_end_fields_reach_the_log(registry: JobRegistry) -> None:
    async def executor(op: OperationBase) -> None:
        emit_progress("download", 1, 2, "bytes")
        emit_result({"models": ["a"]})
        set_end_fields(tokens_out=7)

    job = await run(registry, executor)
    assert "progress" in kinds(job) and "result" in kinds(job)
    assert end_of(job)["tokens_out"] == 7
    assert job.summary()["result"] == {"models": ["a"]}


# -- cancellation ----------------------------------------------------------------


async def test_cancel_running_job_ends_cancelled(registry: JobRegistry) -> None:
    started = asyncio.Event()

    async def executor(op: OperationBase) -> None:
        await emit_token("token1")
        started.set()
        await asyncio.sleep(30)

    job = registry.submit(Status(), executor)
    async with asyncio.timeout(10):
        await started.wait()
        assert registry.cancel(job.id) is job
        await registry.wait(job)
    end = end_of(job)
    assert job.status is JobStatus.CANCELLED
    assert end["status"] == "cancelled" and end["error"]["kind"] == "cancelled"
    assert kinds(job).count("end") == 1


async def test_cancel_queued_job_ends_cancelled_without_running(registry: JobRegistry) -> None:
    ran = False

    async def executor(op: OperationBase) -> None:
        nonlocal ran
        ran = True

    job = registry.submit(Status(), executor)
    assert job.status is JobStatus.QUEUED
    registry.cancel(job.id)
    async with asyncio.timeout(5):
        await registry.wait(job)
        events = [e async for e in job.stream()]
    assert not ran
    assert job.status is JobStatus.CANCELLED
    assert events[-1][1] == "end" and json.loads(events[-1][2])["status"] == "cancelled"
    assert registry.live == 0


@pytest.mark.parametrize("outcome", ["completed", "failed"])
async def test_cancel_finished_job_is_a_conflict_reporting_its_state(registry: JobRegistry, outcome: str) -> None:
    async def executor(op: OperationBase) -> None:
        if outcome == "failed":
            raise WorkerFailed("x")

    job = await run(registry, executor)
    with pytest.raises(JobConflict) as info:
        registry.cancel(job.id)
    assert info.value.data["status"] == outcome
    assert job.status.value == outcome


async def test_cancel_twice_is_a_conflict(registry: JobRegistry) -> None:
    async def executor(op: OperationBase) -> None:
        await asyncio.sleep(30)

    job = registry.submit(Status(), executor)
    await asyncio.sleep(0)
    registry.cancel(job.id)
    with pytest.raises(JobConflict):
        registry.cancel(job.id)
    async with asyncio.timeout(5):
        await registry.wait(job)


async def test_unknown_job_is_not_found(registry: JobRegistry) -> None:
    with pytest.raises(JobNotFound):
        registry.get("job-nope")
    with pytest.raises(JobNotFound):
        registry.cancel("job-nope")
    assert registry.find("job-nope") is None


async def test_cancellation_inside_the_executor_is_cancelled_not_failed(registry: JobRegistry) -> None:
    from rbee.errors import JobCancelled

    async def executor(op: OperationBase) -> None:
        raise JobCancelled("the worker was stopped")

    job = await run(registry, executor)
    assert end_of(job)["status"] == "cancelled"


async def test_aclose_ends_every_live_job(registry: JobRegistry) -> None:
    async def executor(op: OperationBase) -> None:
        await asyncio.sleep(30)

    running = registry.submit(Status(), executor)
    await asyncio.sleep(0)
    queued = registry.submit(Status(), executor)  # its task has not started yet
    async with asyncio.timeout(10):
        await registry.aclose(deadline_s=5)
    for job in (running, queued):
        assert job.ended and end_of(job)["status"] == "cancelled"
        assert "shutting down" in end_of(job)["error"]["message"]
    assert registry.live == 0


async def test_queue_full_when_too_many_jobs_are_live() -> None:
    registry = JobRegistry(actor="test", max_live_jobs=2)
    gate = asyncio.Event()

    async def executor(op: OperationBase) -> None:
        await gate.wait()

    jobs = [registry.submit(Status(), executor) for _ in range(2)]
    with pytest.raises(QueueFull):
        registry.submit(Status(), executor)
    gate.set()
    async with asyncio.timeout(5):
        for job in jobs:
            await registry.wait(job)
    registry.submit(Status(), executor)  # room again
    async with asyncio.timeout(5):
        await registry.aclose()


# -- job context -------------------------------------------------------------------


async def _nested(depth: int) -> None:
    narrate("nested", f"depth {depth}", depth=depth)
    if depth < 3:
        await _nested(depth + 1)


async def test_narration_from_nested_calls_and_spawned_tasks_carries_the_job_id(registry: JobRegistry) -> None:
    async def spawned(n: int) -> None:
        await asyncio.sleep(0.001 * n)
        narrate("spawned", f"task {n}", task=n)
        await emit_token(f"from task {n}")

    async def executor(op: OperationBase) -> None:
        await _nested(0)
        async with asyncio.TaskGroup() as tg:
            for n in range(3):
                tg.create_task(spawned(n))
        # A plain task (not in a group) inherits the context too.
        await asyncio.create_task(spawned(9))
        await asyncio.get_running_loop().run_in_executor(None, lambda: None)

    job = await run(registry, executor)
    events = narrations(job)
    assert [e["depth"] for e in events if e["action"] == "nested"] == [0, 1, 2, 3]
    assert sorted(e["task"] for e in events if e["action"] == "spawned") == [0, 1, 2, 9]
    assert all(e["job_id"] == job.id for e in events)
    assert all(e["actor"] == "test" for e in events)
    assert job.tokens == 4


async def test_narration_outside_a_job_reaches_no_jobs_stream(registry: JobRegistry) -> None:
    gate = asyncio.Event()

    async def executor(op: OperationBase) -> None:
        narrate("inside", "inside the job")
        await gate.wait()

    async def outsider() -> None:
        narrate("outside_task", "from a task started outside any job")

    jobs = [registry.submit(Status(), executor) for _ in range(3)]
    await asyncio.sleep(0.01)
    with narration.capture() as captured:
        narrate("outside", "from the test itself")
        await asyncio.create_task(outsider())
    gate.set()
    async with asyncio.timeout(5):
        for job in jobs:
            await registry.wait(job)
    assert [e["job_id"] for e in captured] == [None, None]
    for job in jobs:
        actions = [e["action"] for e in narrations(job)]
        assert "inside" in actions
        assert "outside" not in actions and "outside_task" not in actions
        assert all(e["job_id"] == job.id for e in narrations(job))


async def test_concurrent_jobs_keep_their_narration_apart(registry: JobRegistry) -> None:
    async def executor(op: OperationBase) -> None:
        assert isinstance(op, Infer)
        for i in range(5):
            narrate("say", op.prompt, i=i)
            await asyncio.sleep(0)

    jobs = [registry.submit(Infer(prompt=f"job {n}"), executor) for n in range(20)]
    async with asyncio.timeout(10):
        for job in jobs:
            await registry.wait(job)
    for job in jobs:
        assert isinstance(job.operation, Infer)
        said = [e["human"] for e in narrations(job) if e["action"] == "say"]
        assert said == [job.operation.prompt] * 5


async def test_current_job_is_the_running_job_and_absent_outside(registry: JobRegistry) -> None:
    seen: list[str] = []

    async def executor(op: OperationBase) -> None:
        seen.append(current_job().id)

    job = await run(registry, executor)
    assert seen == [job.id]
    with pytest.raises(RuntimeError):
        current_job()
    assert narration.current_job_id() is None


# -- bookkeeping hooks ---------------------------------------------------------------


class _Log(JobHooks):
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []

    def on_accepted(self, job: Job) -> None:
        self.seen.append(("accepted", job.id, job.status.value))

    def on_started(self, job: Job) -> None:
        self.seen.append(("started", job.id, job.status.value))

    def on_finished(self, job: Job, end: dict[str, Any]) -> None:
        self.seen.append(("finished", job.id, end["status"]))


async def test_hooks_see_each_step_of_a_job_in_order() -> None:
    first, second = _Log(), _Log()
    registry = JobRegistry(actor="test", hooks=[first, second])

    async def executor(op: OperationBase) -> None:
        raise WorkerFailed("no")

    job = await run(registry, executor)
    expected = [("accepted", job.id, "queued"), ("started", job.id, "running"), ("finished", job.id, "failed")]
    assert first.seen == expected and second.seen == expected


async def test_a_job_cancelled_before_it_ran_finishes_without_starting() -> None:
    log = _Log()
    registry = JobRegistry(actor="test", hooks=[log])

    async def executor(op: OperationBase) -> None:
        return None

    job = registry.submit(Status(), executor)
    registry.cancel(job.id)
    await registry.wait(job)
    assert log.seen == [("accepted", job.id, "queued"), ("finished", job.id, "cancelled")]


async def test_failing_hook_does_not_change_the_outcome_nor_the_other_hooks() -> None:
    class Broken(JobHooks):
        def on_accepted(self, job: Job) -> None:
            raise RuntimeError("disk full")

        def on_finished(self, job: Job, end: dict[str, Any]) -> None:
            raise RuntimeError("disk full")

    log = _Log()
    registry = JobRegistry(actor="test", hooks=[Broken(), log])

    async def executor(op: OperationBase) -> None:
        return None

    job = await run(registry, executor)
    assert end_of(job)["status"] == "completed"
    assert registry.live == 0
    assert [step for step, _, _ in log.seen] == ["accepted", "started", "finished"]


# -- cleanup and scale ----------------------------------------------------------------


async def test_terminal_jobs_leave_the_registry_after_the_ttl() -> None:
    registry = JobRegistry(actor="test", ttl_s=60)
    gate = asyncio.Event()

    async def quick(op: OperationBase) -> None:
        return None

    async def slow(op: OperationBase) -> None:
        await gate.wait()

    done = await run(registry, quick)
    live = registry.submit(Status(), slow)
    await asyncio.sleep(0)
    assert done.finished_at is not None
    assert registry.sweep(now=done.finished_at + 59) == 0
    assert registry.sweep(now=done.finished_at + 61) == 1
    assert registry.find(done.id) is None and registry.find(live.id) is live
    assert done.events == []  # released
    gate.set()
    async with asyncio.timeout(5):
        await registry.wait(live)
    assert registry.sweep(now=live.finished_at + 61) == 1  # type: ignore[operator]
    assert len(registry) == 0


async def test_many_concurrent_submits_get_unique_ids(registry: JobRegistry) -> None:
    async def executor(op: OperationBase) -> None:
        await asyncio.sleep(0)

    async def submit() -> str:
        await asyncio.sleep(0)
        return registry.submit(Status(), executor).id

    ids = await asyncio.gather(*(submit() for _ in range(500)))
    assert len(set(ids)) == 500
    assert all(i.startswith("job-") and len(i) == 40 for i in ids)
    assert len(registry) == 500
    async with asyncio.timeout(10):
        for jid in ids:
            await registry.wait(registry.get(jid))


def _live_jobs() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if type(obj) is Job)


async def test_thousand_concurrent_jobs_deliver_every_event_and_leave_nothing_behind() -> None:
    registry = JobRegistry(actor="test", ttl_s=0)
    n_jobs, n_tokens = 1000, 20
    baseline_tasks = len(asyncio.all_tasks())
    baseline_jobs = _live_jobs()

    async def executor(op: OperationBase) -> None:
        narrate("begin", "begin")
        for i in range(n_tokens):
            await emit_token(f"t{i}")
            if i % 5 == 0:
                await asyncio.sleep(0)
        emit_result({"n": n_tokens})

    async def client() -> tuple[list[str], dict[str, Any]]:
        job = registry.submit(Status(), executor)
        tokens: list[str] = []
        end: dict[str, Any] = {}
        ids: list[int] = []
        async for event_id, kind, data in job.stream():
            ids.append(event_id)
            if kind == "token":
                tokens.append(json.loads(data)["t"])
            elif kind == "end":
                end = json.loads(data)
        assert ids == list(range(1, len(ids) + 1))
        return tokens, end

    async with asyncio.timeout(60):
        results = await asyncio.gather(*(client() for _ in range(n_jobs)))
        await asyncio.sleep(0)

    for tokens, end in results:
        assert tokens == [f"t{i}" for i in range(n_tokens)]
        assert end["status"] == "completed"
    assert registry.live == 0
    assert all(job.task is not None and job.task.done() for job in registry.list(n_jobs))
    assert len(asyncio.all_tasks()) == baseline_tasks
    assert registry.sweep() == n_jobs
    assert len(registry) == 0
    del results
    assert _live_jobs() == baseline_jobs
