"""The queen's job history, in SQLite under the rbee data directory.

A record is written when a job is created and completed when it ends, so a
queen that dies mid-job finds the interrupted jobs at its next start and marks
them ``failed`` with ``error.kind = "queen_restarted"``.

Writes are gathered and committed together (WAL, ``synchronous=NORMAL``): a
transaction costs about 60 µs however many rows it carries, so giving each of a
short job's two writes its own would cost the queen more than the rest of the
job. A new job's record is committed before its ``POST`` is answered
(:meth:`JobStore.durable`: every job created in the same turn of the event loop
shares one commit), so an accepted job is never lost with the queen; outcomes
wait up to :data:`FLUSH_DELAY_S` for company. Every read (and :meth:`close`)
commits what is pending first, so callers never see the delay.

The history keeps every token and result of a job. Past :data:`MAX_STORED_EVENTS`
events, narration and progress are dropped from the middle, and the stored
``end`` says how many (``history_dropped``). A job the queen was running when it
died gets a replayable log at the next start: a narration saying so and its
``end`` (``failed``, ``queen_restarted``).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rbee.jobs.job import Job
from rbee.jobs.record import JobRecord
from rbee.jobs.registry import JobHooks

__all__ = ["JobStore", "MAX_STORED_EVENTS", "FLUSH_DELAY_S"]

StoredEvent = tuple[int, str, str]

#: The fields of a stored job's end event that its record carries.
_END_FIELDS = ("ttft_ms", "tokens_per_s", "stop_reason", "worker_id", "hive_id", "history_dropped", "failovers")

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
    events       TEXT,
    owner        TEXT
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_at);
"""

#: Events kept per job in the history (the end event is always kept).
MAX_STORED_EVENTS = 5_000
#: How long writes wait to be committed together.
FLUSH_DELAY_S = 0.01

_INSERT = (
    "INSERT INTO jobs (job_id, operation, payload, status, created_at, owner, started_at, finished_at,"
    " duration_ms, tokens_in, tokens_out, error_kind, error_message, text, end_event, events)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_UPDATE = (
    "UPDATE jobs SET status=?, started_at=?, finished_at=?, duration_ms=?, tokens_in=?, tokens_out=?,"
    " error_kind=?, error_message=?, text=?, end_event=?, events=? WHERE job_id=?"
)


