"""Narration: context-carried job id, sinks, and what stays out of a job's stream."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest

from rbee import narration
from rbee.narration import bound, capture, narrate


class FakeJob:
    """The narration sink protocol: an id and somewhere to put events."""

    def __init__(self, job_id: str) -> None:
        self.id = job_id
        self.events: list[dict[str, Any]] = []

    def add_narration(self, event: dict[str, Any]) -> None:
        self.events.append(event)


def test_event_has_the_contract_fields() -> None:
    job = FakeJob("job-1")
    with bound(job, actor="queen"):
        event = narrate("model_loaded", "Loaded gemma3", model="gemma3-270m")
    assert event["actor"] == "queen"
    assert event["action"] == "model_loaded"
    assert event["human"] == "Loaded gemma3"
    assert event["job_id"] == "job-1"
    assert event["level"] == "info"
    assert event["target"] is None
    assert isinstance(event["ts"], float)
    assert event["model"] == "gemma3-270m"
    assert job.events == [event]


def test_narration_outside_a_job_reaches_no_job() -> None:
    job = FakeJob("job-1")
    with bound(job):
        pass
    with capture() as events:
        event = narrate("idle", "nothing bound")
    assert event["job_id"] is None
    assert job.events == []
    assert events == [event]


def test_bound_is_undone_on_exit_even_after_an_error() -> None:
    job = FakeJob("job-1")
    with pytest.raises(RuntimeError), bound(job, actor="hive"):
        raise RuntimeError("boom")
    assert narration.current_job() is None
    assert narrate("after", "after the block")["actor"] != "hive"


def test_inner_binding_wins_and_outer_is_restored() -> None:
    outer, inner = FakeJob("job-outer"), FakeJob("job-inner")
    with bound(outer):
        with bound(inner):
            narrate("a", "inner")
        narrate("b", "outer")
    assert [e["action"] for e in inner.events] == ["a"]
    assert [e["action"] for e in outer.events] == ["b"]


def _deep(depth: int) -> None:
    narrate("deep", f"depth {depth}", depth=depth)
    if depth < 4:
        _deep(depth + 1)


async def test_nested_calls_and_spawned_tasks_inherit_the_job() -> None:
    job = FakeJob("job-ctx")

    async def child(n: int) -> None:
        await asyncio.sleep(0)
        narrate("child", f"child {n}", n=n)

    with bound(job):
        _deep(0)
        async with asyncio.TaskGroup() as tg:
            for n in range(3):
                tg.create_task(child(n))
        # A task started inside keeps the job even if it outlives the block.
        late = asyncio.create_task(child(9))
    await late
    assert [e["depth"] for e in job.events if e["action"] == "deep"] == [0, 1, 2, 3, 4]
    assert sorted(e["n"] for e in job.events if e["action"] == "child") == [0, 1, 2, 9]
    assert {e["job_id"] for e in job.events} == {"job-ctx"}


async def test_task_started_outside_never_narrates_into_a_job() -> None:
    job = FakeJob("job-1")
    gate = asyncio.Event()

    async def outsider() -> dict[str, Any]:
        await gate.wait()
        return narrate("outside", "started before the job was bound")

    task = asyncio.create_task(outsider())
    with bound(job):
        gate.set()
        event = await task
    assert event["job_id"] is None
    assert job.events == []


async def test_thread_bridge_keeps_the_job() -> None:
    job = FakeJob("job-thread")
    with bound(job):
        await asyncio.to_thread(narrate, "in_thread", "from a worker thread")
    assert [e["action"] for e in job.events] == ["in_thread"]


def test_capture_collects_only_inside_its_block() -> None:
    narrate("before", "before")
    with capture() as events:
        narrate("during", "during", level="warn")
    narrate("after", "after")
    assert [(e["action"], e["level"]) for e in events] == [("during", "warn")]


def test_process_log_gets_narration_outside_a_job(capsys: pytest.CaptureFixture[str]) -> None:
    narration.configure_logging("info", json_logs=True)
    try:
        narrate("queen_started", "Queen listening on 127.0.0.1:7833", port=7833)
    finally:
        narration.configure_logging("info", json_logs=False)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    record = json.loads(line)
    assert record["action"] == "queen_started" and record["port"] == 7833
    assert record["event"] == "Queen listening on 127.0.0.1:7833"


def test_debug_narration_is_below_the_default_log_level(capsys: pytest.CaptureFixture[str]) -> None:
    narration.configure_logging("info")
    job = FakeJob("job-1")
    with bound(job):
        narrate("detail", "fine detail", level="debug")
    assert "fine detail" not in capsys.readouterr().err
    assert [e["action"] for e in job.events] == ["detail"]  # the job still gets it


def test_set_process_actor_names_narration_without_an_actor() -> None:
    narration.set_process_actor("hive")
    try:
        assert narrate("x", "y")["actor"] == "hive"
        with bound(actor="worker"):
            assert narrate("x", "y")["actor"] == "worker"
        assert narrate("x", "y", actor="keeper")["actor"] == "keeper"
    finally:
        narration.set_process_actor("rbee")


def test_configure_logging_emits_no_warnings(recwarn: pytest.WarningsRecorder) -> None:
    narration.configure_logging("debug")
    narration.configure_logging(None, json_logs=True)
    narration.configure_logging()
    assert len(recwarn) == 0


async def test_job_lifecycle_narration_is_plain_text() -> None:
    # Colour and symbols are the keeper renderer's business, never event data.
    from rbee.contracts.operations import Status
    from rbee.errors import WorkerFailed
    from rbee.jobs import JobRegistry

    registry = JobRegistry(actor="test")

    async def ok(op: object) -> None:
        return None

    async def bad(op: object) -> None:
        raise WorkerFailed("it broke")

    with capture() as events:
        for executor in (ok, bad):
            job = registry.submit(Status(), executor)
            async with asyncio.timeout(5):
                await registry.wait(job)
    assert {e["action"] for e in events} >= {"job_start", "job_done", "job_failed"}
    text = json.dumps(events, ensure_ascii=False)
    assert not re.search(r"\x1b\[|[\U0001F300-\U0001FAFF\u2600-\u27BF\u2705\u274C]", text)
