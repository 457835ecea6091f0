"""A job's record: one type for a live job and a stored one, and the JSON read back into it."""

from __future__ import annotations

from typing import Any

from rbee.jobs.record import JobRecord

STORED: dict[str, Any] = {
    "job_id": "job-1",
    "operation": "infer",
    "status": "completed",
    "created_at": 100.0,
    "started_at": 100.1,
    "finished_at": 101.5,
    "duration_ms": 1500.0,
    "tokens_in": 4,
    "tokens_out": 12,
    "error": None,
    "payload": {"operation": "infer", "prompt": "hi"},
    "text": "hello",
    "ttft_ms": 20.0,
    "worker_id": "worker-1",
    "hive_id": "alpha",
}


def test_a_record_read_back_gives_the_same_json() -> None:
    record = JobRecord.from_wire(STORED)
    assert (record.worker_id, record.hive_id, record.extra["ttft_ms"]) == ("worker-1", "alpha", 20.0)
    assert record.to_wire() == STORED


def test_an_older_queens_live_job_reads_as_a_record() -> None:
    # Before one record shape, a live job said ``tokens`` and no ``duration_ms`` or ``tokens_out``.
    older = {
        "job_id": "job-2",
        "operation": "infer",
        "status": "completed",
        "created_at": 100.0,
        "started_at": 100.5,
        "finished_at": 102.0,
        "error": None,
        "tokens": 9,
        "events": 14,
        "narration_dropped": 0,
    }
    record = JobRecord.from_wire(older)
    assert record.tokens_out == 9 and record.duration_ms == 2000.0
    assert record.events == 14 and record.payload is None


def test_live_fields_appear_only_for_a_job_in_memory() -> None:
    stored = JobRecord("job-3", "status", "completed", 1.0).to_wire()
    assert not {"events", "tokens", "narration_dropped", "payload", "text"} & set(stored)
    live = JobRecord("job-3", "status", "running", 1.0, events=2, tokens=0, narration_dropped=0).to_wire()
    assert (live["events"], live["tokens"], live["narration_dropped"]) == (2, 0, 0)
