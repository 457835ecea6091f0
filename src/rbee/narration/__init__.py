"""Narration: every step of a job's journey, told to whoever asked.

``narrate(action, human, **fields)`` may be called anywhere. The job context is
a :mod:`contextvars` value bound once around a job's executor
(:func:`bound`); asyncio copies it into every task started inside the job, so
nested calls and spawned tasks all reach the same job's stream. Outside a job,
narration goes to the process log only.

Sinks:

* the job's event stream (the bound job's ``add_narration``),
* the process log on stderr, structured (structlog): the journal's under systemd, else a
  log file that rotates (:mod:`rbee.narration.output`),
* :func:`capture`, for tests.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any, Protocol, TextIO, cast

import structlog

from rbee.narration.output import RotatingLog, journal_renderer, rotating_log, writes_to_journal

__all__ = [
    "JobSink",
    "narrate",
    "bound",
    "capture",
    "current_job",
    "current_job_id",
    "set_process_actor",
    "configure_logging",
    "log",
]


class JobSink(Protocol):
    """What narration needs from a job: its id and a place to put events."""

    id: str

    def add_narration(self, event: dict[str, Any]) -> None: ...


_job: ContextVar[JobSink | None] = ContextVar("rbee_job", default=None)
_actor: ContextVar[str | None] = ContextVar("rbee_actor", default=None)
_process_actor = "rbee"
_captures: list[list[dict[str, Any]]] = []
_log_level = logging.INFO
_rotation: RotatingLog | None = None
_TIMESTAMPER = structlog.processors.TimeStamper(fmt="iso", utc=True)
_configured = False
_logger: Any = None
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}
# structlog 25 renamed ``pad_event`` (now deprecated, a warning) to ``pad_event_to``.
_PAD_EVENT = (
    "pad_event_to"
    if "pad_event_to" in inspect.signature(structlog.dev.ConsoleRenderer.__init__).parameters
    else "pad_event"
)
_NO_PADDING: dict[str, Any] = {_PAD_EVENT: 0}


def set_process_actor(actor: str) -> None:
    """Name the component narrating when no job or binding says otherwise."""
    global _process_actor
    _process_actor = actor


def configure_logging(level: str | None = None, *, json_logs: bool | None = None) -> None:
    """Configure the process log sink (stderr). Idempotent.

    ``RBEE_LOG_LEVEL`` (debug, info, warn, error) and ``RBEE_LOG_JSON=1`` are read
    when the arguments are not given.
    """
    global _log_level, _configured, _logger
    _logger = None
    level = (level or os.environ.get("RBEE_LOG_LEVEL") or "info").lower()
    _log_level = _LEVELS.get(level, logging.INFO)
    if json_logs is None:
        json_logs = os.environ.get("RBEE_LOG_JSON", "") not in ("", "0", "false")
    renderer: Any = (
        structlog.processors.JSONRenderer() if json_logs else structlog.dev.ConsoleRenderer(colors=False, **_NO_PADDING)
    )
    global _rotation
    # The journal stamps every line itself and reads its level from the line's <N>.
    journal = writes_to_journal()
    processors: list[Any] = [journal_renderer(renderer)] if journal else [_TIMESTAMPER, renderer]
    _rotation = rotating_log()  # none under systemd
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_log_level),
        logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, _Stderr())),
        cache_logger_on_first_use=True,
    )
    _configured = True


class _Stderr:
    """Whatever ``sys.stderr`` is at write time (tests and daemons swap it); its log file is kept bounded."""

    def write(self, text: str) -> int:
        written = sys.stderr.write(text)
        if _rotation is not None:
            sys.stderr.flush()
            _rotation.check()
        return written

    def flush(self) -> None:
        sys.stderr.flush()


def log() -> Any:
    """The process log (a structlog logger writing to stderr)."""
    global _logger
    if not _configured:
        configure_logging()
    if _logger is None:
        # One proxy, kept: it caches its configured logger on first use, where a
        # fresh proxy per call would build the processor chain for every line.
        _logger = structlog.get_logger()
    return _logger


def current_job() -> JobSink | None:
    return _job.get()


def current_job_id() -> str | None:
    job = _job.get()
    return job.id if job is not None else None


@contextlib.contextmanager
def bound(job: JobSink | None = None, *, actor: str | None = None) -> Iterator[None]:
    """Bind a job (and optionally an actor) for everything narrated inside."""
    job_token = _job.set(job) if job is not None else None
    actor_token = _actor.set(actor) if actor is not None else None
    try:
        yield
    finally:
        if actor_token is not None:
            _actor.reset(actor_token)
        if job_token is not None:
            _job.reset(job_token)


def bind_in_context(job: JobSink, actor: str | None = None) -> None:
    """Bind for the rest of the current context (used inside ``Context.run``)."""
    _job.set(job)
    if actor is not None:
        _actor.set(actor)


def narrate(
    action: str,
    human: str,
    *,
    level: str = "info",
    target: str | None = None,
    actor: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Tell the job's audience (and the process log) about one step."""
    job = _job.get()
    event: dict[str, Any] = {
        "actor": actor or _actor.get() or _process_actor,
        "action": action,
        "target": target,
        "human": human,
        "job_id": job.id if job is not None else None,
        "level": level,
        "ts": time.time(),
    }
    if fields:
        event.update(fields)
    if job is not None:
        job.add_narration(event)
    if _LEVELS.get(level, logging.INFO) >= _log_level:
        try:
            _log_event(event)
        except (OSError, ValueError):  # a closed stderr must not break the job
            pass
    for sink in _captures:
        sink.append(event)
    return event


def _log_event(event: dict[str, Any]) -> None:
    logger = log()
    extra = {k: v for k, v in event.items() if k not in ("human", "level", "ts") and v is not None}
    method = {"debug": logger.debug, "warn": logger.warning, "error": logger.error}.get(event["level"], logger.info)
    method(event["human"], **extra)


@contextlib.contextmanager
def capture() -> Iterator[list[dict[str, Any]]]:
    """Collect every narration event emitted inside the block (for tests)."""
    events: list[dict[str, Any]] = []
    _captures.append(events)
    try:
        yield events
    finally:
        _captures.remove(events)
