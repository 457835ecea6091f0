"""One server-sent events decoder, sans IO: bytes in, frames out.

:class:`Decoder` follows the WHATWG rules for ``text/event-stream``: lines
end in CR, LF or CRLF (a lone CR too, and a CRLF split between two reads is
one line end); a leading byte order mark is dropped; ``data`` lines are joined
with LF; the event name is ``message`` unless an ``event`` field gives one;
the last ``id`` is kept across frames, and an ``id`` containing NUL is
ignored; a ``retry`` of ASCII digits sets :attr:`Decoder.retry_ms`; comments
(``: ping``) and unknown fields are ignored; a block without ``data`` is never
dispatched, nor one the body ends in the middle of.

It splits what arrives at blank lines and reads each block's fields at once:
the queen relays every token through it, and a line-by-line decoder over
decoded text cost more than everything else the relay does per token.

The data of a frame is text; rbee's servers send one line of JSON in each
(and ``[DONE]`` last). One policy for data that is not JSON, in every client:
the stream cannot be trusted past it, so reading :attr:`Event.data` raises
:class:`rbee.errors.StreamBroken` naming the frame, as a stream that breaks
off does. Relaying :attr:`Event.raw` never parses it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterable, Iterable, Iterator
from typing import Any

from rbee.wire.protocol import EVENT_MESSAGE

__all__ = ["Decoder", "Event", "Frame", "aiter_frames", "iter_frames"]

_BOM = b"\xef\xbb\xbf"


#: One dispatched event: ``(id, event, data)``, the id being the last one seen so far (SSE's
#: "last event ID"). A plain tuple: the queen decodes one per token it relays.
Frame = tuple[str, str, str]


class Decoder:
    """Feed it a stream's bytes as they arrive; it returns the frames each piece completes."""

    __slots__ = ("_held_cr", "_pending", "_started", "last_event_id", "retry_ms")

    def __init__(self) -> None:
        #: The id of the last frame (SSE's "last event ID"): what a reconnect sends back.
        self.last_event_id = ""
        #: The reconnection time the server asked for, in ms (None: it did not say).
        self.retry_ms: int | None = None
        self._pending = b""
        self._held_cr = False  # a CR at the end of a piece may be the first half of a CRLF
        self._started = False  # past a possible byte order mark

    def feed(self, chunk: bytes) -> list[Frame]:
        if self._started:
            buf = self._pending + chunk if not self._held_cr else self._pending + b"\r" + chunk
        else:
            buf = self._pending + chunk
            if len(buf) < len(_BOM) and _BOM.startswith(buf):
                self._pending = buf
                return []
            self._started = True
            buf = buf.removeprefix(_BOM)
        self._held_cr = held = buf.endswith(b"\r")
        if held:
            buf = buf[:-1]
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        blocks = buf.split(b"\n\n")
        self._pending = blocks.pop()
        frames = []
        for block in blocks:
            frame = self._block(block)
            if frame is not None:
                frames.append(frame)
        return frames

    def close(self) -> list[Frame]:
        """The body has ended: the frame its last CR completes, if any; an unfinished one is dropped."""
        pending, held = self._pending, self._held_cr
        self._pending, self._held_cr = b"", False
        if held and pending.endswith(b"\n"):
            frame = self._block(pending[:-1])
            if frame is not None:
                return [frame]
        return []

    def _block(self, block: bytes) -> Frame | None:
        text = block.decode("utf-8", errors="replace")
        if text.startswith("id: "):
            # The shape every rbee server writes, ``id: N``, ``event: K``, ``data: D``, read in one go.
            lines = text.split("\n")
            if len(lines) == 3 and lines[1].startswith("event: ") and lines[2].startswith("data: "):
                last_id = lines[0][4:]
                if "\0" not in last_id:
                    self.last_event_id = last_id
                    return last_id, lines[1][7:] or EVENT_MESSAGE, lines[2][6:]
        event = ""
        data: list[str] = []
        last_id = self.last_event_id
        for line in text.split("\n"):
            if not line or line[0] == ":":
                continue
            name, _, value = line.partition(":")
            if value[:1] == " ":
                value = value[1:]
            if name == "data":
                data.append(value)
            elif name == "event":
                event = value
            elif name == "id":
                if "\0" not in value:
                    last_id = value
            elif name == "retry" and value.isascii() and value.isdigit():
                self.retry_ms = int(value)
        self.last_event_id = last_id
        if not data:
            return None
        return last_id, event or EVENT_MESSAGE, data[0] if len(data) == 1 else "\n".join(data)


async def aiter_frames(chunks: AsyncIterable[bytes], decoder: Decoder | None = None) -> AsyncGenerator[Frame, None]:
    """The frames of a body read as an async iterator of bytes."""
    decoder = decoder or Decoder()
    feed = decoder.feed
    async for chunk in chunks:
        for frame in feed(chunk):
            yield frame
    for frame in decoder.close():
        yield frame


def iter_frames(chunks: Iterable[bytes], decoder: Decoder | None = None) -> Iterator[Frame]:
    """The frames of a body read as an iterator of bytes."""
    decoder = decoder or Decoder()
    feed = decoder.feed
    for chunk in chunks:
        yield from feed(chunk)
    yield from decoder.close()


class Event:
    """One event of a job's stream: its ``id``, ``kind`` (the SSE event name) and data as sent.

    :attr:`data` is parsed on first use (a relayed token never is); data that
    is not JSON raises :class:`~rbee.errors.StreamBroken`.
    """

    __slots__ = ("_data", "id", "kind", "raw")

    def __init__(self, event_id: int, kind: str, raw: str, data: Any = None) -> None:
        self.id = event_id
        self.kind = kind
        self.raw = raw
        #: The parsed data, when the caller has already parsed ``raw``.
        self._data: Any = data

    @property
    def data(self) -> Any:
        if self._data is None:
            try:
                self._data = json.loads(self.raw)
            except ValueError:
                # Imported here: the keeper's start is on the clock and this is the rare path.
                from rbee.errors import StreamBroken

                raise StreamBroken(
                    f"event {self.id} ({self.kind}) does not carry JSON: {self.raw[:80]!r}", event_id=self.id
                ) from None
        return self._data

    def json_line(self) -> str:
        """``{"id", "event", "data"}`` on one line; the data is passed through as sent."""
        raw = self.raw if self.raw.startswith(("{", "[")) else json.dumps(self.data)
        return f'{{"id":{self.id},"event":{json.dumps(self.kind)},"data":{raw}}}'

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Event):
            return NotImplemented
        return (self.id, self.kind, self.raw) == (other.id, other.kind, other.raw)

    def __hash__(self) -> int:
        return hash((self.id, self.kind, self.raw))

    def __repr__(self) -> str:
        return f"Event({self.id}, {self.kind!r}, {self.raw[:60]!r})"
