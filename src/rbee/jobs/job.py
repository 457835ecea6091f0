"""One job: its state machine and its replayable event log.

The log is an append-only list of ``(id, kind, data_json)``; ids start at 1 and
equal the position in the list plus one, so a reconnecting client resumes with
``Last-Event-ID`` by slicing. Data is serialised once, when the event is added.

Flow control:

* tokens and results are never dropped. While a stream is attached, a producer
  more than :data:`TOKEN_WINDOW` events ahead of the slowest reader waits for it
  (a slow consumer slows the producer), up to :data:`STALL_LIMIT_S`; after that
  the producer goes on and the reader catches up from the log;
* narration and progress are best effort: past :data:`NARRATION_CAP` per job, or
  while readers lag far behind, they are dropped and counted, and the ``end``
  event says how many.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from rbee.contracts.events import TERMINAL, JobStatus
from rbee.contracts.operations import OperationBase
from rbee.errors import JobConflict
from rbee.jobs.record import JobRecord

__all__ = ["Job", "TOKEN_WINDOW", "NARRATION_CAP", "STALL_LIMIT_S", "Event", "Cursor"]

TOKEN_WINDOW = 256
NARRATION_CAP = 2_000
STALL_LIMIT_S = 30.0

Event = tuple[int, str, str]

_ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, *TERMINAL}),
    JobStatus.RUNNING: TERMINAL,
    JobStatus.COMPLETED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
    JobStatus.TIMED_OUT: frozenset(),
}

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode


class Cursor:
    """Where one reader is in a job's log (the index of the next event it reads)."""

    __slots__ = ("pos",)

    def __init__(self, pos: int) -> None:
        self.pos = pos


