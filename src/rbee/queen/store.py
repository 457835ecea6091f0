"""The queen's job history, in SQLite under the rbee data directory.

A record is written when a job is created and completed when it ends, so a
queen that dies mid-job finds the interrupted jobs at its next start and marks
them ``failed`` with ``error.kind = "queen_restarted"``. Writes are small and
synchronous (WAL, ``synchronous=NORMAL``): a few tens of microseconds each.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

StoredEvent = tuple[int, str, str]

from rbee.jobs.job import Job

__all__ = ["JobStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id       TEXT PRIMARY KEY,
    operation    TEXT NOT NULL,
    payload      TEXT NOT NULL,
    status       TEXT NOT NULL,
    created_at   REAL NOT NULL,
    started_at   REAL,
    finished_at  REAL,
    duration_ms  REAL,
    tokens_in    INTEGER,
    tokens_out   INTEGER,
    error_kind   TEXT,
    error_message TEXT,
    text         TEXT,
    end_event    TEXT,
    events       TEXT
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_at);
"""

#: Events kept per job in the history (the end event is always kept).
MAX_STORED_EVENTS = 5_000


class JobStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    def mark_interrupted(self) -> int:
        """Jobs left running by a previous queen process end as failed."""
        cur = self.db.execute(
            "UPDATE jobs SET status='failed', error_kind='queen_restarted',"
            " error_message='the queen restarted while the job was running', finished_at=?"
            " WHERE status IN ('queued', 'running')",
            (time.time(),),
        )
        return cur.rowcount

    def created(self, job: Job) -> None:
        self.db.execute(
            "INSERT INTO jobs (job_id, operation, payload, status, created_at) VALUES (?, ?, ?, ?, ?)",
            (job.id, job.operation.name, json.dumps(job.operation.to_wire()), job.status.value, job.created_at),
        )

    def ended(self, job: Job, end: dict[str, Any]) -> None:
        error = end.get("error") or {}
        events = job.events
        if len(events) > MAX_STORED_EVENTS:
            events = events[: MAX_STORED_EVENTS - 1] + events[-1:]
        self.db.execute(
            "UPDATE jobs SET status=?, started_at=?, finished_at=?, duration_ms=?, tokens_in=?, tokens_out=?,"
            " error_kind=?, error_message=?, text=?, end_event=?, events=? WHERE job_id=?",
            (
                job.status.value,
                job.started_at,
                job.finished_at,
                end.get("duration_ms"),
                end.get("tokens_in"),
                end.get("tokens_out", job.tokens if job.tokens else None),
                error.get("kind"),
                error.get("message"),
                "".join(job.text) if job.text else None,
                json.dumps(end),
                json.dumps(events),
                job.id,
            ),
        )

    def _row(self, row: sqlite3.Row | tuple[Any, ...]) -> dict[str, Any]:
        (
            job_id,
            operation,
            payload,
            status,
            created,
            started,
            finished,
            duration,
            t_in,
            t_out,
            ekind,
            emsg,
            text,
            end,
        ) = row
        record: dict[str, Any] = {
            "job_id": job_id,
            "operation": operation,
            "status": status,
            "created_at": created,
            "started_at": started,
            "finished_at": finished,
            "duration_ms": duration,
            "tokens_in": t_in,
            "tokens_out": t_out,
            "error": {"kind": ekind, "message": emsg} if ekind else None,
            "payload": json.loads(payload),
        }
        if text is not None:
            record["text"] = text
        if end:
            end_event = json.loads(end)
            for key in ("ttft_ms", "tokens_per_s", "stop_reason", "worker_id", "hive_id"):
                if key in end_event:
                    record[key] = end_event[key]
        return record

    _COLUMNS = (
        "job_id, operation, payload, status, created_at, started_at, finished_at, duration_ms,"
        " tokens_in, tokens_out, error_kind, error_message, text, end_event"
    )

    def get(self, job_id: str) -> dict[str, Any] | None:
        row = self.db.execute(f"SELECT {self._COLUMNS} FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        return None if row is None else self._row(row)

    def recent(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = self.db.execute(f"SELECT {self._COLUMNS} FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,))
        return [self._row(r) for r in rows.fetchall()]

    def events(self, job_id: str) -> "list[StoredEvent] | None":
        row = self.db.execute("SELECT events FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        if row is None or row[0] is None:
            return None
        return [tuple(e) for e in json.loads(row[0])]  # type: ignore[misc]
