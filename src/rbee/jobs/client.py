"""Client side of the job API: submit an operation, follow its events.

Used by the keeper (to the queen), the queen (to hives and workers) and the
tests. The stream ends at ``[DONE]``; a stream that closes without an ``end``
event raises :class:`StreamBroken`, so a caller can never mistake a lost
connection for success.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from httpx_sse import aconnect_sse

from rbee import errors
from rbee.contracts.events import DONE
from rbee.contracts.operations import OperationBase

__all__ = ["JobClient", "StreamEvent", "StreamBroken", "Unreachable", "error_from_response"]


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


class JobClient:
    """Talk to one server's job API."""

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

    async def aclose(self) -> None:
        if self._own:
            await self.client.aclose()

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
        response = await self._request("POST", "/v1/jobs", json=body)
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
        headers = dict(self.headers)
        if after:
            headers["Last-Event-ID"] = str(after)
        url = f"{self.base_url}/v1/jobs/{job_id}/stream"
        got_end = False
        try:
            async with aconnect_sse(self.client, "GET", url, params=params, headers=headers) as source:
                if source.response.status_code != 200:
                    await source.response.aread()
                    raise error_from_response(source.response)
                async for sse in source.aiter_sse():
                    if sse.data == DONE and sse.event in ("", "message"):
                        break
                    event = StreamEvent(int(sse.id) if sse.id and sse.id.isdigit() else 0, sse.event, sse.data)
                    if event.kind == "end":
                        got_end = True
                    yield event
        except httpx.TransportError as exc:
            if not got_end:
                raise StreamBroken(f"the stream from {self.base_url} broke: {_why(exc)}", url=self.base_url) from None
        if not got_end:
            raise StreamBroken(f"the stream from {self.base_url} closed before the job's end", url=self.base_url)


def _why(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
