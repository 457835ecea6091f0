"""The SSE stream writer (rbee.server.sse): frames, pings, disconnect, shutdown, bounded buffers.

The response is driven as an ASGI app with a hand-made ``receive`` and ``send``,
so each race (the client leaving, the server exiting, a quiet interval) is
started exactly when the test says.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.background import BackgroundTask

from rbee.server.sse import PING, EventStream, ServerSentEvent, ShutdownWatch, Source
from rbee.wire.sse import Decoder

pytestmark = pytest.mark.timeout(10)

GET = {"type": "http", "method": "GET"}


class Client:
    """``receive`` and ``send`` of one request: the body as it was sent, and a way to leave."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.gone = asyncio.Event()
        self.first_body = asyncio.Event()
        self.sent_at: list[float] = []

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        if message["type"] == "http.response.body" and message["body"]:
            self.sent_at.append(asyncio.get_running_loop().time())
            self.first_body.set()

    @property
    def body(self) -> bytes:
        return b"".join(m["body"] for m in self.messages if m["type"] == "http.response.body")

    @property
    def ended(self) -> int:
        """How many times the body was ended (exactly once, for a stream that was answered)."""
        return sum(1 for m in self.messages if m["type"] == "http.response.body" and not m["more_body"])

    def headers(self) -> dict[bytes, bytes]:
        return dict(self.messages[0]["headers"])


async def run(response: EventStream, client: Client, scope: dict[str, Any] = GET) -> None:
    await response(scope, client.receive, client.send)  # type: ignore[arg-type]


async def frames(items: list[bytes], *, delay: float = 0.0, closed: list[str] | None = None) -> AsyncIterator[bytes]:
    try:
        for item in items:
            if delay:
                await asyncio.sleep(delay)
            yield item
    finally:
        if closed is not None:
            closed.append("closed")


def tasks_left() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task() and t.get_name().startswith("sse:")}


async def test_an_iterators_frames_are_written_unchanged_then_the_body_ends_once() -> None:
    client = Client()
    items = [b"data: 1\n\n", ServerSentEvent(data="2", event="e", id=2), b"data: [DONE]\n\n"]

    async def content() -> AsyncIterator[bytes | ServerSentEvent]:
        for item in items:
            yield item

    await run(EventStream(content(), headers={"x-rbee-job-id": "job-1", "Cache-Control": "no"}), client)
    assert client.body == b"data: 1\n\nid: 2\nevent: e\ndata: 2\n\ndata: [DONE]\n\n"
    assert client.ended == 1
    headers = client.headers()
    assert headers[b"content-type"] == b"text/event-stream; charset=utf-8"
    assert headers[b"cache-control"] == b"no-store"  # the stream's own, whatever is asked
    assert headers[b"x-accel-buffering"] == b"no"
    assert headers[b"x-rbee-job-id"] == b"job-1"
    assert not tasks_left()


async def test_a_ping_is_written_after_each_quiet_interval_and_never_while_frames_flow() -> None:
    client = Client()
    busy = [f"data: {i}\n\n".encode() for i in range(20)]

    async def content() -> AsyncIterator[bytes]:
        for item in busy:  # 20 frames 10 ms apart: never quiet for a whole interval
            await asyncio.sleep(0.01)
            yield item
        await asyncio.sleep(0.35)  # quiet: about three intervals
        yield b"data: [DONE]\n\n"

    await run(EventStream(content(), ping_s=0.1), client)
    body = client.body.decode()
    before, after = body.split("data: 19\n\n")
    assert PING.decode() not in before
    assert 2 <= after.count(PING.decode()) <= 4
    assert after.endswith("data: [DONE]\n\n")


async def test_no_silence_is_longer_than_the_ping_interval() -> None:
    client = Client()

    async def uneven() -> AsyncIterator[bytes]:
        for pause in (0.01, 0.09, 0.17, 0.05, 0.26, 0.12):  # frames just before, at and past each ping
            await asyncio.sleep(pause)
            yield b"data: x\n\n"

    await run(EventStream(uneven(), ping_s=0.1), client)
    gaps = [b - a for a, b in zip(client.sent_at, client.sent_at[1:], strict=False)]
    assert max(gaps) < 0.1 * 1.5, gaps


async def test_no_ping_is_written_when_pings_are_off() -> None:
    client = Client()
    await run(EventStream(frames([b"data: 1\n\n"], delay=0.2), ping_s=None), client)
    assert client.body == b"data: 1\n\n"


async def test_the_ping_frame_can_be_an_event() -> None:
    client = Client()
    ping = ServerSentEvent(data='{"type":"ping"}', event="ping")
    await run(EventStream(frames([b"data: 1\n\n"], delay=0.15), ping_s=0.1, ping=ping), client)
    assert client.body == b'event: ping\ndata: {"type":"ping"}\n\ndata: 1\n\n'


