"""The SSE decoder: the WHATWG rules, however the bytes are cut; the event type and its one policy for bad data."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from rbee.errors import StreamBroken
from rbee.wire.sse import Decoder, Event, aiter_frames, iter_frames


def parsed(*parts: bytes) -> list[tuple[str, str, str]]:
    return list(iter_frames(parts))


def test_events_split_anywhere_across_chunks_parse_the_same() -> None:
    body = b'id: 1\nevent: token\ndata: {"t":"a"}\n\nid: 2\nevent: end\ndata: {"s":1}\n\ndata: [DONE]\n\n'
    whole = parsed(body)
    assert whole == [("1", "token", '{"t":"a"}'), ("2", "end", '{"s":1}'), ("2", "message", "[DONE]")]
    for cut in range(1, len(body)):
        assert parsed(body[:cut], body[cut:]) == whole
    assert parsed(*[bytes([b]) for b in body]) == whole


def test_crlf_and_cr_line_ends_are_line_ends_even_split_between_chunks() -> None:
    body = b"id: 5\r\nevent: token\r\ndata: x\r\n\r\nevent: end\rdata: y\r\r"
    assert parsed(body) == [("5", "token", "x"), ("5", "end", "y")]
    cut = body.index(b"\r\n\r\n") + 1  # between a \r and its \n
    assert parsed(body[:cut], body[cut:]) == [("5", "token", "x"), ("5", "end", "y")]


def test_a_lone_cr_then_lf_in_the_next_chunk_is_one_line_end_not_two() -> None:
    # "data: a\r" + "\ndata: b\n\n": one event with two data lines, not an event "a" and one "b".
    assert parsed(b"data: a\r", b"\ndata: b\n\n") == [("", "message", "a\nb")]
    # A lone CR followed by something else is a line end of its own.
    assert parsed(b"data: a\r", b"data: b\r\r") == [("", "message", "a\nb")]


def test_mixed_line_ends_in_one_stream() -> None:
    body = b"data: 1\r\n\ndata: 2\n\rdata: 3\r\r\n"
    assert parsed(body) == [("", "message", "1"), ("", "message", "2"), ("", "message", "3")]


def test_comments_and_blocks_without_data_are_never_events() -> None:
    # A keep-alive ping after an event with an id is not an empty "message" event.
    body = b"id: 1\nevent: token\ndata: a\n\n: ping\n\n: ping\n\nretry: 10\n\nid: 2\nevent: end\ndata: b\n\n"
    assert parsed(body) == [("1", "token", "a"), ("2", "end", "b")]


def test_data_lines_join_and_fields_follow_the_spec() -> None:
    # One empty data line is still data (the spec dispatches it); unknown fields are ignored.
    body = b"data:first\ndata: second\nevent:named\nunknown: x\n\ndata\n\n"
    assert parsed(body) == [("", "named", "first\nsecond"), ("", "message", "")]


def test_only_one_space_after_the_colon_is_dropped() -> None:
    assert parsed(b"data:  two spaces\n\n") == [("", "message", " two spaces")]


def test_an_id_containing_nul_is_ignored_and_the_last_id_carries_over() -> None:
    body = b"id: 7\ndata: a\n\nid: 8\x00x\ndata: b\n\ndata: c\n\n"
    assert parsed(body) == [("7", "message", "a"), ("7", "message", "b"), ("7", "message", "c")]


def test_an_id_in_a_block_without_data_still_sets_the_last_id() -> None:
    decoder = Decoder()
    assert decoder.feed(b"id: 3\n\ndata: x\n\n") == [("3", "message", "x")]
    assert decoder.last_event_id == "3"
    # An empty id resets it, as the spec says.
    assert decoder.feed(b"id\ndata: y\n\n") == [("", "message", "y")]


def test_retry_sets_the_reconnection_time_only_for_ascii_digits() -> None:
    decoder = Decoder()
    decoder.feed(b"retry: 2500\n\n")
    assert decoder.retry_ms == 2500
    decoder.feed(b"retry: 1.5\n\nretry: \xc2\xb2\n\nretry:\n\n")  # not digits (one is a superscript two)
    assert decoder.retry_ms == 2500


def test_a_leading_byte_order_mark_is_dropped_even_split_but_only_at_the_start() -> None:
    assert parsed(b"\xef\xbb\xbfdata: a\n\n") == [("", "message", "a")]
    assert parsed(b"\xef", b"\xbb", b"\xbfdata: a\n\n") == [("", "message", "a")]
    assert parsed(b"data: a\n\n\xef\xbb\xbfdata: b\n\n") == [("", "message", "a")]  # a field named BOM+data


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    assert parsed(b"data: \xff\n\n") == [("", "message", "\ufffd")]


def test_a_multibyte_character_split_between_chunks_is_whole() -> None:
    body = "data: é😀\n\n".encode()
    assert all(parsed(body[:cut], body[cut:]) == [("", "message", "é😀")] for cut in range(len(body)))


def test_an_unfinished_last_event_is_not_dispatched() -> None:
    assert parsed(b"id: 1\nevent: token\ndata: a\n\nid: 2\nevent: token\ndata: b\n") == [("1", "token", "a")]
    # A body that ends in a CR ends its line: "data: b\r\r" is a whole event.
    assert parsed(b"data: a\n\ndata: b\r", b"\r") == [("", "message", "a"), ("", "message", "b")]
    assert parsed(b"data: a\r") == []


async def test_the_async_reader_gives_the_same_frames() -> None:
    body = b"id: 1\r\nevent: token\r\ndata: a\r\r: ping\n\ndata: [DONE]\n\n"

    async def chunks() -> AsyncIterator[bytes]:
        for byte in body:
            yield bytes([byte])

    assert [f async for f in aiter_frames(chunks())] == parsed(body)


def test_event_data_is_parsed_once_and_json_that_is_not_json_breaks_the_stream() -> None:
    event = Event(3, "token", '{"t":"a","i":0}')
    assert event.data is event.data and event.data == {"t": "a", "i": 0}
    assert event.json_line() == '{"id":3,"event":"token","data":{"t":"a","i":0}}'
    with pytest.raises(StreamBroken, match="event 4 \\(token\\) does not carry JSON") as info:
        Event(4, "token", "not json").data  # noqa: B018
    assert info.value.kind == "stream_broken"


def test_events_compare_by_what_was_sent() -> None:
    assert Event(1, "end", "{}") == Event(1, "end", "{}") != Event(2, "end", "{}")
    assert repr(Event(1, "end", "{}")) == "Event(1, 'end', '{}')"
