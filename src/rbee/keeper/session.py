"""One command line's view of the queen: where it is, how to reach it, how to run a job there.

:class:`Session` resolves the global options (``--queen-url``, ``--token``,
``-q``, ``-v``, ``--json``, given before or after the command) lazily, owns the
HTTP client and the renderer, starts the queen when it is not running (only at
the configured or default URL, on this machine, unless ``RBEE_NO_AUTOSTART`` is
set: a ``--queen-url`` that names another place is never given a queen of its
own), and runs jobs: submit, render the stream, turn the ``end`` event into an
outcome, and handle Ctrl-C by cancelling the job and reading on to its end.
"""

from __future__ import annotations

import os
import time
from functools import cached_property
from typing import Any
from urllib.parse import urlsplit

from rbee.config import ConfigError, KeeperConfig, is_loopback, load_config, resolve_queen_url, resolve_token
from rbee.keeper.client import QueenClient
from rbee.keeper.errors import (
    FIELD_FLAGS,
    BadSetting,
    InputRefused,
    Interrupted,
    JobEnded,
    KeeperError,
    QueenUnreachable,
    end_line,
    problems_line,
)
from rbee.keeper.render import Renderer
from rbee.wire.protocol import short_job_id as short_id

__all__ = ["Session", "CANCEL_GRACE_S", "autostart_disabled", "short_id"]

#: After Ctrl-C, how long the keeper waits for the job's ``end`` event.
CANCEL_GRACE_S = 5.0


def _same_url(a: str, b: str) -> bool:
    pa, pb = urlsplit(a.rstrip("/")), urlsplit(b.rstrip("/"))
    try:
        ports = (pa.port or (443 if pa.scheme == "https" else 80), pb.port or (443 if pb.scheme == "https" else 80))
    except ValueError:
        return False
    hosts = [h if h not in ("localhost", "::1") else "127.0.0.1" for h in (pa.hostname or "", pb.hostname or "")]
    return pa.scheme == pb.scheme and hosts[0] == hosts[1] and ports[0] == ports[1] and pa.path == pb.path


def autostart_disabled() -> bool:
    return os.environ.get("RBEE_NO_AUTOSTART", "").strip().lower() not in ("", "0", "false", "no")