async def test_a_client_that_leaves_ends_the_stream_closes_the_iterator_and_runs_the_background() -> None:
    client = Client()
    closed: list[str] = []
    background: list[str] = []

    async def after() -> None:
        background.append("ran")

    response = EventStream(frames([b"data: 1\n\n"] * 1000, delay=0.01, closed=closed), background=BackgroundTask(after))
    task = asyncio.create_task(run(response, client))
    await client.first_body.wait()
    client.gone.set()
    await asyncio.wait_for(task, 2)
    assert closed == ["closed"] and background == ["ran"]
    assert client.ended == 1 and client.messages[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert client.body.count(b"data: 1") < 1000
    assert not tasks_left()


async def test_shutdown_during_a_stream_ends_it_at_once_and_closes_the_iterator() -> None:
    exiting = False
    watch = ShutdownWatch(lambda: exiting, poll_s=0.02)
    client = Client()
    closed: list[str] = []

    async def silent() -> AsyncIterator[bytes]:
        try:
            yield b"data: 1\n\n"
            await asyncio.sleep(3600)
            yield b"never"
        finally:
            closed.append("closed")

    task = asyncio.create_task(run(EventStream(silent(), watch=watch), client))
    await client.first_body.wait()
    assert len(watch) == 1
    exiting = True
    await asyncio.wait_for(task, 1)
    assert client.body == b"data: 1\n\n" and client.ended == 1 and closed == ["closed"]
    assert len(watch) == 0 and not tasks_left()


async def test_close_all_ends_every_open_stream() -> None:
    watch = ShutdownWatch(lambda: False)
    clients = [Client() for _ in range(3)]
    streams = [EventStream(frames([b"data: 1\n\n"], delay=3600), watch=watch) for _ in clients]
    tasks = [asyncio.create_task(run(s, c)) for s, c in zip(streams, clients, strict=True)]
    await asyncio.sleep(0.05)  # each is waiting for its first frame
    assert len(watch) == 3
    watch.close_all()
    await asyncio.wait_for(asyncio.gather(*tasks), 1)
    assert all(c.ended == 1 and c.body == b"" for c in clients)


async def test_a_slow_client_holds_the_iterator_at_the_buffers_bound() -> None:
    produced = 0
    release = asyncio.Event()

    async def many() -> AsyncIterator[bytes]:
        nonlocal produced
        for i in range(100):
            produced += 1
            yield f"data: {i}\n\n".encode()

    class Slow(Client):
        async def send(self, message: dict[str, Any]) -> None:
            await super().send(message)
            if message["type"] == "http.response.body" and message["body"]:
                await release.wait()  # the socket is full until the test lets it drain

    client = Slow()
    response = EventStream(many())
    response.source.limit = 4  # type: ignore[attr-defined]
    task = asyncio.create_task(run(response, client))
    await client.first_body.wait()
    await asyncio.sleep(0.05)
    assert produced <= 4 + 4 + 1  # the frames written, the buffer, the one being made
    release.set()
    await asyncio.wait_for(task, 2)
    assert client.body.count(b"data: ") == 100


async def test_an_error_in_the_iterator_is_raised_and_the_body_is_not_ended_as_if_complete() -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        raise RuntimeError("bug")

    client = Client()
    with pytest.raises(RuntimeError, match="bug"):
        await run(EventStream(broken()), client)
    assert client.ended == 0
    assert not tasks_left()


async def test_head_sends_the_headers_and_closes_the_iterator_unstarted() -> None:
    client = Client()
    closed: list[str] = []
    await run(EventStream(frames([b"data: 1\n\n"], closed=closed)), client, {"type": "http", "method": "HEAD"})
    assert client.body == b"" and client.ended == 1
    assert closed == []  # never started, so its finally has nothing to run; it is closed all the same


async def test_a_source_whose_frames_are_all_there_is_written_in_one_write_without_a_task() -> None:
    class Ready(Source):
        def take(self) -> tuple[bytes, bool]:
            return b"id: 1\nevent: end\ndata: {}\n\ndata: [DONE]\n\n", True

    client = Client()
    watch = ShutdownWatch()
    await run(EventStream(Ready(), watch=watch), client)
    bodies = [m for m in client.messages if m["type"] == "http.response.body"]
    assert len(bodies) == 1 and not bodies[0]["more_body"]
    assert client.body.count(b"event: end") == 1 and client.body.endswith(b"data: [DONE]\n\n")


@settings(max_examples=200, deadline=None, database=None)
@given(
    data=st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)) | st.sampled_from(["\n", "\r"])),
    event=st.text(st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\0"), min_size=1),
    event_id=st.integers(0, 2**31),
)
def test_an_event_decodes_to_what_was_encoded(data: str, event: str, event_id: int) -> None:
    encoded = ServerSentEvent(data=data, event=event, id=event_id).encode()
    frames = Decoder().feed(encoded)
    assert len(frames) == 1
    got_id, got_event, got_data = frames[0]
    assert got_id == str(event_id)
    named = "".join(event.replace("\r\n", "\n").replace("\r", "\n").split("\n"))  # a line break would end the field
    assert got_event == (named or "message")
    assert got_data == data.replace("\r\n", "\n").replace("\r", "\n")
