"""The keeper's HTTP client of the queen: submit a job, follow its events, ask about jobs.

Standard library only (``http.client``): the keeper makes a handful of
requests per run and its start-up is on the clock (``rbee infer`` shows its
first token within 200 ms), and httpx with httpcore adds about 55 ms to every
run before the first byte is sent. Ctrl-C arrives as ``KeyboardInterrupt`` in
the reading loop, where the caller can cancel the job.

A stream ends at ``data: [DONE]``; one that breaks before its ``end`` event is
reconnected with ``Last-Event-ID`` (the queen replays from there) a few times,
then reported as :class:`~rbee.keeper.errors.StreamBroken`, never as success.

An ``https://`` queen is verified by the fingerprint of its certificate when
one is given (``--queen-fingerprint`` / ``RBEE_QUEEN_FINGERPRINT``: the
certificate is looked at once, compared, then trusted alone for the run's
requests, :mod:`rbee.wire.tls`), else against ``--ca-cert`` /
``RBEE_CA_CERT`` or the system's store. :mod:`ssl` and :mod:`rbee.wire.tls`
are imported only for an ``https://`` queen.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import socket
import time
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

from rbee.keeper.errors import (
    BadSetting,
    KeeperError,
    QueenUnreachable,
    RequestRefused,
    StreamBroken,
    problems_line,
)
from rbee.wire import protocol
from rbee.wire.protocol import DONE
from rbee.wire.sse import Decoder, Event, Frame

if TYPE_CHECKING:
    import ssl

__all__ = ["QueenClient", "Event", "Response", "DONE", "STREAM_READ_TIMEOUT_S", "describe"]

#: The queen sends a ping comment every 15 s while a job is quiet: four missed
#: pings mean the connection is dead, not that the job is slow.
STREAM_READ_TIMEOUT_S = 4 * protocol.PING_INTERVAL_S
RECONNECTS = 3
_USER_AGENT = "rbee-keeper"


class Response:
    """A finished (non-streaming) answer: status and body."""

    __slots__ = ("body", "status")

    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


def describe(exc: BaseException) -> str:
    """A short reason for a network error ("connection refused")."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name: {(exc.strerror or str(exc)).lower()}"
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the connection closed without an answer"
    if isinstance(exc, http.client.IncompleteRead):
        return "the connection closed in the middle of an answer"
    if type(exc).__module__ == "ssl":
        from rbee.wire.tls import describe as tls_reason

        reason = tls_reason(exc)
        if "certificate was refused" in reason:
            reason += "; pin it with --queen-fingerprint, or pass --ca-cert"
        return reason
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip()
    text = (text or type(exc).__name__).splitlines()[0]
    return (text[:1].lower() + text[1:])[:200]


def _refused_at_connect(exc: BaseException) -> bool:
    return isinstance(exc, ConnectionRefusedError) or getattr(exc, "errno", None) == errno.ECONNREFUSED


