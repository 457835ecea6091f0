"""Client side of the job API: submit an operation, follow its events.

Used by the keeper (to the queen), the queen (to hives and workers) and the
tests. The stream ends at ``[DONE]``; a stream that closes without an ``end``
event raises :class:`StreamBroken`, so a caller can never mistake a lost
connection for success.

The event stream is parsed here, over the response's bytes, one event block
(up to a blank line) at a time: the queen relays every token through this
parser, and a line-by-line decoder over decoded text (httpx-sse) cost it more
than everything else it does per token. The semantics are the SSE
specification's: ``id``, ``event`` and ``data`` fields, comments ignored, a
block without data (a keep-alive ``: ping``) never dispatched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import weakref
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx

from rbee import errors
from rbee.contracts.events import DONE
from rbee.contracts.operations import OperationBase
from rbee.jobs import _http1

__all__ = ["JobClient", "StreamEvent", "StreamBroken", "Unreachable", "error_from_response", "parse_sse"]


class Unreachable(errors.RbeeError):
    """The server did not answer."""

    kind = "unreachable"
    status_code = 502


class StreamBroken(errors.RbeeError):
    """The event stream closed before the job's end."""

    kind = "stream_broken"
    status_code = 502


_KINDS: dict[str, type[errors.RbeeError]] = {
    cls.kind: cls
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, errors.RbeeError) and cls is not errors.RbeeError
}


def error_from_response(response: httpx.Response) -> errors.RbeeError:
    """Rebuild the server's typed error from a 4xx/5xx answer."""
    try:
        body = response.json()
        err = body.get("error") if isinstance(body, dict) else None
    except ValueError:
        err = None
    if not isinstance(err, dict):
        return errors.RbeeError(f"HTTP {response.status_code}: {response.text[:200]}")
    cls = _KINDS.get(str(err.get("kind")), errors.RbeeError)
    exc = cls(str(err.get("message", "")))
    exc.status_code = response.status_code
    exc.data.update({k: v for k, v in err.items() if k not in ("kind", "message")})
    if isinstance(exc, errors.InvalidOperation):
        exc.field = err.get("field")
    if isinstance(exc, errors.QueueFull):
        exc.retry_after_s = int(response.headers.get("retry-after", "1") or 1)
    if cls is errors.RbeeError:
        exc.kind = str(err.get("kind", "internal"))
    return exc


@dataclass(slots=True)
class StreamEvent:
    id: int
    kind: str
    raw: str
    _data: Any = field(default=None, repr=False)

    @property
    def data(self) -> Any:
        if self._data is None:
            self._data = json.loads(self.raw)
        return self._data


#: One pool of plain HTTP/1.1 connections per httpx client (and event loop), for the hot requests.
_POOLS: weakref.WeakKeyDictionary[httpx.AsyncClient, _http1.Pool] = weakref.WeakKeyDictionary()


def _direct_target(base_url: str, client: httpx.AsyncClient) -> tuple[tuple[str, int], str] | None:
    """``((host, port), path prefix)`` when requests to ``base_url`` may skip httpx, else None.

    Only a plain ``http://`` URL reached through httpx's default transport
    qualifies: a proxy, TLS or a mounted transport (an ASGI app in tests)
    keeps every request on httpx.
    """
    parts = urlsplit(base_url)
    transport = getattr(client, "_transport", None)
    mounts = getattr(client, "_mounts", None)
    if parts.scheme != "http" or not parts.hostname or type(transport) is not httpx.AsyncHTTPTransport:
        return None
    if mounts is None or any(t is not None for t in mounts.values()):
        return None
    return (parts.hostname, parts.port or 80), parts.path


