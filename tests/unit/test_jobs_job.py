"""One job: its state machine, its replayable event log and its flow control."""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest

from rbee.contracts.events import TERMINAL, JobStatus
from rbee.contracts.operations import Infer, Status
from rbee.errors import JobConflict
from rbee.jobs.job import NARRATION_CAP, TOKEN_WINDOW, Job


def make_job() -> Job:
    return Job("job-test", Status())


def narration(n: int) -> dict[str, object]:
    return {"actor": "test", "action": "step", "human": f"step {n}", "job_id": "job-test", "level": "info", "ts": 0.0}


# -- state machine -----------------------------------------------------------

VALID = {
    (JobStatus.QUEUED, JobStatus.RUNNING),
    *((JobStatus.QUEUED, s) for s in TERMINAL),
    *((JobStatus.RUNNING, s) for s in TERMINAL),
}


@pytest.mark.parametrize(("start", "new"), list(itertools.product(JobStatus, JobStatus)))
def test_only_valid_state_transitions_are_allowed(start: JobStatus, new: JobStatus) -> None:
    job = make_job()
    job.status = start
    if (start, new) in VALID:
        job.transition(new)
        assert job.status is new
    else:
        with pytest.raises(JobConflict):
            job.transition(new)
        assert job.status is start


def test_transitions_record_their_times() -> None:
    job = make_job()
    assert job.status is JobStatus.QUEUED and job.started_at is None
    job.transition(JobStatus.RUNNING)
    assert job.started_at is not None and job.finished_at is None
    job.transition(JobStatus.COMPLETED)
    assert job.finished_at is not None and job.finished_at >= job.started_at
    assert job.done


def test_terminal_job_cannot_go_back_to_running() -> None:
    job = make_job()
    job.transition(JobStatus.RUNNING)
    job.transition(JobStatus.FAILED)
    with pytest.raises(JobConflict, match="failed"):
        job.transition(JobStatus.RUNNING)


# -- the event log -------------------------------------------------------------


def test_event_ids_count_from_one() -> None:
    job = make_job()
    job.add_narration(narration(0))
    job.add_progress({"action": "load", "done": 1, "total": 2, "unit": "steps"})
    job.add_result({"ok": True})
    job.finish(JobStatus.COMPLETED, None)
    assert [e[0] for e in job.events] == [1, 2, 3, 4]
    assert [e[1] for e in job.events] == ["narration", "progress", "result", "end"]


def test_event_data_is_one_line_of_json() -> None:
    job = make_job()
    job.add_narration({**narration(0), "human": "two\nlines"})
    for _, _, data in job.events:
        assert "\n" not in data
        assert json.loads(data)["human"] == "two\nlines"


def test_finish_appends_exactly_one_end_and_nothing_after_it() -> None:
    job = make_job()
    job.transition(JobStatus.RUNNING)
    end = job.finish(JobStatus.FAILED, {"kind": "worker_failed", "message": "boom"})
    job.add_narration(narration(1))
    job.add_result({"late": True})
    assert [e[1] for e in job.events] == ["end"]
    assert end["status"] == "failed" and end["error"] == {"kind": "worker_failed", "message": "boom"}
    assert job.ended and job.done


async def test_tokens_are_numbered_from_zero() -> None:
    job = make_job()
    for text in ("Hel", "lo", "!"):
        await job.add_token(text)
    tokens = [json.loads(d) for _, kind, d in job.events if kind == "token"]
    assert tokens == [{"t": "Hel", "i": 0}, {"t": "lo", "i": 1}, {"t": "!", "i": 2}]
    assert job.tokens == 3 and "".join(job.text) == "Hello!"


async def test_stream_replays_everything_to_a_late_reader() -> None:
    job = make_job()
    job.add_narration(narration(0))
    await job.add_token("a")
    job.finish(JobStatus.COMPLETED, None)
    events = [e async for e in job.stream()]
    assert [e[0] for e in events] == [1, 2, 3]
    assert events[-1][1] == "end"


async def test_stream_resumes_after_a_given_event_id() -> None:
    job = make_job()
    for n in range(5):
        job.add_narration(narration(n))
    job.finish(JobStatus.COMPLETED, None)
    assert [e[0] async for e in job.stream(after=3)] == [4, 5, 6]
    assert [e[0] async for e in job.stream(after=99)] == []


async def test_stream_follows_a_live_job_until_its_end() -> None:
    job = make_job()
    got: list[int] = []

    async def read() -> None:
        async for event_id, _, _ in job.stream():
            got.append(event_id)

    async with asyncio.timeout(5):
        reader = asyncio.create_task(read())
        await asyncio.sleep(0)
        job.add_narration(narration(0))
        await asyncio.sleep(0)
        await job.add_token("x")
        job.finish(JobStatus.COMPLETED, None)
        await reader
    assert got == [1, 2, 3]


