"""Relaying another server's job onto the current job's stream.

The queen forwards hive operations to hives and inference to workers, each as
a job of their own. Their events are relayed as they arrive: tokens and
results losslessly, narration with the client's job id (the remote job id is
kept as ``remote_job_id``). The remote ``end`` is not the client's ``end``:
it is returned to the caller, which decides the outcome.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from rbee import errors
from rbee.contracts.operations import OperationBase
from rbee.errors import StreamBroken, Unreachable
from rbee.jobs.client import JobClient
from rbee.jobs.registry import current_job
from rbee.wire.errors import from_wire
from rbee.wire.sse import Event

__all__ = ["relay_job", "raise_for_end", "cancel_remote", "RemoteEnd", "TokenTrail"]

RemoteEnd = dict[str, Any]


class TokenTrail:
    """The model's token ids behind the text a job has sent so far (from its token events' ``ids``).

    Following them costs one JSON parse per token, so only jobs that may be
    carried over to another worker (greedy ones) keep a trail. ``complete`` turns
    false for good if a token event came without ids.
    """

    __slots__ = ("complete", "ids")

    def __init__(self, ids: list[int] | None = None) -> None:
        self.ids: list[int] = list(ids or ())
        self.complete = True


def raise_for_end(end: RemoteEnd, where: str) -> None:
    """Turn a remote job's unsuccessful ``end`` into the matching error."""
    status = end.get("status")
    if status == "completed":
        return
    error = dict(end.get("error") or {})
    error["message"] = str(error.get("message") or f"the job on {where} ended {status}")
    if status == "timed_out":
        raise errors.JobTimedOut(error["message"])
    if status == "cancelled":
        raise errors.JobCancelled(error["message"])
    error.setdefault("kind", "remote_failed")
    raise from_wire(error)  # the remote's own error type, its fields kept


async def relay_job(
    client: JobClient,
    operation: OperationBase | dict[str, Any],
    *,
    where: str,
    lost: type[errors.RbeeError] = errors.HiveUnreachable,
    results: bool = True,
    remote_id: str | None = None,
    trail: TokenTrail | None = None,
) -> RemoteEnd:
    """Run ``operation`` on the server behind ``client`` and relay its events.

    Returns the remote ``end`` data. A connection that fails before or during
    the stream raises ``lost``. If the current job is cancelled, the remote
    job is cancelled too before the cancellation propagates. With ``trail``,
    token ids are collected into it and every token's index is the current
    job's own (the remote job may have started after earlier tokens, on
    another worker).
    """
    job = current_job()
    if remote_id is not None:
        events = client.events(remote_id, cancel_on_disconnect=True)
        return await _follow(
            client, job, events, lambda: remote_id, where=where, lost=lost, results=results, trail=trail
        )
    # Submitted and streamed in one request: a server one network hop away costs one
    # round trip before its first event, not two.
    started: list[str] = []
    events = client.run(operation, started=started.append)
    try:
        return await _follow(
            client,
            job,
            events,
            lambda: started[0] if started else None,
            where=where,
            lost=lost,
            results=results,
            trail=trail,
        )
    except Unreachable as exc:
        raise lost(f"{where} did not answer: {exc.message}") from None


async def _follow(
    client: JobClient,
    job: Any,
    events: AsyncIterator[Event],
    remote_id: Callable[[], str | None],
    *,
    where: str,
    lost: type[errors.RbeeError],
    results: bool,
    trail: TokenTrail | None = None,
) -> RemoteEnd:
    end: RemoteEnd | None = None
    try:
        async for event in events:
            kind = event.kind
            if kind == "token":
                if trail is None:
                    await job.add_token_raw(_token_text(event.raw), event.raw)
                else:
                    text, raw = _trail_token(event.raw, job.tokens, trail)
                    await job.add_token_raw(text, raw)
            elif kind == "narration":
                data = event.data
                data["remote_job_id"] = data.get("job_id")
                data["job_id"] = job.id
                job.add_narration(data)
            elif kind == "end":
                # Not returned at once: the stream ends right after it ([DONE]), and
                # reading that far lets the connection be reused for the next job.
                end = event.data
            elif kind == "result":
                if results:
                    job.add_result(event.data)
            else:
                job.add_raw(kind, event.raw)
    except (StreamBroken, Unreachable) as exc:
        raise lost(f"{where} went away: {exc.message}") from None
    except asyncio.CancelledError:
        started = remote_id()
        if started is not None:  # else it never began, or leaving its stream cancels it
            await cancel_remote(client, started)
        raise
    if end is None:  # pragma: no cover - events() raises first
        raise lost(f"{where} closed the stream without an end")
    return end


_TOKEN_HEAD = '{"t":"'


def _token_text(raw: str) -> str:
    """The text of a token event's data, ``{"t": ..., "i": ...}``.

    The frame itself passes through unchanged; the text is kept for the job's
    record. A worker writes ``{"t":"...","i":N}``: when the data has no
    backslash, the text has no escapes and ends at the next quote, so most
    tokens need no JSON parse at all.
    """
    if raw.startswith(_TOKEN_HEAD) and "\\" not in raw:
        end = raw.find('"', 6)
        if end > 0:
            return raw[6:end]
    data = json.loads(raw)
    return str(data.get("t", "")) if isinstance(data, dict) else ""


def _trail_token(raw: str, index: int, trail: TokenTrail) -> tuple[str, str]:
    """A token event's text and frame, its ids added to ``trail``, its index made ``index``."""
    data = json.loads(raw)
    if not isinstance(data, dict):
        trail.complete = False
        return "", raw
    ids = data.get("ids")
    if isinstance(ids, list) and all(type(t) is int for t in ids):
        trail.ids.extend(ids)
    else:
        trail.complete = False
    if data.get("i") != index:
        data["i"] = index
        raw = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return str(data.get("t", "")), raw


async def cancel_remote(client: JobClient, remote_id: str) -> None:
    """Best effort, bounded: the remote stream also cancels on disconnect."""
    try:
        await asyncio.shield(asyncio.wait_for(client.cancel(remote_id), 2.0))
    except (asyncio.CancelledError, TimeoutError, errors.RbeeError, json.JSONDecodeError):
        pass