class JobClient:
    """Talk to one server's job API.

    Submitting a job and following its stream, the two requests on the path
    from prompt to token, skip httpx for a small HTTP/1.1 client
    (:mod:`rbee.jobs._http1`) when the server is a plain ``http://`` URL; the
    other requests, and every server reached another way, use ``client``.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        client: httpx.AsyncClient | None = None,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._own = client is None
        self.client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(connect_timeout_s, read=None), limits=httpx.Limits(max_keepalive_connections=32)
        )
        self._direct = _direct_target(self.base_url, self.client)

    async def aclose(self) -> None:
        if self._own:
            pool = _POOLS.pop(self.client, None)
            if pool is not None:
                pool.close()
            await self.client.aclose()

    def _pool(self) -> _http1.Pool | None:
        if self._direct is None or self.client.is_closed:
            return None
        pool = _POOLS.get(self.client)
        loop = asyncio.get_running_loop()
        if pool is None or pool.loop is not loop:
            timeout = self.client.timeout
            pool = _http1.Pool(connect_timeout_s=timeout.connect, read_timeout_s=timeout.read)
            _POOLS[self.client] = pool
        return pool

    def _unreachable(self, why: str) -> Unreachable:
        return Unreachable(f"{self.base_url} did not answer: {why}", url=self.base_url)

    async def __aenter__(self) -> JobClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self.client.request(method, self.base_url + path, headers=self.headers, **kwargs)
        except httpx.TransportError as exc:
            raise Unreachable(f"{self.base_url} did not answer: {_why(exc)}", url=self.base_url) from None

    async def submit(self, operation: OperationBase | dict[str, Any]) -> str:
        body = operation.to_wire() if isinstance(operation, OperationBase) else operation
        pool = self._pool()
        if pool is None:
            response = await self._request("POST", "/v1/jobs", json=body)
        else:
            assert self._direct is not None
            key, prefix = self._direct
            headers = {**self.headers, "Content-Type": "application/json"}
            try:
                answer = await pool.request(key, "POST", prefix + "/v1/jobs", headers, json.dumps(body).encode())
            except _http1.WireError as exc:
                raise self._unreachable(str(exc)) from None
            if answer.status == 201:
                return str(json.loads(answer.body)["job_id"])
            response = httpx.Response(answer.status, headers=answer.headers, content=answer.body)
        if response.status_code != 201:
            raise error_from_response(response)
        return str(response.json()["job_id"])

    async def get(self, job_id: str) -> dict[str, Any]:
        response = await self._request("GET", f"/v1/jobs/{job_id}")
        if response.status_code != 200:
            raise error_from_response(response)
        result: dict[str, Any] = response.json()
        return result

    async def list(self, limit: int = 100) -> list[dict[str, Any]]:
        response = await self._request("GET", "/v1/jobs", params={"limit": limit})
        if response.status_code != 200:
            raise error_from_response(response)
        jobs: list[dict[str, Any]] = response.json()["jobs"]
        return jobs

    async def cancel(self, job_id: str) -> dict[str, Any]:
        response = await self._request("DELETE", f"/v1/jobs/{job_id}")
        if response.status_code not in (200, 202, 409):
            raise error_from_response(response)
        result: dict[str, Any] = response.json()
        return result

    async def events(
        self, job_id: str, *, cancel_on_disconnect: bool = False, after: int = 0
    ) -> AsyncIterator[StreamEvent]:
        """Yield the job's events up to and including ``end``."""
        params = {"cancel_on_disconnect": "true"} if cancel_on_disconnect else {}
        headers = {**self.headers, "Accept": "text/event-stream", "Cache-Control": "no-store"}
        if after:
            headers["Last-Event-ID"] = str(after)
        path = f"/v1/jobs/{job_id}/stream"
        got_end = False
        try:
            async with self._stream(path, params, headers) as chunks:
                blocks = parse_sse(chunks)
                done = False
                try:
                    async for event_id, kind, data in blocks:
                        if kind == "message" and data == DONE:
                            done = True
                            break
                        event = StreamEvent(int(event_id) if event_id.isdigit() else 0, kind, data)
                        if kind == "end":
                            got_end = True
                        yield event
                finally:
                    await blocks.aclose()
                if done:
                    await _drain(chunks)
        except (httpx.TransportError, _http1.WireError) as exc:
            if not got_end:
                raise StreamBroken(f"the stream from {self.base_url} broke: {_why(exc)}", url=self.base_url) from None
        if not got_end:
            raise StreamBroken(f"the stream from {self.base_url} closed before the job's end", url=self.base_url)

    @contextlib.asynccontextmanager
    async def _stream(
        self, path: str, params: dict[str, str], headers: dict[str, str]
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """The body of ``GET path`` as it arrives, after checking that it is an event stream."""
        pool = self._pool()
        if pool is None:
            async with self.client.stream("GET", self.base_url + path, params=params, headers=headers) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise error_from_response(response)
                self._check_event_stream(response.headers.get("content-type", ""))
                yield response.aiter_bytes()
            return
        assert self._direct is not None
        key, prefix = self._direct
        target = prefix + path + (f"?{urlencode(params)}" if params else "")
        async with pool.stream(key, "GET", target, headers) as answer:
            assert answer.chunks is not None
            if answer.status != 200:
                body = b"".join([piece async for piece in answer.chunks])
                raise error_from_response(httpx.Response(answer.status, headers=answer.headers, content=body))
            self._check_event_stream(answer.headers.get("content-type", ""))
            yield answer.chunks

    def _check_event_stream(self, content_type: str) -> None:
        if not content_type.startswith("text/event-stream"):
            raise StreamBroken(f"{self.base_url} answered {content_type or 'no content type'}, not events")


#: How long the rest of a stream after ``[DONE]`` (the end of the body) may take to arrive.
_DRAIN_S = 1.0


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    """Read the body's end after ``[DONE]`` (it comes in the same write), so its connection can be reused."""
    with contextlib.suppress(TimeoutError, httpx.HTTPError, _http1.WireError):
        async with asyncio.timeout(_DRAIN_S):
            async for _ in chunks:
                pass


async def parse_sse(chunks: AsyncIterator[bytes]) -> AsyncGenerator[tuple[str, str, str], None]:
    """``(last event id, event name, data)`` of each event in a ``text/event-stream`` body.

    The body is split at blank lines (after any CRLF or CR line ends are made
    LF); each block's fields are read as the SSE specification says: ``data``
    lines joined with LF, the event name ``message`` unless given, the last
    ``id`` kept across events, comments and unknown fields ignored, and a
    block without data not dispatched (nor one the body ends in the middle of).
    """
    last_id = ""
    pending = b""
    held_cr = False  # a CR at the end of a chunk may be the first half of a CRLF
    async for chunk in chunks:
        buf = pending + (b"\r" if held_cr else b"") + chunk
        held_cr = buf.endswith(b"\r")
        if held_cr:
            buf = buf[:-1]
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        blocks = buf.split(b"\n\n")
        pending = blocks.pop()
        for block in blocks:
            event, data, last_id = _block(block, last_id)
            if data is not None:
                yield last_id, event, data
    if held_cr and pending.endswith(b"\n"):
        # The body ended: its last CR was a line end, the one that ends the last event.
        event, data, last_id = _block(pending[:-1], last_id)
        if data is not None:
            yield last_id, event, data


def _block(block: bytes, last_id: str) -> tuple[str, str | None, str]:
    """One event block's (name, data or None without data lines, last id)."""
    event = ""
    data: list[str] = []
    for line in block.decode("utf-8", errors="replace").split("\n"):
        if not line or line[0] == ":":
            continue
        name, _, value = line.partition(":")
        if value[:1] == " ":
            value = value[1:]
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
        elif name == "id" and "\0" not in value:
            last_id = value
    return event or "message", "\n".join(data) if data else None, last_id


def _why(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
