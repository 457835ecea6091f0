"""Client side of the job API: submit an operation, follow its events.

Used by the queen (to hives and workers), the benchmarks and the tests; the
keeper has its own standard-library client over the same :mod:`rbee.wire`.
The stream ends at ``[DONE]``; a stream that closes without an ``end`` event
raises :class:`~rbee.errors.StreamBroken`, so a caller can never mistake a
lost connection for success.

Submitting a job and following its stream, the two requests on the path from
prompt to token, go through the small HTTP/1.1 client of
:mod:`rbee.wire.http1` when the httpx client given is a :class:`JobHttp`
(which carries one, and closes it with itself) and the server is a plain
``http://`` URL (or an ``https://`` one, when the client has a
:class:`~rbee.wire.tls.Trust`); the other requests, and every client built
another way (an ASGI app mounted in a test), use httpx.

A :class:`JobHttp` given a ``trust`` sends every ``https://`` request, on
either path, with the context the trust gives its origin: the certificate a
hive's heartbeat pinned for it and its workers, else the usual checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import urllib.request
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx

from rbee.contracts.operations import OperationBase
from rbee.errors import RbeeError, StreamBroken, Unreachable
from rbee.wire import http1, protocol
from rbee.wire.errors import from_response
from rbee.wire.sse import Event, aiter_frames
from rbee.wire.tls import Trust, describe

__all__ = ["JobClient", "JobHttp", "StreamBroken", "StreamEvent", "Unreachable", "error_from_response"]

#: One event of a job's stream (the name it had before :mod:`rbee.wire`).
StreamEvent = Event


def error_from_response(response: httpx.Response) -> RbeeError:
    """Rebuild the server's typed error from a 4xx/5xx answer."""
    return from_response(response.status_code, response.headers, response.content)


class _TrustTransport(httpx.AsyncBaseTransport):
    """httpx's transport, with each ``https://`` origin's TLS context from a :class:`Trust`."""

    def __init__(self, trust: Trust, **options: Any) -> None:
        self.trust = trust
        self.options = options
        self.plain = httpx.AsyncHTTPTransport(**options)
        self._secure: dict[ssl.SSLContext, httpx.AsyncHTTPTransport] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "https":
            return await self.plain.handle_async_request(request)
        try:
            context = await self.trust.context(url.host, url.port or 443)
        except (OSError, TimeoutError) as exc:
            raise httpx.ConnectError(describe(exc), request=request) from None
        transport = self._secure.get(context)
        if transport is None:
            transport = self._secure[context] = httpx.AsyncHTTPTransport(verify=context, **self.options)
        return await transport.handle_async_request(request)

    async def aclose(self) -> None:
        for transport in (self.plain, *self._secure.values()):
            await transport.aclose()
        self._secure.clear()


class JobHttp(httpx.AsyncClient):
    """An httpx client that also holds a pool of HTTP/1.1 connections for the hot job requests.

    Built and closed by its owner (the queen's lifespan), like any httpx
    client; :meth:`aclose` closes the pool too. A client given its own
    ``transport``, ``mounts`` or ``proxy``, or one that proxies from the
    environment, has no pool (:attr:`http1` is None) and sends everything
    through httpx. With ``trust``, ``https://`` requests (both ways) take
    their TLS context from it.
    """

    def __init__(self, *, trust: Trust | None = None, **kwargs: Any) -> None:
        custom = any(kwargs.get(name) is not None for name in ("transport", "mounts", "proxy"))
        if trust is not None and not custom:
            # httpx's own defaults, unless given: the transport is made here, not by httpx.
            options = {"limits": kwargs.pop("limits", httpx.Limits(max_connections=100, max_keepalive_connections=20))}
            kwargs["transport"] = _TrustTransport(trust, **options)
        super().__init__(**kwargs)
        proxied = kwargs.get("trust_env", True) and any(k in urllib.request.getproxies() for k in ("http", "all"))
        self.trust = trust
        self.http1: http1.Pool | None = None
        if not custom and not proxied:
            self.http1 = http1.Pool(
                connect_timeout_s=self.timeout.connect, read_timeout_s=self.timeout.read, trust=trust
            )

    async def aclose(self) -> None:
        if self.http1 is not None:
            await self.http1.aclose()
        await super().aclose()

    async def __aexit__(self, *exc: Any) -> None:
        # httpx's own __aexit__ closes its transports without calling aclose.
        if self.http1 is not None:
            await self.http1.aclose()
        await super().__aexit__(*exc)


