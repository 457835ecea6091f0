"""Where a daemon's process log goes: the journal when systemd runs it, else a log file that rotates.

* Under systemd (``INVOCATION_ID`` or ``JOURNAL_STREAM`` in the environment) a
  daemon writes to stdout and stderr only, which the journal keeps: no file of
  its own, and while stderr is the journal (:func:`writes_to_journal`) no
  timestamp (the journal stamps each line) and each line starts with its syslog
  priority (``<6>`` info, ``<4>`` warning...), which journald reads as the
  line's level.
* Started by the keeper, a daemon's stdout and stderr are its log file
  (``RBEE_LOG_FILE`` names it). Past ``RBEE_LOG_MAX_BYTES`` (10 MiB) the file
  becomes ``.1`` (``.1`` becomes ``.2``..., ``RBEE_LOG_BACKUPS`` of them, 3)
  and a new one takes over both descriptors, so tracebacks and uvicorn's own
  lines move with the log. The keeper rotates a large file before it starts a
  daemon on it too (:func:`rotate_if_large`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "LOG_FILE_ENV",
    "MAX_BYTES",
    "BACKUPS",
    "under_systemd",
    "writes_to_journal",
    "journal_renderer",
    "RotatingLog",
    "rotating_log",
    "rotate",
    "rotate_if_large",
]

LOG_FILE_ENV = "RBEE_LOG_FILE"
MAX_BYTES = 10 * 1024 * 1024
BACKUPS = 3

#: syslog priorities by structlog method name, which journald reads from ``<N>`` at a line's start.
_PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "critical": 2, "exception": 3}


def under_systemd(env: Mapping[str, str] | None = None) -> bool:
    """Whether systemd runs this process (its output then goes to the journal)."""
    env = os.environ if env is None else env
    return bool(env.get("INVOCATION_ID") or env.get("JOURNAL_STREAM"))


def writes_to_journal(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process's stderr is the journal: ``JOURNAL_STREAM`` names it (device:inode), or
    systemd runs the process and says nothing of its stream. A hive's workers inherit the hive's
    environment but write to files of their own, which keep their timestamps."""
    env = os.environ if env is None else env
    stream = env.get("JOURNAL_STREAM")
    if not stream:
        return bool(env.get("INVOCATION_ID"))
    try:
        dev, ino = (int(part) for part in stream.split(":"))
        ours = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (ours.st_dev, ours.st_ino) == (dev, ino)


def journal_renderer(inner: Callable[[Any, str, Any], str]) -> Callable[[Any, str, Any], str]:
    """``inner``'s line with its syslog priority in front, for the journal."""

    def render(logger: Any, method_name: str, event_dict: Any) -> str:
        return f"<{_PRIORITIES.get(method_name, 6)}>{inner(logger, method_name, event_dict)}"

    return render


def _int_env(name: str, default: int, env: Mapping[str, str]) -> int:
    try:
        return max(0, int(env.get(name, "")))
    except ValueError:
        return default


def rotate(path: Path, backups: int = BACKUPS) -> None:
    """``path`` -> ``path.1`` -> ``path.2``...; the oldest past ``backups`` goes."""
    if backups <= 0:
        path.unlink(missing_ok=True)
        return
    path.with_name(f"{path.name}.{backups}").unlink(missing_ok=True)
    for n in range(backups - 1, 0, -1):
        older = path.with_name(f"{path.name}.{n}")
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{n + 1}"))
    if path.exists():
        path.replace(path.with_name(f"{path.name}.1"))


def rotate_if_large(path: Path, env: Mapping[str, str] | None = None) -> bool:
    """Rotate ``path`` when it is past the size limit; True when it did."""
    env = os.environ if env is None else env
    try:
        large = path.stat().st_size > _int_env("RBEE_LOG_MAX_BYTES", MAX_BYTES, env)
    except OSError:
        return False
    if large:
        rotate(path, _int_env("RBEE_LOG_BACKUPS", BACKUPS, env))
    return large


class RotatingLog:
    """This process's stdout and stderr while they are the log file ``path``, kept under ``max_bytes``."""

    def __init__(self, path: Path, *, max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups

    def check(self) -> bool:
        """After a write: rotate when the file is past the limit; True when it did."""
        try:
            if os.fstat(2).st_size <= self.max_bytes:
                return False
            rotate(self.path, self.backups)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError:
            return False  # a full disk or a removed directory: keep writing where we were
        with contextlib.suppress(OSError):
            os.dup2(fd, 1)
            os.dup2(fd, 2)
        os.close(fd)
        return True


def rotating_log(env: Mapping[str, str] | None = None) -> RotatingLog | None:
    """The rotation of this daemon's log file: when ``RBEE_LOG_FILE`` names the file stderr is, outside systemd."""
    env = os.environ if env is None else env
    raw = env.get(LOG_FILE_ENV)
    if not raw or under_systemd(env):
        return None
    path = Path(raw)
    try:
        ours, theirs = os.fstat(2), path.stat()
    except OSError:
        return None
    if (ours.st_dev, ours.st_ino) != (theirs.st_dev, theirs.st_ino):
        return None  # stderr went somewhere else (a terminal, a pipe): nothing of ours to rotate
    return RotatingLog(
        path,
        max_bytes=_int_env("RBEE_LOG_MAX_BYTES", MAX_BYTES, env),
        backups=_int_env("RBEE_LOG_BACKUPS", BACKUPS, env),
    )
