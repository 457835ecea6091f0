"""A hive inside another process's event loop: the queen's local hive.

``EmbeddedHive`` runs the hive app with uvicorn on 127.0.0.1 as a task it owns,
in the caller's loop. It binds the socket itself, so the port (any free one
when 0) is known before the first heartbeat. Heartbeats go through ``deliver``
when given (the queen records them directly: the queen's own HTTP server is
not yet listening while its lifespan starts this hive), else over HTTP to
``queen_url``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from rbee.errors import RbeeError
from rbee.hive.addresses import listen_socket
from rbee.hive.app import HiveSettings, HiveState, create_hive_app
from rbee.hive.heartbeat import Deliver
from rbee.narration import narrate

__all__ = ["EmbeddedHive"]

HIVE_ID = "localhost"
HOST = "127.0.0.1"


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the process's owner handles signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class EmbeddedHive:
    def __init__(
        self,
        queen_url: str,
        token: str | None = None,
        port: int = 0,
        home: Path | None = None,
        options: Mapping[str, Any] | None = None,
        deliver: Deliver | None = None,
    ) -> None:
        self.queen_url = queen_url
        self.token = token
        self.requested_port = port
        self.home = home
        self.options = dict(options or {})
        self.deliver = deliver
        self.port: int | None = None
        self.app: FastAPI | None = None
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the embedded hive has not started")
        return f"http://{HOST}:{self.port}"

    @property
    def state(self) -> HiveState:
        if self.app is None:
            raise RuntimeError("the embedded hive has not started")
        state: HiveState = self.app.state.hive
        return state

    async def start(self, timeout_s: float = 180.0) -> None:
        """Serve, and return once the first heartbeat was delivered (or, over HTTP, tried)."""
        if self._task is not None:
            raise RuntimeError("the embedded hive is already running")
        sock = listen_socket(HOST, self.requested_port)
        self.port = sock.getsockname()[1]
        settings = HiveSettings(
            host=HOST,
            port=self.port,
            hive_id=HIVE_ID,
            queen_url=self.queen_url,
            token=self.token,
            home=self.home,
            deliver=self.deliver,
            **self.options,
        )
        self.app = create_hive_app(settings)
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=2,
        )
        self._server = _Server(config)
        self._task = asyncio.create_task(self._serve(self._server, sock), name="hive:embedded-server")
        try:
            async with asyncio.timeout(timeout_s):
                await self._wait_started()
        except BaseException:
            await self.stop()
            raise
        narrate("local_hive_started", f"Local hive serving at {self.url}", actor="hive", url=self.url)

    @staticmethod
    async def _serve(server: _Server, sock: socket.socket) -> None:
        try:
            await server.serve(sockets=[sock])
        finally:
            sock.close()

    async def _wait_started(self) -> None:
        assert self._server is not None and self._task is not None
        while not self._server.started:
            if self._task.done():
                raise RbeeError(f"the local hive failed to start: {self._failure()}")
            await asyncio.sleep(0.02)
        beat = self.state.heartbeat
        if beat is None:
            return
        # With a direct deliver the first heartbeat arrives; over HTTP the queen
        # may not listen yet, so the first attempt is enough.
        event = beat.delivered if self.deliver is not None else beat.attempted
        waiter = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
        if self._task.done():
            raise RbeeError(f"the local hive stopped while starting: {self._failure()}")

    def _failure(self) -> str:
        assert self._task is not None
        if self._task.cancelled():
            return "cancelled"
        exc = self._task.exception()
        if exc is None:
            return "the server exited"
        if isinstance(exc, SystemExit):
            return "its start-up failed (see the log above)"
        return f"{type(exc).__name__}: {exc}"

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the workers and the server, within ``timeout_s``."""
        task, server = self._task, self._server
        if task is None or server is None:
            return
        server.should_exit = True
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(task, return_exceptions=True)
        except TimeoutError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._task = None
        self._server = None