class Job:
    """A unit of work with a typed outcome and an event log."""

    __slots__ = (
        "_cursors",
        "_ended",
        "_space",
        "_t0",
        "_waiters",
        "cancel_reason",
        "created_at",
        "duration_ms",
        "end_fields",
        "error",
        "events",
        "finished_at",
        "id",
        "narration_dropped",
        "operation",
        "result",
        "started_at",
        "status",
        "task",
        "text",
        "timeout_s",
        "tokens",
    )

    def __init__(self, job_id: str, operation: OperationBase, *, timeout_s: float | None = None) -> None:
        self.id = job_id
        self.operation = operation
        self.status = JobStatus.QUEUED
        self.created_at = time.time()
        self._t0 = time.perf_counter()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.duration_ms: float | None = None
        self.timeout_s = timeout_s
        self.error: dict[str, Any] | None = None
        self.end_fields: dict[str, Any] = {}
        self.narration_dropped = 0
        self.tokens = 0
        self.text: list[str] = []
        self.result: Any = None
        self.task: asyncio.Task[None] | None = None
        self.cancel_reason: str | None = None
        self.events: list[Event] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._cursors: list[Cursor] = []
        self._space: list[asyncio.Future[None]] = []
        self._ended = False

    # -- state -------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @property
    def ended(self) -> bool:
        """True once the ``end`` event is in the log."""
        return self._ended

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self._t0) * 1000.0

    def transition(self, new: JobStatus) -> None:
        if new not in _ALLOWED[self.status]:
            raise JobConflict(f"job {self.id} cannot go from {self.status.value} to {new.value}")
        self.status = new
        now = time.time()
        if new is JobStatus.RUNNING:
            self.started_at = now
        elif new in TERMINAL:
            self.finished_at = now

    def record(self) -> JobRecord:
        """The job's record as it stands now (without its payload and text, which the caller adds when asked)."""
        fields = dict(self.end_fields)
        tokens_in = fields.pop("tokens_in", None)
        tokens_out = fields.pop("tokens_out", self.tokens or None)
        return JobRecord(
            job_id=self.id,
            operation=self.operation.name,
            status=self.status.value,
            created_at=self.created_at,
            started_at=self.started_at,
            finished_at=self.finished_at,
            duration_ms=self.duration_ms,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            error=self.error,
            events=len(self.events),
            tokens=self.tokens,
            narration_dropped=self.narration_dropped,
            result=self.result,
            extra=fields,
        )

    def summary(self) -> dict[str, Any]:
        """The record's JSON (``GET /v1/jobs/{id}``)."""
        return self.record().to_wire()

    # -- producing ---------------------------------------------------------

    def _append(self, kind: str, data: str) -> None:
        if self._ended:
            return  # nothing follows the end event
        self.events.append((len(self.events) + 1, kind, data))
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    def _lag(self) -> int:
        cursors = self._cursors
        if not cursors:
            return 0
        if len(cursors) == 1:  # the usual case, on every token
            return len(self.events) - cursors[0].pos
        return len(self.events) - min(c.pos for c in cursors)

    def add_narration(self, event: dict[str, Any]) -> None:
        if len(self.events) >= NARRATION_CAP + self.tokens or self._lag() > 4 * TOKEN_WINDOW:
            self.narration_dropped += 1
            return
        self._append("narration", _dumps(event))

    def add_progress(self, data: dict[str, Any]) -> None:
        if self._lag() > 4 * TOKEN_WINDOW:
            self.narration_dropped += 1
            return
        self._append("progress", _dumps(data))

    def add_result(self, data: Any) -> None:
        self.result = data
        self._append("result", _dumps(data))

    def add_raw(self, kind: str, data: str) -> None:
        """Append an already-serialised event (relays pass frames through)."""
        self._append(kind, data)

    async def add_token(self, text: str, ids: Sequence[int] = ()) -> None:
        """Append a token (with the model's token ``ids`` behind it, if given);
        waits while readers are far behind (lossless)."""
        index = self.tokens
        if index == 0:
            self.end_fields["ttft_ms"] = round(self.elapsed_ms(), 3)
        self.tokens += 1
        self.text.append(text)
        self._append("token", _dumps({"t": text, "i": index, "ids": list(ids)} if ids else {"t": text, "i": index}))
        if self._cursors and self._lag() > TOKEN_WINDOW:
            await self._wait_for_space()

    async def add_token_raw(self, text: str, data: str) -> None:
        """Append a token whose frame is already serialised (relays)."""
        if self.tokens == 0:
            self.end_fields["ttft_ms"] = round(self.elapsed_ms(), 3)
        self.tokens += 1
        self.text.append(text)
        self._append("token", data)
        if self._cursors and self._lag() > TOKEN_WINDOW:
            await self._wait_for_space()

    async def _wait_for_space(self) -> None:
        deadline = time.monotonic() + STALL_LIMIT_S
        loop = asyncio.get_running_loop()
        while self._cursors and self._lag() > TOKEN_WINDOW // 2:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return  # the reader catches up from the log
            fut: asyncio.Future[None] = loop.create_future()
            self._space.append(fut)
            try:
                await asyncio.wait_for(fut, remaining)
            except TimeoutError:
                return

    def _wake_space(self) -> None:
        if self._space:
            space, self._space = self._space, []
            for fut in space:
                if not fut.done():
                    fut.set_result(None)

    def finish(self, status: JobStatus, error: dict[str, Any] | None) -> dict[str, Any]:
        """Record the outcome and append the one ``end`` event."""
        if not self.done:
            self.transition(status)
        self.error = error
        self.duration_ms = round(self.elapsed_ms(), 3)
        end = {
            "job_id": self.id,
            "status": self.status.value,
            "error": error,
            "duration_ms": self.duration_ms,
            "narration_dropped": self.narration_dropped,
            **self.end_fields,
        }
        self._append("end", _dumps(end))
        self._ended = True
        self._wake_space()
        return end

    # -- consuming ---------------------------------------------------------

    def attach(self, after: int = 0) -> Cursor:
        """A reader's position, just after event id ``after``; the producer paces itself by it."""
        cursor = Cursor(max(0, min(after, len(self.events))))
        self._cursors.append(cursor)
        return cursor

    def detach(self, cursor: Cursor) -> None:
        self._cursors.remove(cursor)
        self._wake_space()

    def take(self, cursor: Cursor, limit: int) -> list[Event]:
        """The events after ``cursor`` (at most ``limit``), advancing it."""
        start = cursor.pos
        end = min(len(self.events), start + limit)
        if end <= start:
            return []
        cursor.pos = end
        if self._space and self._lag() <= TOKEN_WINDOW // 2:
            self._wake_space()
        return self.events[start:end]

    def next_event(self) -> asyncio.Future[None]:
        """A future resolved when the next event is appended.

        A reader may resolve it itself to stop waiting (a ping is due, the
        client left); :meth:`forget` then drops it.
        """
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        return fut

    def forget(self, fut: asyncio.Future[None]) -> None:
        try:
            self._waiters.remove(fut)
        except ValueError:
            pass  # already taken by an append

    async def stream(self, after: int = 0) -> AsyncIterator[Event]:
        """Yield every event after id ``after`` until (and including) ``end``."""
        cursor = self.attach(after)
        try:
            while True:
                while cursor.pos < len(self.events):
                    event = self.events[cursor.pos]
                    cursor.pos += 1
                    if self._space and self._lag() <= TOKEN_WINDOW // 2:
                        self._wake_space()
                    yield event
                if self._ended:
                    return
                await self.next_event()
        finally:
            self.detach(cursor)

    def release(self) -> None:
        """Drop what the job holds once it leaves the registry."""
        self.events = []
        self.text = []
