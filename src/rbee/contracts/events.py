"""Events: what a job's stream carries.

Every SSE frame has an ``id:`` (1, 2, 3 ... per job), an ``event:`` kind and
one line of JSON ``data:``. These models document and parse the payloads;
servers build the hot ones (tokens) as plain dicts for speed.
"""

from __future__ import annotations

import enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from rbee.wire.protocol import DONE

__all__ = [
    "EventKind",
    "JobStatus",
    "TERMINAL",
    "NarrationEvent",
    "TokenEvent",
    "ProgressEvent",
    "ErrorInfo",
    "EndEvent",
    "DONE",
    "parse_event_data",
]

# The stream's last line, defined once for every server and client (rbee.wire.protocol).


class EventKind(enum.StrEnum):
    NARRATION = "narration"
    TOKEN = "token"
    PROGRESS = "progress"
    RESULT = "result"
    END = "end"


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.TIMED_OUT})


class _Event(BaseModel):
    model_config = ConfigDict(extra="allow")


class NarrationEvent(_Event):
    actor: str
    action: str
    target: str | None = None
    human: str
    job_id: str | None = None
    level: Literal["debug", "info", "warn", "error"] = "info"
    ts: float


class TokenEvent(_Event):
    t: str
    i: int


class ProgressEvent(_Event):
    action: str
    done: float
    total: float | None = None
    unit: str = ""


class ErrorInfo(BaseModel):
    kind: str
    message: str


class EndEvent(_Event):
    job_id: str
    status: JobStatus
    error: ErrorInfo | None = None
    duration_ms: float
    narration_dropped: int = 0


_MODELS: dict[str, type[BaseModel]] = {
    "narration": NarrationEvent,
    "token": TokenEvent,
    "progress": ProgressEvent,
    "end": EndEvent,
}


def parse_event_data(kind: str, data: dict[str, Any]) -> Any:
    """Validate one event's data against its model (``result`` data is free-form)."""
    model = _MODELS.get(kind)
    return data if model is None else model.model_validate(data)