# -- flow control ----------------------------------------------------------------


async def test_slow_reader_gets_every_token_and_slows_the_producer() -> None:
    job = make_job()
    job.transition(JobStatus.RUNNING)
    n_tokens = 3 * TOKEN_WINDOW
    read = 0
    lag_seen_by_producer: list[int] = []

    async def produce() -> None:
        for i in range(n_tokens):
            await job.add_token(f"t{i}")
            lag_seen_by_producer.append(job.tokens - read)
        job.finish(JobStatus.COMPLETED, None)

    async def consume() -> list[dict[str, object]]:
        nonlocal read
        tokens = []
        async for _, kind, data in job.stream():
            if kind == "token":
                tokens.append(json.loads(data))
                read += 1
            await asyncio.sleep(0.0005)  # a slow reader
        return tokens

    async with asyncio.timeout(30):
        reader = asyncio.create_task(consume())
        await asyncio.sleep(0)  # the reader attaches before the first token
        await produce()
        tokens = await reader

    assert [t["i"] for t in tokens] == list(range(n_tokens))
    assert [t["t"] for t in tokens] == [f"t{i}" for i in range(n_tokens)]
    # Without back-pressure the producer (which never awaits anything else)
    # would finish with the reader still at the start; it waited instead.
    assert max(lag_seen_by_producer) <= TOKEN_WINDOW + 1
    assert lag_seen_by_producer[-1] < n_tokens - TOKEN_WINDOW


async def test_producer_without_readers_never_waits() -> None:
    job = make_job()
    async with asyncio.timeout(5):
        for i in range(4 * TOKEN_WINDOW):
            await job.add_token(str(i))
    assert job.tokens == 4 * TOKEN_WINDOW


async def test_narration_beyond_the_cap_is_dropped_and_counted() -> None:
    job = make_job()
    job.transition(JobStatus.RUNNING)
    attempted = NARRATION_CAP + 250
    for n in range(attempted):
        job.add_narration(narration(n))
    await job.add_token("still delivered")
    end = job.finish(JobStatus.COMPLETED, None)
    kept = sum(1 for e in job.events if e[1] == "narration")
    assert kept < attempted
    assert end["narration_dropped"] == attempted - kept == job.narration_dropped
    assert [e[1] for e in job.events][-2:] == ["token", "end"]


async def test_narration_is_dropped_while_a_reader_lags_far_behind_but_tokens_are_not() -> None:
    job = make_job()
    job.transition(JobStatus.RUNNING)
    job.add_narration(narration(0))
    stream = job.stream()
    first = await anext(stream)  # attached, then stalls
    assert first[0] == 1
    for n in range(4 * TOKEN_WINDOW + 10):
        job.add_progress({"action": "fill", "done": n, "total": None, "unit": ""})
    dropped_before = job.narration_dropped
    job.add_narration(narration(1))
    assert job.narration_dropped == dropped_before + 1
    await stream.aclose()


def test_release_drops_the_event_log() -> None:
    job = make_job()
    job.add_narration(narration(0))
    job.release()
    assert job.events == [] and job.text == []


def test_summary_reports_state_and_counts() -> None:
    job = Job("job-x", Infer(prompt="hi"), timeout_s=3)
    summary = job.summary()
    assert summary["job_id"] == "job-x"
    assert summary["operation"] == "infer"
    assert summary["status"] == "queued"
    assert summary["events"] == 0


async def test_a_live_record_has_every_key_of_both_old_shapes() -> None:
    job = Job("job-x", Infer(prompt="hi"))
    job.transition(JobStatus.RUNNING)
    await job.add_token("a")
    running = job.summary()
    # What a live job always said, and what a record from the history says.
    live_keys = {"job_id", "operation", "status", "created_at", "started_at", "finished_at", "error"}
    assert live_keys | {"tokens", "events", "narration_dropped"} <= set(running)
    assert {"duration_ms", "tokens_in", "tokens_out"} <= set(running)
    assert (running["tokens"], running["tokens_out"], running["duration_ms"]) == (1, 1, None)
    job.end_fields.update(tokens_in=3, tokens_out=7, worker_id="worker-1", ttft_ms=1.5)
    end = job.finish(JobStatus.COMPLETED, None)
    ended = job.summary()
    assert ended["tokens_out"] == 7 and ended["tokens_in"] == 3 and ended["tokens"] == 1
    assert ended["duration_ms"] == end["duration_ms"] and ended["worker_id"] == "worker-1"
    assert job.record().worker_id == "worker-1"
