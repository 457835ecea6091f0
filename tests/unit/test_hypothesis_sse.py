"""Property tests of the SSE decoder and of both clients over it: however the bytes are cut, the same events come out.

A stream is built the way the servers write it (``id``/``event``/``data``
frames of one-line JSON with any text in it, ``: ping`` comments between them,
``\\n`` or ``\\r\\n`` line ends, then ``data: [DONE]``), cut into arbitrary
chunks (inside a multi-byte character or a ``\\r\\n`` pair too), and read by
the keeper's stdlib reader and by :class:`rbee.jobs.client.JobClient`. The
decoder itself also gets streams whose every line ends in LF, CRLF or a lone
CR, chosen line by line, after an optional byte order mark.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rbee.jobs.client import JobClient
from rbee.keeper.client import _frames
from rbee.wire.sse import Decoder

SETTINGS = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# Any text a model or a narration may carry, multi-byte and line-breaking characters included.
any_text = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",)) | st.sampled_from(["\n", "\r", "\u2028", "\x85", ":"]),
    max_size=12,
)
events = st.lists(
    st.one_of(
        st.builds(lambda t, i: ("token", {"t": t, "i": i}), any_text, st.integers(0, 10_000)),
        st.builds(lambda h: ("narration", {"actor": "queen", "action": "x", "human": h}), any_text),
        st.builds(lambda n: ("progress", {"action": "queue", "done": n, "total": 9, "unit": ""}), st.integers(0, 9)),
        st.builds(lambda v: ("result", {"value": v}), any_text),
    ),
    max_size=8,
)


def encode(body: list[tuple[str, dict[str, Any]]], *, crlf: bool, pings: list[bool]) -> tuple[bytes, list[Any]]:
    """The stream a server writes for ``body`` plus its end, and the events a reader must see."""
    nl = "\r\n" if crlf else "\n"
    all_events = [*body, ("end", {"job_id": "job-1", "status": "completed", "error": None, "duration_ms": 1.0})]
    out = []
    expected = []
    for n, (kind, data) in enumerate(all_events, start=1):
        if pings[n % len(pings)]:
            out.append(f": ping{nl}{nl}")
        raw = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        out.append(f"id: {n}{nl}event: {kind}{nl}data: {raw}{nl}{nl}")
        expected.append((n, kind, data))
    out.append(f"data: [DONE]{nl}{nl}")
    return "".join(out).encode(), expected


def cut(data: bytes, points: list[int]) -> list[bytes]:
    at = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(at) if b > a]


stream_cases = st.tuples(
    events, st.booleans(), st.lists(st.booleans(), min_size=1, max_size=4), st.lists(st.integers(0, 10**6), max_size=40)
)


class _Chunks:
    """Stands in for ``http.client.HTTPResponse``: ``read1`` hands out one chunk at a time."""

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)

    def read1(self, n: int = -1) -> bytes:
        return next(self._chunks, b"")


@SETTINGS
@given(stream_cases)
def test_the_keeper_reader_sees_the_same_events_however_the_bytes_are_cut(case: Any) -> None:
    body, crlf, pings, points = case
    data, expected = encode(body, crlf=crlf, pings=pings)

    frames = list(_frames(_Chunks(cut(data, points))))  # type: ignore[arg-type]

    assert frames[-1][1:] == ("message", "[DONE]")  # (its id is the last one seen, as SSE says)
    got = [(int(i), kind, json.loads(raw)) for i, kind, raw in frames[:-1]]
    assert got == expected


class _AsyncChunks(httpx.AsyncByteStream):
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


async def _read_with_job_client(chunks: list[bytes]) -> list[tuple[int, str, Any]]:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=_AsyncChunks(chunks))

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        client = JobClient("http://server", client=http)
        return [(e.id, e.kind, e.data) async for e in client.events("job-1")]


@SETTINGS
@given(stream_cases)
def test_the_job_client_sees_the_same_events_however_the_bytes_are_cut(case: Any) -> None:
    body, crlf, pings, points = case
    data, expected = encode(body, crlf=crlf, pings=pings)

    got = asyncio.run(_read_with_job_client(cut(data, points)))

    assert got == expected


line_ends = st.lists(st.sampled_from(["\n", "\r\n", "\r"]), min_size=1, max_size=6)


@SETTINGS
@given(events, line_ends, st.booleans(), st.lists(st.integers(0, 10**6), max_size=40))
def test_the_decoder_reads_any_mix_of_line_ends_however_the_bytes_are_cut(
    body: list[tuple[str, dict[str, Any]]], ends: list[str], bom: bool, points: list[int]
) -> None:
    lines: list[str] = []
    expected = []
    for n, (kind, data) in enumerate(body, start=1):
        raw = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        lines += [": ping", "", f"id: {n}", f"event: {kind}", f"data: {raw}", ""]
        expected.append((str(n), kind, raw))
    out, previous = [], ""
    for i, line in enumerate(lines):
        end = ends[i % len(ends)]
        if previous == "\r" and not line and end == "\n":
            end = "\r\n"  # a CR then an LF would be one CRLF, not an empty line
        out.append(line + end)
        previous = end
    text = "".join(out)
    data = (b"\xef\xbb\xbf" if bom else b"") + text.encode()

    decoder = Decoder()
    frames = [f for chunk in cut(data, points) for f in decoder.feed(chunk)] + decoder.close()

    assert frames == expected
    assert decoder.last_event_id == (str(len(body)) if body else "")