class Session:
    """The resolved options of one ``rbee`` invocation."""

    def __init__(
        self,
        *,
        queen_url: str | None = None,
        token: str | None = None,
        quiet: bool = False,
        json_mode: bool = False,
        verbose: bool = False,
    ) -> None:
        self._url_flag = queen_url
        self._token_flag = token
        self.quiet = quiet
        self.json_mode = json_mode
        self.verbose = verbose

    def set_flags(self, *, queen_url: str | None = None, token: str | None = None) -> None:
        """``--queen-url`` / ``--token`` given after the command (before anything used them)."""
        if queen_url:
            self._url_flag = queen_url
            self.__dict__.pop("url", None)
            self.__dict__.pop("client", None)
        if token:
            self._token_flag = token
            self.__dict__.pop("token", None)
            self.__dict__.pop("client", None)

    # -- settings ----------------------------------------------------------

    @property
    def url_flag(self) -> str | None:
        """``--queen-url`` as given, if it was."""
        return self._url_flag

    @property
    def token_flag(self) -> str | None:
        return self._token_flag

    @cached_property
    def config(self) -> KeeperConfig:
        try:
            return load_config()
        except ConfigError as exc:
            raise BadSetting(f"{exc}; fix the file, or point RBEE_CONFIG elsewhere") from None

    @cached_property
    def url(self) -> str:
        if self._url_flag or os.environ.get("RBEE_QUEEN_URL"):
            url = resolve_queen_url(self._url_flag, KeeperConfig())
        else:
            url = resolve_queen_url(None, self.config)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadSetting(f"the queen URL {url!r} is not an http(s) URL")
        return url

    @cached_property
    def token(self) -> str | None:
        if self._token_flag or os.environ.get("RBEE_TOKEN"):
            return resolve_token(self._token_flag)
        return resolve_token(None, self.config)

    @property
    def local(self) -> bool:
        return is_loopback(urlsplit(self.url).hostname or "")

    @cached_property
    def configured_url(self) -> str:
        """Where the queen is when no ``--queen-url`` says otherwise (environment, config file, default)."""
        if os.environ.get("RBEE_QUEEN_URL"):
            return resolve_queen_url(None, KeeperConfig())
        try:
            return resolve_queen_url(None, self.config)
        except BadSetting:
            return resolve_queen_url(None, KeeperConfig())

    @property
    def explicit_url(self) -> bool:
        """Whether ``--queen-url`` names a place other than the configured queen (no queen is started there)."""
        return bool(self._url_flag) and not _same_url(self.url, self.configured_url)

    @cached_property
    def client(self) -> QueenClient:
        hint: str | None
        if self.local and self.explicit_url:
            hint = f"check --queen-url, or start a queen there with `rbee --queen-url {self.url} queen start`"
        elif self.local:
            hint = "start it with `rbee queen start`" if autostart_disabled() else None
        else:
            hint = "check --queen-url or RBEE_QUEEN_URL, and that queen-rbee runs there"
        return QueenClient(self.url, self.token, unreachable_hint=hint)

    @cached_property
    def renderer(self) -> Renderer:
        return Renderer(quiet=self.quiet, json_mode=self.json_mode, verbose=self.verbose)

    def close(self) -> None:
        if "renderer" in self.__dict__:
            self.renderer.close()
        if "client" in self.__dict__:
            self.client.close()

    # -- the queen ---------------------------------------------------------

    def ensure_queen(self, exc: QueenUnreachable) -> None:
        """Start the queen after ``exc`` if that is allowed, else re-raise ``exc``."""
        if not exc.connect or not self.local or autostart_disabled() or self.explicit_url:
            raise exc
        from rbee.keeper.daemon import start_queen

        started = start_queen(self.url, token=self.token, local_hive=True)
        if not started.already_running:
            self.renderer.notice(f"Started queen-rbee at {started.url} (log: {started.log})")

    def submit(self, operation: dict[str, Any], *, autostart: bool = True, flags: dict[str, str] | None = None) -> str:
        """POST the operation; a refusal naming fields names the flags they came from (``flags``
        adds to or overrides :data:`~rbee.keeper.errors.FIELD_FLAGS`)."""
        try:
            try:
                return self.client.submit(operation)
            except QueenUnreachable as exc:
                if not autostart:
                    raise
                self.ensure_queen(exc)
            return self.client.submit(operation)
        except InputRefused as exc:
            if flags and exc.problems:
                raise InputRefused(
                    exc.status,
                    problems_line(exc.problems, {**FIELD_FLAGS, **flags}),
                    kind=exc.kind,
                    field=exc.field,
                    problems=exc.problems,
                ) from None
            raise

    # -- jobs --------------------------------------------------------------

    def run(
        self,
        operation: dict[str, Any],
        *,
        autostart: bool = True,
        summary: bool = False,
        flags: dict[str, str] | None = None,
    ) -> None:
        """Submit ``operation``, render its stream, and raise unless it completed.

        ``summary`` is for ``rbee infer``: a live status line while it runs (on
        a terminal), then the one-line summary.
        """
        job_id = self.submit(operation, autostart=autostart, flags=flags)
        self.follow(job_id, cancel_on_disconnect=True, summary=summary)

    def follow(
        self,
        job_id: str,
        *,
        cancel_on_disconnect: bool = False,
        summary: bool = False,
        until: int | None = None,
    ) -> None:
        """Render the job's events; with ``until``, stop after that event id if the end is not there yet.

        Ctrl-C cancels the job only when this stream owns it (``cancel_on_disconnect``);
        watching someone else's job stops watching, nothing more.
        """
        renderer = self.renderer
        if summary:
            renderer.live = True
        last = 0
        stream = self.client.events(job_id, cancel_on_disconnect=cancel_on_disconnect)
        try:
            for event in stream:
                last = event.id  # before rendering: an event cut short by Ctrl-C is not shown twice
                renderer.event(event)
                if until is not None and last >= until and event.kind != "end":
                    renderer.finish()
                    short = short_id(job_id)
                    renderer.notice(
                        f"{short} is still running; watch it to its end with: rbee jobs logs --follow {short}"
                    )
                    return
        except KeyboardInterrupt:
            stream.close()
            if not cancel_on_disconnect:
                renderer.cancelling = True
                renderer.finish()
                raise Interrupted(f"stopped watching {short_id(job_id)}; the job runs on") from None
            self._cancel(job_id, last)
        finally:
            stream.close()
        renderer.finish(summary=summary)
        self.outcome(renderer.end)

    def outcome(self, end: dict[str, Any] | None) -> None:
        if end is None:  # pragma: no cover - events() raises StreamBroken first
            raise KeeperError("the stream closed before the job's end")
        if end.get("status") != "completed":
            raise JobEnded(end)

    def _cancel(self, job_id: str, last: int) -> None:
        """Ctrl-C: cancel the job, read on (bounded) to its ``end``, then exit 130.

        Nothing of the job is shown after the Ctrl-C (``--json`` still prints its
        events): the one line ``rbee: cancelled`` is the last thing said.
        """
        renderer = self.renderer
        renderer.cancelling = True
        renderer.close()
        deadline = time.monotonic() + CANCEL_GRACE_S
        try:
            try:
                self.client.cancel(job_id, timeout_s=CANCEL_GRACE_S)
            except KeeperError:
                pass  # the disconnect cancels it too (cancel_on_disconnect)
            remaining = max(0.1, deadline - time.monotonic())
            try:
                for event in self.client.events(job_id, after=last, reconnects=0, read_timeout_s=remaining):
                    renderer.event(event)
                    if time.monotonic() > deadline:
                        break
            except KeeperError:
                pass
        except KeyboardInterrupt:
            pass  # a second Ctrl-C: leave now
        renderer.finish()
        end = renderer.end
        if end is not None:
            raise Interrupted("cancelled" if end.get("status") in ("completed", "cancelled") else end_line(end))
        raise Interrupted(f"cancelled; the job's end did not arrive within {CANCEL_GRACE_S:.0f} s")
