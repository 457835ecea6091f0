"""A job's record: the one shape of ``GET /v1/jobs/{id}`` and ``GET /v1/jobs``.

A live job (:meth:`rbee.jobs.job.Job.record`) and one read back from the
queen's history (:class:`rbee.queen.store.JobStore`) give the same type, and
the keeper reads the JSON back into it (:meth:`JobRecord.from_wire`), so what
a job's outcome is called is decided here once. Standard library only: the
keeper imports it.

The JSON keeps every key either shape ever had: the live fields (``events``,
``tokens``, ``narration_dropped``) only for a job in memory, ``payload`` and
``text`` only where known, and the fields of the job's ``end`` event
(``ttft_ms``, ``worker_id``, ``hive_id``, ``stop_reason``, ``failovers``...) at
the top level.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["JobRecord"]


@dataclass(frozen=True, slots=True)
class JobRecord:
    job_id: str
    operation: str
    status: str
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    #: From creation to the end event; None while the job runs.
    duration_ms: float | None = None
    tokens_in: int | None = None
    #: The tokens generated: the worker's count once it ended, else the token events so far.
    tokens_out: int | None = None
    #: ``{"kind", "message"}`` of a job that did not complete.
    error: dict[str, Any] | None = None
    #: The operation as it was submitted.
    payload: dict[str, Any] | None = None
    #: The text the job generated.
    text: str | None = None
    #: Events in the job's log: only for a job in memory.
    events: int | None = None
    #: Token events in the job's log: only for a job in memory.
    tokens: int | None = None
    narration_dropped: int | None = None
    result: Any = None
    #: The other fields of the job's end event (``ttft_ms``, ``worker_id``, ``hive_id``, ...).
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def worker_id(self) -> str | None:
        value = self.extra.get("worker_id")
        return value if isinstance(value, str) else None

    @property
    def hive_id(self) -> str | None:
        value = self.extra.get("hive_id")
        return value if isinstance(value, str) else None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "job_id": self.job_id,
            "operation": self.operation,
            "status": self.status,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "duration_ms": self.duration_ms,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "error": self.error,
        }
        if self.payload is not None:
            out["payload"] = self.payload
        if self.text is not None:
            out["text"] = self.text
        if self.events is not None:
            out["events"] = self.events
            out["tokens"] = self.tokens or 0
            out["narration_dropped"] = self.narration_dropped or 0
        if self.result is not None:
            out["result"] = self.result
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return out

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> JobRecord:
        """A record read back from JSON, from this queen or an older one.

        An older queen's live jobs said ``tokens`` where a record says
        ``tokens_out``, and gave no ``duration_ms`` until their record was
        written; both are read here, so callers see one shape.
        """
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        tokens_out = data.get("tokens_out")
        if tokens_out is None and data.get("tokens"):
            tokens_out = data["tokens"]
        duration = data.get("duration_ms")
        created, finished = data.get("created_at"), data.get("finished_at")
        if duration is None and isinstance(finished, int | float) and isinstance(created, int | float):
            duration = (finished - created) * 1000.0
        error, payload = data.get("error"), data.get("payload")
        return cls(
            job_id=str(data.get("job_id", "")),
            operation=str(data.get("operation", "")),
            status=str(data.get("status", "unknown")),
            created_at=float(created) if isinstance(created, int | float) else 0.0,
            started_at=data.get("started_at"),
            finished_at=finished,
            duration_ms=duration,
            tokens_in=data.get("tokens_in"),
            tokens_out=tokens_out,
            error=error if isinstance(error, dict) else None,
            payload=payload if isinstance(payload, dict) else None,
            text=data.get("text") if isinstance(data.get("text"), str) else None,
            events=data.get("events"),
            tokens=data.get("tokens"),
            narration_dropped=data.get("narration_dropped"),
            result=data.get("result"),
            extra={k: v for k, v in data.items() if k not in known},
        )