class JobStore(JobHooks):
    """The history, told of each job's steps (a :class:`~rbee.jobs.registry.JobHooks`).

    ``owner`` names the caller creating a job (the fingerprint of its token),
    asked when the job is accepted.
    """

    def __init__(self, path: Path, *, owner: Callable[[], str | None] | None = None) -> None:
        self.path = path
        self._owner = owner
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(jobs)")}
        if "owner" not in columns:  # a history written before jobs had owners
            self.db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT")
        # Writes not yet committed: new jobs (a whole row, completed in place
        # if the job ends first) and the outcomes of jobs already written.
        self._inserts: dict[str, list[Any]] = {}
        self._updates: list[tuple[Any, ...]] = []
        self._starts: list[tuple[Any, ...]] = []
        self._flush_soon: asyncio.TimerHandle | asyncio.Handle | None = None
        self._flush_next_turn = False
        #: Callers waiting for their job's record to be committed (see :meth:`durable`).
        self._waiters: list[asyncio.Future[None]] = []

    def close(self) -> None:
        self.flush()
        self.db.close()

    def flush(self) -> None:
        """Commit every pending write, in one transaction."""
        if self._flush_soon is not None:
            self._flush_soon.cancel()
            self._flush_soon = None
        self._flush_next_turn = False
        waiters, self._waiters = self._waiters, []
        try:
            if not self._inserts and not self._updates and not self._starts:
                return
            inserts, self._inserts = list(self._inserts.values()), {}
            updates, self._updates = self._updates, []
            starts, self._starts = self._starts, []
            self.db.execute("BEGIN")
            try:
                if inserts:
                    self.db.executemany(_INSERT, inserts)
                if starts:  # before outcomes: a job that started and ended in one batch ends finished
                    self.db.executemany(
                        "UPDATE jobs SET status=?, started_at=? WHERE job_id=? AND finished_at IS NULL", starts
                    )
                if updates:
                    self.db.executemany(_UPDATE, updates)
            except BaseException as exc:
                self.db.execute("ROLLBACK")
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(exc)
                waiters = []
                raise
            self.db.execute("COMMIT")
        finally:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def durable(self) -> None:
        """Return once every record written so far is committed (group commit at the next loop turn)."""
        if not self._inserts and not self._updates:
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        if not self._flush_next_turn:
            # Sooner than the outcome timer: at the next turn, after the other POSTs of this one.
            # (A flag, not the handle's type: uvloop's handles are not asyncio's classes.)
            if self._flush_soon is not None:
                self._flush_soon.cancel()
            self._flush_soon = loop.call_soon(self._flush_now)
            self._flush_next_turn = True
        await waiter

    def _later(self) -> None:
        if self._flush_soon is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a script, a synchronous test): write now
            self.flush()
            return
        self._flush_soon = loop.call_later(FLUSH_DELAY_S, self._flush_now)

    def _flush_now(self) -> None:
        self._flush_soon = None
        self.flush()

    def mark_interrupted(self) -> int:
        """Jobs left running by a previous queen process end as failed, with a log to replay."""
        self.flush()
        now = time.time()
        message = "the queen restarted while the job was running"
        rows = self.db.execute("SELECT job_id, created_at FROM jobs WHERE status IN ('queued', 'running')").fetchall()
        updates = []
        for job_id, created_at in rows:
            end = {
                "job_id": job_id,
                "status": "failed",
                "error": {"kind": "queen_restarted", "message": message},
                "duration_ms": round(max(0.0, now - created_at) * 1000.0, 3),
                "narration_dropped": 0,
            }
            narration = {
                "actor": "queen",
                "action": "job_interrupted",
                "human": "The queen stopped while this job ran; what it streamed until then was not kept",
                "job_id": job_id,
                "level": "error",
                "ts": now,
            }
            events = [[1, "narration", json.dumps(narration)], [2, "end", json.dumps(end)]]
            updates.append((message, now, end["duration_ms"], json.dumps(end), json.dumps(events), job_id))
        self.db.execute("BEGIN")
        self.db.executemany(
            "UPDATE jobs SET status='failed', error_kind='queen_restarted', error_message=?,"
            " finished_at=?, duration_ms=?, end_event=?, events=? WHERE job_id=?",
            updates,
        )
        self.db.execute("COMMIT")
        return len(updates)

    # -- job hooks -------------------------------------------------------

    def on_accepted(self, job: Job) -> None:
        self.created(job, owner=self._owner() if self._owner is not None else None)

    def on_started(self, job: Job) -> None:
        self.started(job)

    def on_finished(self, job: Job, end: dict[str, Any]) -> None:
        self.ended(job, end)

    # -- writes ----------------------------------------------------------

    def created(self, job: Job, owner: str | None = None) -> None:
        """Record a new job; ``owner`` is the fingerprint of the token that created it."""
        payload = json.dumps(job.operation.to_wire())
        self._inserts[job.id] = [job.id, job.operation.name, payload, job.status.value, job.created_at, owner]
        self._inserts[job.id].extend([None] * 10)
        self._later()

    def started(self, job: Job) -> None:
        """The job began running (its record gets ``started_at``, with the next commit)."""
        row = self._inserts.get(job.id)
        if row is not None:
            row[3] = job.status.value
            row[6] = job.started_at
        else:
            self._starts.append((job.status.value, job.started_at, job.id))
        self._later()

    def owner(self, job_id: str) -> tuple[bool, str | None]:
        """Whether the job is known, and its owner (None: created without a token)."""
        self.flush()
        row = self.db.execute("SELECT owner FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        return (False, None) if row is None else (True, row[0])

    def ended(self, job: Job, end: dict[str, Any]) -> None:
        error = end.get("error") or {}
        events = job.events
        if len(events) > MAX_STORED_EVENTS:
            events, dropped = _bounded(events)
            if dropped:
                end = {**end, "history_dropped": dropped}
                last = events[-1]
                if last[1] == "end":
                    events[-1] = (last[0], last[1], json.dumps({**json.loads(last[2]), "history_dropped": dropped}))
        outcome = (
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
        )
        row = self._inserts.get(job.id)
        if row is not None:
            # Created and ended within one turn: one row, written finished.
            row[3] = outcome[0]
            row[6:] = outcome[1:]
        else:
            self._updates.append((*outcome, job.id))
        self._later()

    def _record(self, row: sqlite3.Row | tuple[Any, ...]) -> JobRecord:
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
        extra: dict[str, Any] = {}
        if end:
            end_event = json.loads(end)
            extra = {key: end_event[key] for key in _END_FIELDS if key in end_event}
        return JobRecord(
            job_id=job_id,
            operation=operation,
            status=status,
            created_at=created,
            started_at=started,
            finished_at=finished,
            duration_ms=duration,
            tokens_in=t_in,
            tokens_out=t_out,
            error={"kind": ekind, "message": emsg} if ekind else None,
            payload=json.loads(payload),
            text=text,
            extra=extra,
        )

    _COLUMNS = (
        "job_id, operation, payload, status, created_at, started_at, finished_at, duration_ms,"
        " tokens_in, tokens_out, error_kind, error_message, text, end_event"
    )

    def record(self, job_id: str) -> JobRecord | None:
        self.flush()
        row = self.db.execute(f"SELECT {self._COLUMNS} FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        return None if row is None else self._record(row)

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job's record as JSON (``GET /v1/jobs/{id}``), None for an unknown job."""
        record = self.record(job_id)
        return None if record is None else record.to_wire()

    def matching(self, prefix: str, limit: int = 10) -> list[str]:
        """The ids that start with ``prefix`` (at most ``limit``), for short job ids.

        A range on the primary key rather than ``LIKE``, so the index answers it.
        """
        self.flush()
        if not prefix:
            return []
        upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        rows = self.db.execute(
            "SELECT job_id FROM jobs WHERE job_id >= ? AND job_id < ? ORDER BY created_at DESC LIMIT ?",
            (prefix, upper, limit),
        )
        return [row[0] for row in rows.fetchall()]

    def records(self, limit: int = 100, *, owner: str | None = None) -> list[JobRecord]:
        """The newest jobs; with ``owner``, only the jobs that token created."""
        self.flush()
        if owner is None:
            rows = self.db.execute(f"SELECT {self._COLUMNS} FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,))
        else:
            rows = self.db.execute(
                f"SELECT {self._COLUMNS} FROM jobs WHERE owner=? ORDER BY created_at DESC LIMIT ?", (owner, limit)
            )
        return [self._record(r) for r in rows.fetchall()]

    def recent(self, limit: int = 100, *, owner: str | None = None) -> list[dict[str, Any]]:
        """:meth:`records` as JSON (``GET /v1/jobs``)."""
        return [record.to_wire() for record in self.records(limit, owner=owner)]

    def events(self, job_id: str) -> list[StoredEvent] | None:
        self.flush()
        row = self.db.execute("SELECT events FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        if row is None or row[0] is None:
            return None
        return [tuple(e) for e in json.loads(row[0])]  # type: ignore[misc]


#: Events the history never drops: what the job produced.
_KEPT = frozenset({"token", "result", "end"})


def _bounded(events: list[Any]) -> tuple[list[Any], dict[str, int]]:
    """At most :data:`MAX_STORED_EVENTS` events where that can be done without losing output:
    every token, result and end stays; narration and progress fill what room is left, oldest first."""
    kept = sum(1 for e in events if e[1] in _KEPT)
    room = max(0, MAX_STORED_EVENTS - kept)
    out = []
    dropped: dict[str, int] = {}
    for event in events:
        if event[1] in _KEPT:
            out.append(event)
        elif room > 0:
            out.append(event)
            room -= 1
        else:
            dropped[event[1]] = dropped.get(event[1], 0) + 1
    return out, dropped
