"""What can go wrong in the keeper, and the exit code each outcome gives.

This is the one place outcomes become exit codes. Every error is a
:class:`click.ClickException`, so click (and :func:`rbee.keeper.cli.main`)
prints it as one line, ``rbee: <message>``, and exits with its code; nothing
reaches the person as a traceback.

=====================================  ====
outcome                                exit
=====================================  ====
job ``completed``                      0
job failed, cancelled or timed out     1
stream closed without an ``end``       1
cannot reach or start the queen        1
the queen refused the request (4xx)    1
bad input (422, a bad flag or URL)     2
interrupted (Ctrl-C)                   130
=====================================  ====
"""

from __future__ import annotations

import sys
from typing import IO, Any

import click

__all__ = [
    "EXIT_OK",
    "EXIT_FAILED",
    "EXIT_USAGE",
    "EXIT_INTERRUPTED",
    "KeeperError",
    "BadSetting",
    "QueenUnreachable",
    "QueenStartFailed",
    "RequestRefused",
    "InputRefused",
    "StreamBroken",
    "JobEnded",
    "Interrupted",
    "end_line",
    "one_line",
    "with_hint",
    "HINTS",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def one_line(text: str, limit: int = 500) -> str:
    """Collapse text from a server into one printable line."""
    cleaned = "".join(ch if ch.isprintable() else " " for ch in str(text))
    cleaned = " ".join(cleaned.split())
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


#: What to do next, by error kind, for messages that do not say it themselves.
HINTS: dict[str, str] = {
    "model_not_found": "list models with `rbee model list --hive HIVE`; add one with `rbee model download SOURCE`",
    "hive_not_found": "list hives with `rbee hive list`; add one with `rbee hive start`",
    "hive_unreachable": "is its rbee-hive still running? see `rbee hive list`",
    "hive_offline": "is its rbee-hive still running? see `rbee hive list`",
    "no_worker": "see `rbee status` for the hives and workers",
    "worker_not_found": "list workers with `rbee worker list --hive HIVE`",
    "job_not_found": "list jobs with `rbee jobs list`",
    "queue_full": "try again in a few seconds",
    "worker_lost": "try again; `rbee status` shows the workers left",
    "timed_out": "give it more time with --timeout SECONDS",
    "download_failed": "check the source, then run the same download again",
}


def with_hint(message: str, kind: str | None) -> str:
    """``message (hint)`` when the kind has a hint and the message gives no command to run."""
    hint = HINTS.get(kind or "")
    if not hint or "`rbee " in message or "rbee " in message.split(";")[-1]:
        return message
    return f"{message} ({hint})"


class KeeperError(click.ClickException):
    """Something the person should read as one line on stderr."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"rbee: {self.format_message()}", file=file or sys.stderr)


class BadSetting(KeeperError):
    """A setting (the queen URL) cannot be used as given."""

    exit_code = EXIT_USAGE


class QueenUnreachable(KeeperError):
    """The queen did not answer at its URL."""

    def __init__(self, url: str, reason: str, *, hint: str | None = None, connect: bool = False) -> None:
        text = f"cannot reach the queen at {url}: {reason}"
        super().__init__(f"{text} ({hint})" if hint else text)
        self.url = url
        self.reason = reason
        #: True when nothing listened (connection refused): starting the queen may help.
        self.connect = connect


class QueenStartFailed(KeeperError):
    """The queen process could not be started or did not become ready."""


class RequestRefused(KeeperError):
    """The queen answered 4xx/5xx with ``{"error": {"kind", "message", "field"}}``."""

    def __init__(self, status: int, message: str, *, kind: str | None = None, field: str | None = None) -> None:
        super().__init__(with_hint(message, kind))
        self.status = status
        self.kind = kind
        self.field = field

    @staticmethod
    def of(status: int, message: str, *, kind: str | None = None, field: str | None = None) -> RequestRefused:
        """The refusal for an HTTP status: 422 is bad input (exit 2), anything else exit 1."""
        cls = InputRefused if status == 422 else RequestRefused
        return cls(status, message, kind=kind, field=field)


class InputRefused(RequestRefused):
    """The queen refused the operation as malformed or out of range (422)."""

    exit_code = EXIT_USAGE


class StreamBroken(KeeperError):
    """The event stream closed before the job's ``end`` event."""


def end_line(end: dict[str, Any]) -> str:
    """``<status>: <error.kind>: <error.message>`` for an ``end`` event's data."""
    status = str(end.get("status") or "unknown")
    raw = end.get("error")
    error: dict[str, Any] = raw if isinstance(raw, dict) else {}
    kind = str(error.get("kind") or status)
    message = str(error.get("message") or f"the job ended {status}")
    message = message.removeprefix(f"{kind}: ")  # "cancelled: cancelled: ..." says it twice
    return f"{status}: {kind}: {with_hint(message, kind if status != 'cancelled' else None)}"


class JobEnded(KeeperError):
    """The job ended other than ``completed``."""

    def __init__(self, end: dict[str, Any]) -> None:
        super().__init__(end_line(end))
        self.status = str(end.get("status"))
        self.end = end


class Interrupted(KeeperError):
    """Ctrl-C: the job was cancelled on the person's request."""

    exit_code = EXIT_INTERRUPTED

    def show(self, file: IO[Any] | None = None) -> None:
        if self.message:
            super().show(file)