class JobClient:
    """Talk to one server's job API, through ``client`` (by default a :class:`JobHttp` of its own)."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        client: httpx.AsyncClient | None = None,
        connect_timeout_s: float = 5.0,
        silence_s: float | None = None,
        trust: Trust | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        #: A stream with no byte for this long is broken (the servers ping every
        #: ``PING_INTERVAL_S`` of quiet): a machine that vanished sends no reset.
        self.silence_s = SILENCE_S if silence_s is None else silence_s
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._own = client is None
        self.client = client or JobHttp(
            timeout=httpx.Timeout(connect_timeout_s, read=None),
            limits=httpx.Limits(max_keepalive_connections=32),
            trust=trust,
        )
        self._pool: http1.Pool | None = None
        parts = urlsplit(self.base_url)
        self._secure = parts.scheme == "https"
        if isinstance(self.client, JobHttp) and parts.hostname:
            pool = self.client.http1
            if parts.scheme == "http" or (self._secure and pool is not None and pool.trust is not None):
                self._pool = pool
        self._key = (parts.hostname or "", parts.port or (443 if self._secure else 80))
        self._prefix = parts.path

    async def aclose(self) -> None:
        if self._own:
            await self.client.aclose()

    async def __aenter__(self) -> JobClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _direct(self) -> http1.Pool | None:
        pool = self._pool
        return None if pool is None or pool.closed else pool

    def _unreachable(self, why: str) -> Unreachable:
        return Unreachable(f"{self.base_url} did not answer: {why}", url=self.base_url)

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self.client.request(method, self.base_url + path, headers=self.headers, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(_why(exc)) from None

    async def submit(self, operation: OperationBase | dict[str, Any]) -> str:
        body = operation.to_wire() if isinstance(operation, OperationBase) else operation
        pool = self._direct()
        if pool is None:
            response = await self._request("POST", protocol.JOBS_PATH, json=body)
            if response.status_code != 201:
                raise error_from_response(response)
            return str(response.json()["job_id"])
        headers = {**self.headers, "Content-Type": "application/json"}
        try:
            answer = await pool.request(
                self._key,
                "POST",
                self._prefix + protocol.JOBS_PATH,
                headers,
                json.dumps(body).encode(),
                secure=self._secure,
            )
        except http1.WireError as exc:
            raise self._unreachable(str(exc)) from None
        if answer.status != 201:
            raise from_response(answer.status, answer.headers, answer.body)
        return str(json.loads(answer.body)["job_id"])

    async def get(self, job_id: str) -> dict[str, Any]:
        response = await self._request("GET", protocol.job_path(job_id))
        if response.status_code != 200:
            raise error_from_response(response)
        result: dict[str, Any] = response.json()
        return result

    async def list(self, limit: int = 100) -> list[dict[str, Any]]:
        response = await self._request("GET", protocol.JOBS_PATH, params={"limit": limit})
        if response.status_code != 200:
            raise error_from_response(response)
        jobs: list[dict[str, Any]] = response.json()["jobs"]
        return jobs

    async def cancel(self, job_id: str) -> dict[str, Any]:
        response = await self._request("DELETE", protocol.job_path(job_id))
        if response.status_code not in (200, 202, 409):
            raise error_from_response(response)
        result: dict[str, Any] = response.json()
        return result

    async def events(self, job_id: str, *, cancel_on_disconnect: bool = False, after: int = 0) -> AsyncIterator[Event]:
        """Yield the job's events up to and including ``end``."""
        params = {"cancel_on_disconnect": "true"} if cancel_on_disconnect else {}
        headers = {**self.headers, **protocol.ACCEPT_EVENTS}
        if after:
            headers[protocol.LAST_EVENT_ID] = str(after)
        ended = _Ended()
        try:
            async with self._stream(protocol.stream_path(job_id), params, headers) as body:
                async for event in self._read(body, ended):
                    yield event
        except (httpx.TransportError, http1.WireError) as exc:
            self._broken(ended, exc)
        if not ended.seen:
            raise StreamBroken(f"the stream from {self.base_url} closed before the job's end", url=self.base_url)

    async def run(
        self, operation: OperationBase | dict[str, Any], *, started: Callable[[str], None] | None = None
    ) -> AsyncIterator[Event]:
        """Submit ``operation`` and yield its events up to ``end``, in one round trip
        (``POST /v1/jobs?stream=true``; leaving cancels the job). ``started`` is told the
        job's id before its first event. A server that answers with the job's id instead
        (without streamed submits) is followed with a second request."""
        payload = json.dumps(operation.to_wire() if isinstance(operation, OperationBase) else operation).encode()
        headers = {**self.headers, **protocol.ACCEPT_EVENTS, "Content-Type": "application/json"}
        ended = _Ended()
        job_id: str | None = None
        body: AsyncIterator[bytes] | None = None
        try:
            async with self._submit_stream(payload, headers) as (job_id, body):
                if started is not None:
                    started(job_id)
                if body is not None:
                    async for event in self._read(body, ended):
                        yield event
        except (httpx.TransportError, http1.WireError) as exc:
            if job_id is None:
                raise self._unreachable(_why(exc)) from None
            self._broken(ended, exc)
        if job_id is not None and body is None:  # an answer of 201: the events, asked for on their own
            async for event in self.events(job_id, cancel_on_disconnect=True):
                yield event
            return
        if not ended.seen:
            raise StreamBroken(f"the stream from {self.base_url} closed before the job's end", url=self.base_url)

    @contextlib.asynccontextmanager
    async def _submit_stream(
        self, payload: bytes, headers: dict[str, str]
    ) -> AsyncIterator[tuple[str, AsyncIterator[bytes] | None]]:
        """``POST ?stream=true``: the job's id and its events' body (None: the server answered 201)."""
        pool = self._direct()
        if pool is None:
            url = self.base_url + protocol.JOBS_PATH
            request = self.client.build_request(
                "POST", url, params={"stream": "true"}, content=payload, headers=headers
            )
            response = await self.client.send(request, stream=True)
            try:
                if response.status_code == 201:
                    await response.aread()
                    yield str(response.json()["job_id"]), None
                    return
                if response.status_code != 200:
                    await response.aread()
                    raise error_from_response(response)
                self._check_event_stream(response.headers.get("content-type", ""))
                yield response.headers.get(protocol.JOB_ID_HEADER, ""), response.aiter_bytes()
            finally:
                await response.aclose()
            return
        target = self._prefix + protocol.JOBS_PATH + "?stream=true"
        async with pool.stream(self._key, "POST", target, headers, payload, secure=self._secure) as answer:
            assert answer.chunks is not None
            if answer.status == 201:
                body = b"".join([piece async for piece in answer.chunks])
                yield str(json.loads(body)["job_id"]), None
                return
            if answer.status != 200:
                body = b"".join([piece async for piece in answer.chunks])
                raise from_response(answer.status, answer.headers, body)
            self._check_event_stream(answer.headers.get("content-type", ""))
            yield answer.headers.get(protocol.JOB_ID_HEADER, ""), answer.chunks

    async def _read(self, body: AsyncIterator[bytes], ended: _Ended) -> AsyncIterator[Event]:
        """The events of an event-stream ``body`` up to ``[DONE]``; ``ended.seen`` once ``end`` came."""
        chunks = _unless_silent(body, self.silence_s)
        frames = aiter_frames(chunks)
        done = False
        try:
            async for event_id, kind, data in frames:
                if kind == protocol.EVENT_MESSAGE and data == protocol.DONE:
                    done = True
                    break
                if kind == protocol.EVENT_END:
                    ended.seen = True
                yield Event(int(event_id) if event_id.isdigit() else 0, kind, data)
        except _Silent:
            if not ended.seen:
                raise StreamBroken(
                    f"the stream from {self.base_url} went silent: no byte, not even a ping, for {self.silence_s:g} s",
                    url=self.base_url,
                ) from None
        finally:
            await frames.aclose()
            await chunks.aclose()
        if done:
            await _drain(body)

    def _broken(self, ended: _Ended, exc: Exception) -> None:
        if not ended.seen:
            raise StreamBroken(f"the stream from {self.base_url} broke: {_why(exc)}", url=self.base_url) from None

    @contextlib.asynccontextmanager
    async def _stream(
        self, path: str, params: dict[str, str], headers: dict[str, str]
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """The body of ``GET path`` as it arrives, after checking that it is an event stream."""
        pool = self._direct()
        if pool is None:
            async with self.client.stream("GET", self.base_url + path, params=params, headers=headers) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise error_from_response(response)
                self._check_event_stream(response.headers.get("content-type", ""))
                yield response.aiter_bytes()
            return
        target = self._prefix + path + (f"?{urlencode(params)}" if params else "")
        async with pool.stream(self._key, "GET", target, headers, secure=self._secure) as answer:
            assert answer.chunks is not None
            if answer.status != 200:
                body = b"".join([piece async for piece in answer.chunks])
                raise from_response(answer.status, answer.headers, body)
            self._check_event_stream(answer.headers.get("content-type", ""))
            yield answer.chunks

    def _check_event_stream(self, content_type: str) -> None:
        if not content_type.startswith(protocol.EVENT_STREAM):
            raise StreamBroken(f"{self.base_url} answered {content_type or 'no content type'}, not events")


#: Twice the servers' ping interval and some: a stream quiet this long has lost its peer.
SILENCE_S = 2 * protocol.PING_INTERVAL_S + 5.0


class _Ended:
    """Whether a stream has brought its job's ``end`` (what a break after it does not spoil)."""

    __slots__ = ("seen",)

    def __init__(self) -> None:
        self.seen = False


class _Silent(Exception):
    """No byte arrived on a stream for ``silence_s``."""


async def _unless_silent(chunks: AsyncIterator[bytes], silence_s: float) -> AsyncGenerator[bytes, None]:
    """``chunks``, raising :class:`_Silent` when the next one takes longer than ``silence_s``."""
    it = aiter(chunks)
    while True:
        try:
            async with asyncio.timeout(silence_s):
                chunk = await anext(it)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise _Silent from None
        yield chunk


#: How long the rest of a stream after ``[DONE]`` (the end of the body) may take to arrive.
_DRAIN_S = 1.0


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    """Read the body's end after ``[DONE]`` (it comes in the same write), so its connection can be reused."""
    with contextlib.suppress(TimeoutError, httpx.HTTPError, http1.WireError):
        async with asyncio.timeout(_DRAIN_S):
            async for _ in chunks:
                pass


def _why(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