class QueenClient:
    """The queen's job API and meta endpoints, as the keeper uses them."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 30.0,
        unreachable_hint: str | None = None,
        fingerprint: str | None = None,
        ca_cert: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadSetting(f"the queen URL {url!r} is not an http(s) URL")
        try:
            self._port = parts.port
        except ValueError:
            raise BadSetting(f"the queen URL {url!r} has an invalid port") from None
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._prefix = parts.path.rstrip("/")
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.unreachable_hint = unreachable_hint
        self.headers = {"User-Agent": _USER_AGENT, "Accept": "application/json"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.fingerprint = fingerprint or os.environ.get("RBEE_QUEEN_FINGERPRINT") or None
        self.ca_cert = ca_cert or os.environ.get("RBEE_CA_CERT") or None
        if self.fingerprint or self.ca_cert:
            if not self._https:
                flag = "--queen-fingerprint" if self.fingerprint else "--ca-cert"
                raise BadSetting(f"{flag} verifies an https:// queen; the queen URL {self.url} is http")
            from rbee.wire.tls import parse_fingerprint

            if self.fingerprint:
                try:
                    self.fingerprint = parse_fingerprint(self.fingerprint)
                except ValueError as exc:
                    raise BadSetting(f"--queen-fingerprint: {exc}") from None
            if self.ca_cert and not os.path.isfile(self.ca_cert):
                raise BadSetting(f"--ca-cert: no file {self.ca_cert!r}")
        self._context: ssl.SSLContext | None = None

    def close(self) -> None:
        """Nothing is held between requests; kept for symmetry with other clients."""

    def __enter__(self) -> QueenClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the wire ----------------------------------------------------------

    def _open(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str], read_timeout_s: float
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send one request on a fresh connection; returns the connection and the response head."""
        conn: http.client.HTTPConnection
        if self._https:
            conn = http.client.HTTPSConnection(
                self._host, self._port, timeout=self.connect_timeout_s, context=self._tls()
            )
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self.connect_timeout_s)
        try:
            try:
                conn.connect()
            except OSError as exc:
                raise QueenUnreachable(
                    self.url, describe(exc), hint=self.unreachable_hint, connect=_refused_at_connect(exc)
                ) from None
            assert conn.sock is not None
            conn.sock.settimeout(read_timeout_s)
            try:
                conn.request(method, self._prefix + path, body=body, headers={**self.headers, **headers})
                return conn, conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                raise QueenUnreachable(self.url, describe(exc), hint=self.unreachable_hint) from None
        except BaseException:
            conn.close()
            raise

    def _tls(self) -> ssl.SSLContext:
        """The context of every connection to an https queen: its pinned certificate, or the usual checks."""
        if self._context is not None:
            return self._context
        from rbee.wire.tls import CertificateMismatch, pinned_context, verifying

        if self.fingerprint is None:
            self._context = verifying(self.ca_cert)
            return self._context
        try:
            self._context = pinned_context(
                self._host, self._port or 443, self.fingerprint, timeout_s=self.connect_timeout_s
            )
        except CertificateMismatch as exc:
            raise KeeperError(
                f"refusing the queen at {self.url}: {exc} (check --queen-fingerprint or RBEE_QUEEN_FINGERPRINT;"
                " `rbee queen status` on the queen's machine shows its fingerprint)"
            ) from None
        except OSError as exc:
            raise QueenUnreachable(
                self.url, describe(exc), hint=self.unreachable_hint, connect=_refused_at_connect(exc)
            ) from None
        return self._context

    def request(self, method: str, path: str, *, json_body: Any = None, timeout_s: float | None = None) -> Response:
        body = None if json_body is None else json.dumps(json_body).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn, response = self._open(method, path, body, headers, timeout_s or self.read_timeout_s)
        try:
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise QueenUnreachable(self.url, describe(exc), hint=self.unreachable_hint) from None
        finally:
            response.close()
            conn.close()
        return Response(response.status, data)

    def refused(self, status: int, body: bytes) -> RequestRefused:
        """The queen's ``{"error": {...}}`` answer as an error to show."""
        # Imported here, where something went wrong: the keeper's start is on the clock.
        from rbee.wire.errors import error_object, from_wire

        err = error_object(body)
        if err is None:
            text = body.decode(errors="replace").strip()[:200] or http.client.responses.get(status, "")
            return RequestRefused.of(status, f"the queen answered HTTP {status}: {text}")
        remote = from_wire(err, status=status)
        message = remote.message if err.get("message") else f"the queen answered HTTP {status}"
        raw_problems = remote.data.get("problems")
        problems = [p for p in raw_problems if isinstance(p, dict)] if isinstance(raw_problems, list) else []
        if problems:
            message = problems_line(problems)  # flags and plain words, not field names and pydantic's
        if status == 401:
            message += " (pass --token or set RBEE_TOKEN)"
        field = remote.data.get("field")
        kind = remote.kind if err.get("kind") else None
        return RequestRefused.of(status, message, kind=kind, field=str(field) if field else None, problems=problems)

    def get_json(self, path: str) -> Any:
        response = self.request("GET", path)
        if response.status != 200:
            raise self.refused(response.status, response.body)
        return response.json()

    # -- meta --------------------------------------------------------------

    def health(self) -> dict[str, Any] | None:
        """``/health`` if something answers it, else None."""
        try:
            response = self.request("GET", "/health", timeout_s=2.0)
            body = response.json() if response.status == 200 else None
        except (KeeperError, ValueError):
            return None
        return body if isinstance(body, dict) else None

    def info(self) -> dict[str, Any]:
        body: dict[str, Any] = self.get_json("/v1/info")
        return body

    # -- jobs --------------------------------------------------------------

    def submit(self, operation: dict[str, Any]) -> str:
        response = self.request("POST", "/v1/jobs", json_body=operation)
        if response.status != 201:
            raise self.refused(response.status, response.body)
        return str(response.json()["job_id"])

    def job(self, job_id: str) -> dict[str, Any]:
        body: dict[str, Any] = self.get_json(f"/v1/jobs/{job_id}")
        return body

    def jobs(self, limit: int = 100) -> list[dict[str, Any]]:
        body = self.get_json(f"/v1/jobs?{urlencode({'limit': limit})}")
        jobs: list[dict[str, Any]] = body.get("jobs", [])
        return jobs

    def cancel(self, job_id: str, *, timeout_s: float | None = None) -> tuple[int, dict[str, Any]]:
        """DELETE the job; returns the status (200/202 cancelled, 409 already over) and its state."""
        response = self.request("DELETE", f"/v1/jobs/{job_id}", timeout_s=timeout_s)
        if response.status not in (200, 202, 409):
            raise self.refused(response.status, response.body)
        return response.status, response.json()

    def events(
        self,
        job_id: str,
        *,
        after: int = 0,
        cancel_on_disconnect: bool = False,
        reconnects: int = RECONNECTS,
        read_timeout_s: float = STREAM_READ_TIMEOUT_S,
    ) -> Generator[Event, None, None]:
        """Yield the job's events after id ``after``, up to and including ``end``."""
        path = protocol.stream_path(job_id) + ("?cancel_on_disconnect=true" if cancel_on_disconnect else "")
        last = after
        failures = 0
        while True:
            headers = dict(protocol.ACCEPT_EVENTS)
            if last:
                headers[protocol.LAST_EVENT_ID] = str(last)
            try:
                conn, response = self._open("GET", path, None, headers, read_timeout_s)
            except QueenUnreachable as exc:
                if last == after and failures == 0:
                    raise
                conn, response, reason = None, None, exc.reason
            if conn is not None and response is not None:
                try:
                    if response.status != 200:
                        refused = self.refused(response.status, response.read())
                        if last == after and failures == 0:
                            raise refused
                        raise StreamBroken(f"the stream of {job_id} broke and could not resume: {refused.message}")
                    for event_id, kind, data in _frames(response):
                        if data == DONE and kind == protocol.EVENT_MESSAGE:
                            raise StreamBroken(f"the stream of {job_id} ended without the job's end event")
                        number = int(event_id) if event_id.isdigit() else last + 1
                        if number <= last:
                            continue  # already seen before a reconnect
                        last = number
                        failures = 0
                        try:
                            parsed = json.loads(data)  # here, where data that is not JSON breaks the stream
                        except ValueError:
                            raise StreamBroken(
                                f"the stream of {job_id} broke: event {number} ({kind}) does not carry JSON: "
                                f"{data[:80]!r}"
                            ) from None
                        yield Event(number, kind, data, parsed)
                        if kind == protocol.EVENT_END:
                            return
                    reason = "the queen closed the stream before the job's end"
                except (OSError, http.client.HTTPException) as exc:
                    reason = describe(exc)
                finally:
                    # A response that will close its connection owns the socket: closing the
                    # connection alone would leave it open until the garbage collector finds it.
                    response.close()
                    conn.close()
            failures += 1
            if failures > reconnects:
                raise StreamBroken(f"the stream of {job_id} from {self.url} broke: {reason}")
            time.sleep(min(0.25 * 2**failures, 2.0))


def _frames(response: http.client.HTTPResponse) -> Iterator[Frame]:
    """The stream's frames, as each piece arrives.

    ``read1`` returns what has arrived (at most one chunk) without waiting for
    more, so each token is seen as soon as the queen sends it.
    """
    decoder = Decoder()
    feed, read1 = decoder.feed, response.read1
    while chunk := read1(65536):
        yield from feed(chunk)
    yield from decoder.close()
