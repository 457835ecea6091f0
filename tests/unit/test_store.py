"""The queen's job history in SQLite: records survive a restart; interrupted jobs end failed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rbee.contracts.events import JobStatus
from rbee.contracts.operations import Infer, OperationBase, Status
from rbee.errors import WorkerFailed
from rbee.jobs import JobRegistry, emit_result, emit_token, set_end_fields
from rbee.jobs.job import Job
from rbee.queen.store import MAX_STORED_EVENTS, JobStore


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "queen.sqlite"


@pytest.fixture
def store(db: Path) -> Iterator[JobStore]:
    s = JobStore(db)
    yield s
    s.close()


def registry_for(store: JobStore) -> JobRegistry:
    return JobRegistry(actor="queen", hooks=[store])


async def run(registry: JobRegistry, op: OperationBase, executor: Any) -> Job:
    job = registry.submit(op, executor)
    async with asyncio.timeout(10):
        await registry.wait(job)
    return job


async def test_created_job_is_recorded_as_queued(store: JobStore) -> None:
    job = Job("job-1", Infer(prompt="hello", max_tokens=5))
    store.created(job)
    record = store.get("job-1")
    assert record is not None
    assert record["status"] == "queued"
    assert record["operation"] == "infer"
    assert record["payload"]["prompt"] == "hello" and record["payload"]["max_tokens"] == 5
    assert record["error"] is None


async def test_completed_job_keeps_its_outcome_text_and_events(store: JobStore) -> None:
    registry = registry_for(store)

    async def executor(op: OperationBase) -> None:
        for t in ("Hel", "lo"):
            await emit_token(t)
        emit_result({"ok": True})
        set_end_fields(ttft_ms=1.5, worker_id="worker-1")

    job = await run(registry, Infer(prompt="hi"), executor)
    record = store.get(job.id)
    assert record is not None
    assert record["status"] == "completed"
    assert record["text"] == "Hello"
    assert record["tokens_out"] == 2
    assert record["ttft_ms"] == 1.5 and record["worker_id"] == "worker-1"
    assert record["duration_ms"] is not None and record["finished_at"] >= record["started_at"]
    events = store.events(job.id)
    assert events == [tuple(e) for e in job.events]
    assert events is not None and events[-1][1] == "end"


async def test_failed_job_keeps_its_error(store: JobStore) -> None:
    registry = registry_for(store)

    async def executor(op: OperationBase) -> None:
        raise WorkerFailed("out of memory")

    job = await run(registry, Status(), executor)
    record = store.get(job.id)
    assert record is not None
    assert record["status"] == "failed"
    assert record["error"] == {"kind": "worker_failed", "message": "out of memory"}


async def test_records_survive_a_restart(db: Path) -> None:
    first = JobStore(db)
    registry = registry_for(first)

    async def executor(op: OperationBase) -> None:
        await emit_token("x")

    ids = [(await run(registry, Status(), executor)).id for _ in range(3)]
    first.close()

    second = JobStore(db)
    try:
        assert second.mark_interrupted() == 0
        listed = second.recent(10)
        assert [r["job_id"] for r in listed] == ids[::-1]
        assert all(r["status"] == "completed" for r in listed)
        stored = second.events(ids[0])
        assert stored is not None and stored[-1][1] == "end"
    finally:
        second.close()


def test_jobs_left_running_are_marked_failed_queen_restarted(db: Path) -> None:
    first = JobStore(db)
    queued = Job("job-queued", Status())
    running = Job("job-running", Infer(prompt="long"))
    done = Job("job-done", Status())
    for job in (queued, running, done):
        first.created(job)
    running.transition(JobStatus.RUNNING)
    done.transition(JobStatus.RUNNING)
    first.ended(done, done.finish(JobStatus.COMPLETED, None))
    first.close()  # the queen dies here

    second = JobStore(db)
    try:
        assert second.mark_interrupted() == 2
        for job_id in ("job-queued", "job-running"):
            record = second.get(job_id)
            assert record is not None
            assert record["status"] == "failed"
            assert record["error"]["kind"] == "queen_restarted"
            assert record["finished_at"] is not None
        assert second.get("job-done")["status"] == "completed"  # type: ignore[index]
        assert second.mark_interrupted() == 0  # idempotent
    finally:
        second.close()


def test_unknown_job_has_no_record(store: JobStore) -> None:
    assert store.get("job-nope") is None
    assert store.events("job-nope") is None


def test_job_still_running_has_no_stored_events(store: JobStore) -> None:
    store.created(Job("job-live", Status()))
    assert store.events("job-live") is None


def test_list_is_newest_first_and_limited(store: JobStore) -> None:
    jobs = [Job(f"job-{n}", Status()) for n in range(5)]
    for n, job in enumerate(jobs):
        job.created_at = 1000.0 + n
        store.created(job)
    assert [r["job_id"] for r in store.recent(3)] == ["job-4", "job-3", "job-2"]


def test_stored_events_are_bounded_but_keep_the_end(store: JobStore) -> None:
    job = Job("job-big", Status())
    store.created(job)
    job.transition(JobStatus.RUNNING)
    for n in range(MAX_STORED_EVENTS + 100):
        job.add_raw("narration", json.dumps({"n": n}))
    end = job.finish(JobStatus.COMPLETED, None)
    store.ended(job, end)
    events = store.events("job-big")
    assert events is not None
    assert len(events) == MAX_STORED_EVENTS
    assert events[-1][1] == "end"
    # Never silently: the stored end says what was left out.
    assert json.loads(events[-1][2])["history_dropped"] == {"narration": 101}
    assert store.get("job-big")["history_dropped"] == {"narration": 101}  # type: ignore[index]


def test_every_token_of_a_long_job_is_kept(store: JobStore) -> None:
    job = Job("job-long", Infer(prompt="long"))
    store.created(job)
    job.transition(JobStatus.RUNNING)
    for n in range(6_000):
        job.add_raw("token", json.dumps({"t": f"w{n} ", "i": n}))
        if n % 10 == 0:
            job.add_raw("narration", json.dumps({"n": n}))
    store.ended(job, job.finish(JobStatus.COMPLETED, None))
    events = store.events("job-long")
    assert events is not None
    tokens = [json.loads(data)["i"] for _, kind, data in events if kind == "token"]
    assert tokens == list(range(6_000))
    assert events[-1][1] == "end" and json.loads(events[-1][2])["history_dropped"] == {"narration": 600}
    # Replay from an id in the middle still has the tokens after it.
    assert [e for e in events if e[0] > 5_500 and e[1] == "token"]


def test_an_interrupted_job_has_a_log_to_replay(db: Path) -> None:
    first = JobStore(db)
    running = Job("job-running", Infer(prompt="long"))
    first.created(running)
    first.flush()
    running.transition(JobStatus.RUNNING)
    first.started(running)
    first.close()  # the queen dies here
    second = JobStore(db)
    try:
        assert second.mark_interrupted() == 1
        events = second.events("job-running")
        assert events is not None and [kind for _, kind, _ in events] == ["narration", "end"]
        end = json.loads(events[-1][2])
        assert end["status"] == "failed" and end["error"]["kind"] == "queen_restarted"
        assert json.loads(events[0][2])["action"] == "job_interrupted"
        record = second.get("job-running")
        assert record is not None and record["error"]["kind"] == "queen_restarted"
        assert record["started_at"] == running.started_at is not None  # when it began is kept
    finally:
        second.close()


async def test_a_job_is_committed_before_its_post_is_answered(store: JobStore, db: Path) -> None:
    import sqlite3

    from rbee.jobs.api import JobServer

    async def executor(op: OperationBase) -> None:
        await asyncio.sleep(10)

    registry = registry_for(store)
    server = JobServer(registry, executor, durable=store.durable)
    jobs = await asyncio.gather(*(server.submit(Status()) for _ in range(5)))
    # Another connection (another process, after a crash) already sees every one of them.
    other = sqlite3.connect(str(db))
    try:
        found = {row[0] for row in other.execute("SELECT job_id FROM jobs")}
    finally:
        other.close()
    assert {job.id for job in jobs} <= found
    await registry.aclose()
