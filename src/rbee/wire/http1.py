"""A small HTTP/1.1 client for rbee's own job API, on asyncio streams.

The queen submits each job to a worker (or a hive) and relays its stream:
two requests per job and one read per token. httpx spends about two thousand
Python calls on a request (its pool, anyio cancel scopes, h11, cookies, the
auth flow): close to a millisecond of CPU on a small machine, more than the
rest of the relay, and all of it in the time to first token. A
:class:`~rbee.jobs.client.JobClient` sends those two requests through this
client when it is given one (:class:`~rbee.jobs.client.JobHttp` carries a
:class:`Pool` for plain ``http://`` URLs); everything else (proxies, TLS,
tests that mount an ASGI app) stays on httpx. ``https://`` URLs are sent
here too when the pool has a :class:`~rbee.wire.tls.Trust`, which gives each
connection its context (a pinned certificate, or the usual verification). The benchmarks measure servers
through :class:`Connection`, for the same reason: the client must cost little
next to what it measures.

What it does: keep-alive connections pooled per host (closed after
:data:`IDLE_S` idle, before uvicorn's own keep-alive timeout of 5 s), a
connect timeout, ``Content-Length`` and chunked bodies, one retry on a fresh
connection when a pooled one turns out to have been closed before any answer
came (the server had not read the request). A connection is reused only
after a response was read to its end. The pool belongs to whoever made it
(the queen's lifespan, through its HTTP client): :meth:`Pool.close` closes its
idle connections.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ssl

    from rbee.wire.tls import Trust

__all__ = ["IDLE_S", "Connection", "Pool", "Response", "WireError", "request_head"]

#: An idle connection is closed after this long (uvicorn closes them after 5 s).
IDLE_S = 2.0
_MAX_IDLE_PER_HOST = 32
_MAX_HEAD = 65_536


class WireError(Exception):
    """The connection failed (refused, reset, closed mid-answer, malformed answer)."""


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    #: A streamed body's pieces as they arrive (``stream`` only).
    chunks: AsyncIterator[bytes] | None = field(default=None, repr=False)


def request_head(host: str, port: int, method: str, target: str, headers: dict[str, str], body: bytes | None) -> bytes:
    """The request line and headers (``Content-Length`` for a body), up to the blank line."""
    head = [f"{method} {target} HTTP/1.1", f"Host: {host}:{port}"]
    head.extend(f"{name}: {value}" for name, value in headers.items())
    if body is not None:
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")


class Connection:
    """One HTTP/1.1 connection on asyncio streams; requests on it are sequential."""

    __slots__ = ("expiry", "key", "peer", "reader", "reusable", "secure", "writer")

    def __init__(
        self,
        key: tuple[str, int],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        secure: bool = False,
    ) -> None:
        self.key = key
        self.secure = secure
        #: The fingerprint of the server's certificate (TLS only).
        self.peer: str | None = None
        if secure:
            obj = writer.get_extra_info("ssl_object")
            der = obj.getpeercert(binary_form=True) if obj is not None else None
            if der:
                from rbee.wire.tls import fingerprint

                self.peer = fingerprint(der)
        self.reader = reader
        self.writer = writer
        self.reusable = False
        self.expiry: asyncio.TimerHandle | None = None

    @classmethod
    async def open(
        cls, host: str, port: int, *, timeout_s: float | None = None, ssl: ssl.SSLContext | None = None
    ) -> Connection:
        """A new connection, over TLS with ``ssl`` (:class:`WireError` if none can be made within ``timeout_s``)."""
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_connection(host, port, limit=_MAX_HEAD, ssl=ssl)
        except TimeoutError:
            raise WireError(f"no connection within {timeout_s:g} s") from None
        except OSError as exc:  # ssl.SSLError is one: a refused certificate
            raise WireError(_reason(exc)) from None
        return cls((host, port), reader, writer, secure=ssl is not None)

    def close(self) -> None:
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        with contextlib.suppress(RuntimeError):  # its event loop has already closed
            self.writer.close()

    async def aclose(self) -> None:
        self.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()

    @property
    def usable(self) -> bool:
        return not self.reader.at_eof() and not self.writer.is_closing()

    async def head(self) -> tuple[int, dict[str, str]]:
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise WireError(f"not an HTTP/1.1 answer: {lines[0][:80]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        self.reusable = headers.get("connection", "").lower() != "close" and parts[0] == "HTTP/1.1"
        return int(parts[1]), headers

    async def body(self, headers: dict[str, str]) -> bytes:
        return b"".join([piece async for piece in self.pieces(headers)])

    async def pieces(self, headers: dict[str, str]) -> AsyncIterator[bytes]:
        """The body as it arrives: each chunk of a chunked body, else the whole."""
        reader = self.reader
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                line = await reader.readuntil(b"\r\n")
                size = int(line.split(b";", 1)[0], 16)
                if size == 0:
                    # Trailers (none expected) up to the blank line.
                    while await reader.readuntil(b"\r\n") != b"\r\n":
                        pass
                    return
                data = await reader.readexactly(size + 2)
                yield data[:-2]
        elif "content-length" in headers:
            length = int(headers["content-length"])
            if length:
                yield await reader.readexactly(length)
        else:  # delimited by the end of the connection
            self.reusable = False
            data = await reader.read()
            if data:
                yield data


def _reason(exc: OSError) -> str:
    if type(exc).__module__ in ("ssl", "rbee.wire.tls"):
        from rbee.wire.tls import describe

        return describe(exc)
    return exc.strerror or str(exc) or type(exc).__name__


#: Where a pooled connection goes: host, port, and whether it is TLS (never shared between the two).
_Slot = tuple[str, int, bool]


class Pool:
    """Keep-alive connections to rbee daemons, kept for the event loop that uses the pool.

    With ``trust``, a request made with ``secure=True`` goes over TLS, its
    context given by the trust (a pinned certificate, or the usual checks).
    """

    def __init__(
        self,
        *,
        connect_timeout_s: float | None = 5.0,
        read_timeout_s: float | None = None,
        trust: Trust | None = None,
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.trust = trust
        #: The loop whose connections the pool keeps (the first that used it).
        self.loop: asyncio.AbstractEventLoop | None = None
        self._idle: dict[_Slot, list[Connection]] = {}
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    async def aclose(self) -> None:
        """:meth:`close`, then wait until the idle connections are closed."""
        conns = [conn for idle in self._idle.values() for conn in idle]
        self.close()
        for conn in conns:
            with contextlib.suppress(OSError, RuntimeError):
                await conn.writer.wait_closed()

    async def _connect(self, key: tuple[str, int], secure: bool) -> Connection:
        if self._closed:
            raise WireError("the client is closed")
        context = None
        if secure:
            if self.trust is None:
                raise WireError("this client has no TLS settings")
            try:
                context = await self.trust.context(key[0], key[1])
            except TimeoutError:
                raise WireError(f"no connection within {self.trust.timeout_s:g} s") from None
            except OSError as exc:
                raise WireError(_reason(exc)) from None
        return await Connection.open(key[0], key[1], timeout_s=self.connect_timeout_s, ssl=context)

    def _checkout(self, key: _Slot) -> Connection | None:
        loop = asyncio.get_running_loop()
        if self.loop is not loop:
            # Connections made on another loop (one that has ended) cannot be used on this one.
            for stale in [conn for idle in self._idle.values() for conn in idle]:
                stale.close()
            self._idle.clear()
            self.loop = loop
        conns = self._idle.get(key)
        while conns:
            conn = conns.pop()
            if conn.expiry is not None:
                conn.expiry.cancel()
                conn.expiry = None
            if conn.usable:
                return conn
            conn.close()
        return None

    def _checkin(self, conn: Connection) -> None:
        conns = self._idle.setdefault((*conn.key, conn.secure), [])
        if self._closed or not conn.reusable or not conn.usable or len(conns) >= _MAX_IDLE_PER_HOST:
            conn.close()
            return
        conn.reusable = False
        conn.expiry = asyncio.get_running_loop().call_later(IDLE_S, self._expire, conn)
        conns.append(conn)

    def _expire(self, conn: Connection) -> None:
        conn.expiry = None
        with contextlib.suppress(ValueError):
            self._idle.get((*conn.key, conn.secure), []).remove(conn)
        conn.close()

    async def _send(
        self,
        key: tuple[str, int],
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes | None,
        secure: bool,
    ) -> tuple[Connection, int, dict[str, str]]:
        """Write the request and read the answer's head, on a pooled connection or a new one."""
        data = request_head(key[0], key[1], method, target, headers, body) + (body or b"")
        pooled = self._checkout((key[0], key[1], secure))
        if pooled is not None and secure and self.trust is not None and not self.trust.holds(*key, pooled.peer):
            pooled.close()  # pinned to another certificate since it was made: a new connection is checked again
            pooled = None
        for conn in (pooled, None) if pooled is not None else (None,):
            fresh = conn is None
            if conn is None:
                conn = await self._connect(key, secure)
            try:
                conn.writer.write(data)
                async with asyncio.timeout(self.read_timeout_s):
                    status, answer = await conn.head()
                return conn, status, answer
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                conn.close()
                if fresh or (isinstance(exc, asyncio.IncompleteReadError) and exc.partial):
                    raise WireError("the connection closed before an answer came") from None
                # A pooled connection the server had already closed: once more, on a new one.
            except (asyncio.LimitOverrunError, ValueError) as exc:
                conn.close()
                raise WireError(f"a malformed answer: {type(exc).__name__}") from None
            except TimeoutError:
                conn.close()
                raise WireError(f"no answer within {self.read_timeout_s:g} s") from None
            except BaseException:
                conn.close()
                raise
        raise WireError("no connection")  # pragma: no cover - the loop returns or raises

    async def request(
        self,
        key: tuple[str, int],
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes | None = None,
        *,
        secure: bool = False,
    ) -> Response:
        conn, status, answer = await self._send(key, method, target, headers, body, secure)
        try:
            async with asyncio.timeout(self.read_timeout_s):
                content = await conn.body(answer)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, asyncio.IncompleteReadError | ConnectionError | ValueError | asyncio.LimitOverrunError):
                raise WireError(f"the answer broke off: {type(exc).__name__}") from None
            if isinstance(exc, TimeoutError):
                raise WireError(f"no answer within {self.read_timeout_s:g} s") from None
            raise
        self._checkin(conn)
        return Response(status, answer, content)

    @contextlib.asynccontextmanager
    async def stream(
        self,
        key: tuple[str, int],
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes | None = None,
        *,
        secure: bool = False,
    ) -> AsyncIterator[Response]:
        """The answer, its body to be read from ``chunks``.

        The connection is reused only if the body was read to its end.
        """
        conn, status, answer = await self._send(key, method, target, headers, body, secure)
        finished = False

        async def chunks() -> AsyncIterator[bytes]:
            nonlocal finished
            try:
                async for piece in conn.pieces(answer):
                    yield piece
            except (asyncio.IncompleteReadError, ConnectionError, ValueError, asyncio.LimitOverrunError) as exc:
                raise WireError(f"the stream broke off: {type(exc).__name__}") from None
            finished = True

        try:
            yield Response(status, answer, chunks=chunks())
        finally:
            if finished:
                self._checkin(conn)
            else:
                conn.close()  # the server sees the client leave
