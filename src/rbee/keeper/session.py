"""One command line's view of the queen: where it is, how to reach it, how to run a job there.

:class:`Session` resolves the global options (``--queen-url``, ``--token``,
``-q``, ``--json``) lazily, owns the HTTP client and the renderer, starts the
queen when it is not running (loopback URL only, unless ``RBEE_NO_AUTOSTART``
is set), and runs jobs: submit, render the stream, turn the ``end`` event into
an outcome, and handle Ctrl-C by cancelling the job and reading on to its end.
"""

from __future__ import annotations

import os
import time
from functools import cached_property
from typing import Any
from urllib.parse import urlsplit

from rbee.config import ConfigError, KeeperConfig, is_loopback, load_config, resolve_queen_url, resolve_token
from rbee.keeper.client import QueenClient
from rbee.keeper.errors import BadSetting, Interrupted, JobEnded, KeeperError, QueenUnreachable, end_line
from rbee.keeper.render import Renderer

__all__ = ["Session", "CANCEL_GRACE_S", "autostart_disabled"]

#: After Ctrl-C, how long the keeper waits for the job's ``end`` event.
CANCEL_GRACE_S = 5.0


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
    ) -> None:
        self._url_flag = queen_url
        self._token_flag = token
        self.quiet = quiet
        self.json_mode = json_mode

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
    def client(self) -> QueenClient:
        if self.local:
            hint = "start it with `rbee queen start`" if autostart_disabled() else None
        else:
            hint = "check --queen-url or RBEE_QUEEN_URL, and that queen-rbee runs there"
        return QueenClient(self.url, self.token, unreachable_hint=hint)

    @cached_property
    def renderer(self) -> Renderer:
        return Renderer(quiet=self.quiet, json_mode=self.json_mode)

    def close(self) -> None:
        if "renderer" in self.__dict__:
            self.renderer.close()
        if "client" in self.__dict__:
            self.client.close()

    # -- the queen ---------------------------------------------------------

    def ensure_queen(self, exc: QueenUnreachable) -> None:
        """Start the queen after ``exc`` if that is allowed, else re-raise ``exc``."""
        if not exc.connect or not self.local or autostart_disabled():
            raise exc
        from rbee.keeper.daemon import start_queen

        started = start_queen(self.url, token=self.token, local_hive=True)
        if not started.already_running:
            self.renderer.notice(f"Started queen-rbee at {started.url} (log: {started.log})")

    def submit(self, operation: dict[str, Any], *, autostart: bool = True) -> str:
        try:
            return self.client.submit(operation)
        except QueenUnreachable as exc:
            if not autostart:
                raise
            self.ensure_queen(exc)
        return self.client.submit(operation)

    # -- jobs --------------------------------------------------------------

    def run(self, operation: dict[str, Any], *, autostart: bool = True, summary: bool = False) -> None:
        """Submit ``operation``, render its stream, and raise unless it completed."""
        job_id = self.submit(operation, autostart=autostart)
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
        last = 0
        stream = self.client.events(job_id, cancel_on_disconnect=cancel_on_disconnect)
        try:
            for event in stream:
                last = event.id  # before rendering: an event cut short by Ctrl-C is not shown twice
                renderer.event(event)
                if until is not None and last >= until and event.kind != "end":
                    renderer.finish()
                    renderer.notice(
                        f"{job_id} is still running; watch it to its end with: rbee jobs logs --follow {job_id}"
                    )
                    return
        except KeyboardInterrupt:
            stream.close()
            if not cancel_on_disconnect:
                raise
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
        """Ctrl-C: cancel the job, read on (bounded) to its ``end``, then exit 130."""
        renderer = self.renderer
        renderer.notice(f"Cancelling {job_id} ...")
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
            raise Interrupted("" if end.get("status") == "completed" else end_line(end))
        raise Interrupted(f"cancel requested; the job's end did not arrive within {CANCEL_GRACE_S:.0f} s")
