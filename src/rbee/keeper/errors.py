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
the queen could not do it now (409,    1
429, 5xx) or refused the token
bad input (400, 404, 413, 422: an      2
unknown model, hive or job, a field
out of range, a bad flag or URL)
interrupted (Ctrl-C)                   130
=====================================  ====
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
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
    "plain_reason",
    "problems_line",
    "FIELD_FLAGS",
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


#: The flag (or argument) of the keeper's commands each operation field comes from.
FIELD_FLAGS: dict[str, str] = {
    "max_tokens": "--max-tokens",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "top_k": "--top-k",
    "seed": "--seed",
    "stop": "--stop",
    "hive_id": "--hive",
    "worker_id": "WORKER_ID",
    "device": "--device",
    "timeout_s": "--timeout",
    "model": "--model",
    "prompt": "PROMPT",
    "alias": "--alias",
    "sha256": "--sha256",
    "source": "SOURCE",
    "keep_alive": "--keep-alive",
}

# pydantic's wording, and what a person reads instead.
_REASONS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^Input should be greater than or equal to (.+)$"), r"must be at least \1"),
    (re.compile(r"^Input should be less than or equal to (.+)$"), r"must be at most \1"),
    (re.compile(r"^Input should be greater than (.+)$"), r"must be more than \1"),
    (re.compile(r"^Input should be less than (.+)$"), r"must be less than \1"),
    (re.compile(r"^String should have at least 1 character$"), "must not be empty"),
    (re.compile(r"^String should have at least (\d+) characters?$"), r"must be at least \1 characters long"),
    (re.compile(r"^String should have at most (\d+) characters?$"), r"must be at most \1 characters long"),
    (re.compile(r"^(?:List|Tuple) should have at most (\d+) items?.*?(?:, not (\d+))?$"), r"takes at most \1 values"),
    (re.compile(r"^(?:List|Tuple) should have at least (\d+) items?.*$"), r"takes at least \1 values"),
    (re.compile(r"^Field required$"), "is required"),
    (re.compile(r"^Extra inputs are not permitted$"), "is not something this operation takes"),
    (re.compile(r"^Input should be a valid integer.*$"), "must be a whole number"),
    (re.compile(r"^Input should be a valid number.*$"), "must be a number"),
    (re.compile(r"^Input should be a valid string.*$"), "must be text"),
    (re.compile(r"^Input should be a valid boolean.*$"), "must be true or false"),
    (re.compile(r"^Input should be (.+)$"), r"must be \1"),
    (re.compile(r"^Value error, (.+)$"), r"\1"),
    (re.compile(r"^Assertion failed, (.+)$"), r"\1"),
]


def plain_reason(reason: str) -> str:
    """A validation reason in words a person reads ("must be at least 1", not pydantic's phrasing)."""
    text = " ".join(str(reason).split())
    for pattern, replacement in _REASONS:
        if pattern.match(text):
            return pattern.sub(replacement, text)
    return text


def _where(field: str, flags: Mapping[str, str]) -> str:
    """``--max-tokens`` for ``max_tokens`` (``stop.1`` is still ``--stop``), else the field as sent."""
    head = field.split(".", 1)[0]
    return flags.get(field) or flags.get(head) or field


def problems_line(problems: list[dict[str, Any]], flags: Mapping[str, str] = FIELD_FLAGS) -> str:
    """``--max-tokens must be at least 1; --top-p must be at most 1``."""
    parts = []
    for problem in problems:
        field = str(problem.get("field") or "")
        reason = plain_reason(str(problem.get("reason") or "is not valid"))
        parts.append(f"{_where(field, flags)} {reason}" if field and field != "request" else reason)
    return "; ".join(dict.fromkeys(parts))


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

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str | None = None,
        field: str | None = None,
        problems: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(with_hint(message, kind))
        self.status = status
        self.kind = kind
        self.field = field
        self.problems = problems or []

    @staticmethod
    def of(
        status: int,
        message: str,
        *,
        kind: str | None = None,
        field: str | None = None,
        problems: list[dict[str, Any]] | None = None,
    ) -> RequestRefused:
        """The refusal for an HTTP status: bad input (exit 2) for 400, 404, 413 and 422, else exit 1."""
        cls = InputRefused if status in BAD_INPUT_STATUSES else RequestRefused
        return cls(status, message, kind=kind, field=field, problems=problems)


#: What the queen answers for a request that cannot be right as sent: a malformed
#: request or id (400), an unknown model, hive, worker or job (404), too large (413),
#: a field out of range (422).
BAD_INPUT_STATUSES = frozenset({400, 404, 413, 422})


class InputRefused(RequestRefused):
    """The queen refused the request as wrong as given (400, 404, 413, 422): exit 2."""

    exit_code = EXIT_USAGE


class StreamBroken(KeeperError):
    """The event stream closed before the job's ``end`` event."""


#: Cancel reasons that say no more than "cancelled" does.
_PLAIN_CANCEL = frozenset({"", "cancelled", "cancelled by request"})


def end_line(end: dict[str, Any]) -> str:
    """``failed: <message> (hint)``, ``timed out: <message>``, ``cancelled`` for an ``end`` event's data.

    The error's kind picks the hint; it is not repeated in front of a message that says it in words.
    """
    status = str(end.get("status") or "unknown")
    raw = end.get("error")
    error: dict[str, Any] = raw if isinstance(raw, dict) else {}
    kind = str(error.get("kind") or status)
    message = str(error.get("message") or "").strip()
    for noise in (f"{kind}: ", f"{status}: "):  # "cancelled: cancelled: ..." says it twice
        message = message.removeprefix(noise)
    shown = status.replace("_", " ")
    if status == "cancelled":
        return shown if message.lower() in _PLAIN_CANCEL else f"{shown}: {message}"
    return f"{shown}: {with_hint(message or f'the job ended {shown}', kind)}"


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
