"""The one ``text/event-stream`` writer: the job API, the OpenAI, Responses, Anthropic and infill
streams and the cluster feed all answer with an :class:`EventStream`.

A stream is a race between its frames, the client leaving, a keep-alive ping
and the server shutting down; the first to finish ends the others:

* **frames** come from a :class:`Source`: ``take()`` returns every frame
  ready now as one chunk (one socket write, however many events a slow
  reader or a burst left waiting) and whether the stream ends with it;
  ``changed()`` is a future resolved when there is more. A job's event log
  is a source as it is (:mod:`rbee.jobs.api`); an async iterator of frames
  becomes one through :class:`IteratorSource`, whose pump task runs it at
  most :data:`MAX_BUFFER` frames ahead of the socket.
* **the client leaving**: one small task reads ``receive`` for
  ``http.disconnect`` and closes the stream;
* **a ping** (``: ping`` by default) is written once ``ping_s`` seconds
  have passed since the last bytes, so no silence is longer (a timer, not a task);
* **shutdown**: :class:`ShutdownWatch`, the process's one detector, closes
  every open stream once uvicorn has been told to stop (uvicorn waits for
  open connections before the lifespan ends the jobs, so a stream left open
  would hold the shutdown for its whole grace period).

The frames are written by the request's own task; the helpers only resolve
the future it waits on, and they are started only when it first has to wait,
so a stream whose frames are all there (a finished job) costs no task at all.
Closed by the client or the server, the body is ended cleanly and the source
closed (an iterator's pump cancelled, so its ``finally`` runs); ended by its
source, the last frames and the end of the body go in one write.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping

from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from rbee.wire.protocol import PING_INTERVAL_S

__all__ = [
    "MAX_BUFFER",
    "PING",
    "SHUTDOWN",
    "SSE_HEADERS",
    "frames",
    "EventStream",
    "IteratorSource",
    "ServerSentEvent",
    "ShutdownWatch",
    "Source",
    "server_exiting",
]

#: The keep-alive comment written after a quiet interval.
PING = b": ping\n\n"
#: Frames an iterator's pump may be ahead of the socket before it waits.
MAX_BUFFER = 256
#: How often, while streams are open, the watch looks for the server's shutdown.
EXIT_POLL_S = 0.5
SSE_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"connection", b"keep-alive"),
    (b"x-accel-buffering", b"no"),
)
_FIXED = frozenset(name for name, _ in SSE_HEADERS)


def _lines(text: str) -> list[str]:
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


class ServerSentEvent:
    """One frame: ``: comment`` lines, ``id``, ``event``, one ``data`` line per line of data, ``retry``.

    Line breaks inside an id or an event name are dropped (they would end the field).
    """

    __slots__ = ("comment", "data", "event", "id", "retry")

    def __init__(
        self,
        data: str | None = None,
        *,
        event: str | None = None,
        id: str | int | None = None,
        retry: int | None = None,
        comment: str | None = None,
    ) -> None:
        self.data = data
        self.event = event
        self.id = id
        self.retry = retry
        self.comment = comment

    def encode(self) -> bytes:
        out: list[str] = []
        if self.comment is not None:
            out += [f": {line}\n" for line in _lines(self.comment)]
        if self.id is not None:
            out.append(f"id: {''.join(_lines(str(self.id)))}\n")
        if self.event is not None:
            out.append(f"event: {''.join(_lines(self.event))}\n")
        if self.data is not None:
            out += [f"data: {line}\n" for line in _lines(self.data)]
        if self.retry is not None:
            out.append(f"retry: {int(self.retry)}\n")
        out.append("\n")
        return "".join(out).encode()

    def __repr__(self) -> str:
        return f"ServerSentEvent({self.encode()!r})"


def server_exiting() -> bool:
    """Whether the uvicorn server running this process has been told to stop.

    uvicorn installs its own method as the SIGTERM (and SIGINT) handler, so the
    server is found through it; anything else (tests, other servers) reads as running.
    """
    server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    return bool(getattr(server, "should_exit", False))


class ShutdownWatch:
    """Closes the open streams once the server is exiting: the process's one shutdown detector.

    A timer, not a task, and only while streams are open: it polls ``exiting``
    every ``poll_s``. :meth:`close_all` ends them at once (a lifespan, a test).
    """

    def __init__(self, exiting: Callable[[], bool] = server_exiting, poll_s: float = EXIT_POLL_S) -> None:
        self.exiting = exiting
        self.poll_s = poll_s
        self._streams: set[EventStream] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return len(self._streams)

    def add(self, stream: EventStream) -> None:
        self._streams.add(stream)
        loop = asyncio.get_running_loop()
        if self._timer is None or self._loop is not loop:  # a new loop (tests run one each)
            self._loop = loop
            self._timer = loop.call_later(self.poll_s, self._check)

    def discard(self, stream: EventStream) -> None:
        self._streams.discard(stream)

    def close_all(self) -> None:
        for stream in list(self._streams):
            stream.close()

    def _check(self) -> None:
        self._timer = None
        if not self._streams:
            return
        if self.exiting():
            self.close_all()
            return
        assert self._loop is not None
        self._timer = self._loop.call_later(self.poll_s, self._check)


#: The watch every stream registers with unless given another.
SHUTDOWN = ShutdownWatch()


class Source:
    """What an :class:`EventStream` writes: frames ready now, and a future for more."""

    def take(self) -> tuple[bytes, bool]:
        """Every frame ready now (``b""``: none yet) and whether the stream ends with them."""
        raise NotImplementedError

    def changed(self) -> asyncio.Future[None]:
        """A future resolved when :meth:`take` has more (the writer may resolve it itself)."""
        raise NotImplementedError

    def forget(self, fut: asyncio.Future[None]) -> None:
        """Drop a future of :meth:`changed` the writer stopped waiting on."""

    async def aclose(self, finished: bool) -> None:
        """The stream is over: ``finished``, its last frames were written; else it was closed early."""


class IteratorSource(Source):
    """An async iterator of frames (bytes, or :class:`ServerSentEvent`) as a source.

    A pump task, started at the first :meth:`take`, runs the iterator into a
    buffer of at most ``limit`` frames and waits while it is full (a slow
    client slows the iterator, nothing piles up). Closing the stream early
    cancels the pump and closes the iterator, so its ``finally`` runs.
    An exception from the iterator is raised by :meth:`take`.
    """

    def __init__(self, content: AsyncIterable[bytes | ServerSentEvent], *, limit: int = MAX_BUFFER) -> None:
        self.content = content
        self.limit = limit
        self._frames: list[bytes] = []
        self._done = False
        self._error: BaseException | None = None
        self._pump: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._room: asyncio.Future[None] | None = None

    def take(self) -> tuple[bytes, bool]:
        if self._pump is None:
            self._pump = asyncio.get_running_loop().create_task(self._run(), name="sse:frames")
        if self._error is not None:
            raise self._error
        frames, self._frames = self._frames, []
        room = self._room
        if room is not None and not room.done():
            room.set_result(None)
        return b"".join(frames), self._done

    def changed(self) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._frames or self._done or self._error is not None:
            fut.set_result(None)
        else:
            self._waiter = fut
        return fut

    def forget(self, fut: asyncio.Future[None]) -> None:
        if self._waiter is fut:
            self._waiter = None

    def _wake(self) -> None:
        fut, self._waiter = self._waiter, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def _run(self) -> None:
        iterator: AsyncIterator[bytes | ServerSentEvent] = aiter(self.content)
        try:
            async for item in iterator:
                self._frames.append(item if isinstance(item, bytes) else item.encode())
                self._wake()
                while len(self._frames) >= self.limit:
                    self._room = asyncio.get_running_loop().create_future()
                    try:
                        await self._room
                    finally:
                        self._room = None
            self._done = True
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # handed to the writer, which raises it in the request's task
            self._error = exc
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                await aclose()
            self._wake()

    async def aclose(self, finished: bool) -> None:
        pump = self._pump
        if pump is None:
            # Never started (a HEAD request, a stream closed before its first wait): close it anyway.
            aclose = getattr(self.content, "aclose", None)
            if aclose is not None:
                await aclose()
            return
        if not pump.done():
            pump.cancel()
        await asyncio.wait([pump])


class EventStream(Response):
    """``text/event-stream`` from a :class:`Source` (or an async iterator of frames), written by the
    request's own task; see the module's docstring for the race it runs.

    ``ping_s``: quiet seconds before a ping (0 or None: never); ``ping``: its
    frame. ``headers`` are added to the fixed SSE ones; ``background`` runs
    after the body, as a Starlette response's does.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        source: Source | AsyncIterable[bytes | ServerSentEvent],
        *,
        ping_s: float | None = PING_INTERVAL_S,
        ping: bytes | ServerSentEvent = PING,
        headers: Mapping[str, str] | None = None,
        background: BackgroundTask | None = None,
        watch: ShutdownWatch | None = None,
    ) -> None:
        # Response.__init__ renders a body and its headers; a stream has neither, and a
        # short job's stream is opened often enough that the difference shows.
        self.status_code = 200
        self.background = background
        self.raw_headers = list(SSE_HEADERS)
        if headers:
            extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
            self.raw_headers = [h for h in extra if h[0] not in _FIXED] + self.raw_headers
        self.source = source if isinstance(source, Source) else IteratorSource(source)
        self.ping_s = ping_s or None
        self.ping = ping if isinstance(ping, bytes) else ping.encode()
        self.watch = SHUTDOWN if watch is None else watch
        #: Closed before the end (the client left, the server is exiting).
        self.closed = False
        self._ping_due = False
        #: When the last bytes went out (the loop's clock), once the writer has had to wait.
        self._written_at = 0.0
        self._waiting: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def close(self) -> None:
        """End the stream at the writer's next chance (the client left, the server is exiting)."""
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        fut = self._waiting
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _tick(self) -> None:
        """A ping is due ``ping_s`` after the last bytes: never a longer silence (clients time out on
        one, :mod:`rbee.jobs.client` at twice the interval)."""
        if self.closed:
            return
        assert self.ping_s is not None
        loop = asyncio.get_running_loop()
        quiet = loop.time() - self._written_at
        if quiet >= self.ping_s * 0.99:
            self._ping_due = True
            self._wake()
            self._timer = loop.call_later(self.ping_s, self._tick)
        else:
            self._timer = loop.call_later(self.ping_s - quiet, self._tick)

    async def _listen(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.close()
                return

    def _arm(self, receive: Receive) -> asyncio.Task[None]:
        """Start the client, ping and shutdown watches (at the writer's first wait only)."""
        loop = asyncio.get_running_loop()
        self.watch.add(self)
        if self.ping_s is not None:
            self._written_at = loop.time()  # the writes so far were just now
            self._timer = loop.call_later(self.ping_s, self._tick)
        return loop.create_task(self._listen(receive), name="sse:disconnect")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        if scope.get("method") == "HEAD":
            # Headers only: a HEAD request must not open a stream that never ends for it.
            await self.source.aclose(False)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            await self._write(receive, send)
        if self.background is not None:
            await self.background()

    async def _write(self, receive: Receive, send: Send) -> None:
        source = self.source
        clock = asyncio.get_running_loop().time
        listener: asyncio.Task[None] | None = None
        finished = False
        try:
            while not self.closed:
                body, last = source.take()
                if last:
                    finished = True
                    await send({"type": "http.response.body", "body": body, "more_body": False})
                    return
                if body:
                    self._written_at = clock()
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                elif self._ping_due:
                    self._ping_due = False
                    self._written_at = clock()
                    await send({"type": "http.response.body", "body": self.ping, "more_body": True})
                else:
                    if listener is None:
                        listener = self._arm(receive)
                    fut = self._waiting = source.changed()
                    try:
                        await fut
                    finally:
                        self._waiting = None
                        source.forget(fut)
        finally:
            closed_early = self.closed
            self.closed = True
            if listener is not None:
                if self._timer is not None:
                    self._timer.cancel()
                listener.cancel()
                self.watch.discard(self)
            try:
                await source.aclose(finished)
            finally:
                if closed_early:
                    # Closed before the end (the client left, the server is exiting): finish the body.
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                if listener is not None:
                    await asyncio.wait([listener])  # no task outlives its response


def frames(events: Iterable[tuple[int, str, str]]) -> str:
    """``id``/``event``/``data`` frames of ``(id, event, data)`` whose data is one line (JSON is:
    it never holds a raw line break), built directly rather than through :class:`ServerSentEvent`."""
    return "".join([f"id: {event_id}\nevent: {kind}\ndata: {data}\n\n" for event_id, kind, data in events])
