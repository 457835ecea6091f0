"""Tool calls parsed from a model's own words: Hermes/Qwen blocks, Llama's JSON, Mistral's list,
whole and piece by piece, and what is text after all."""

from __future__ import annotations

import json

import pytest

from rbee.queen.toolcalls import ToolCall, ToolCallScanner, parse

NAMES = ("get_weather", "get_time")
WEATHER = ToolCall("get_weather", '{"city":"Paris"}')
TIME = ToolCall("get_time", "{}")


def _pieces(text: str, scanner: ToolCallScanner, size: int) -> list[str | ToolCall]:
    out: list[str | ToolCall] = []
    for at in range(0, len(text), size):
        out.extend(scanner.feed(text[at : at + size]))
    return out + scanner.finish()


def _joined(items: list[str | ToolCall]) -> tuple[str, list[ToolCall]]:
    return "".join(i for i in items if isinstance(i, str)), [i for i in items if isinstance(i, ToolCall)]


CASES = [
    # Hermes / Qwen
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "", [WEATHER]),
    (
        'Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>',
        "Let me check.",
        [WEATHER, TIME],
    ),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}', "", [WEATHER]),  # never closed
    ('<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}</tool_call>', "", [WEATHER]),
    # Llama 3.x
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [WEATHER]),
    ('  {"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}', "", [WEATHER]),
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [WEATHER]),
    (
        '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}',
        "",
        [
            WEATHER,
            TIME,
        ],
    ),
    # Mistral
    (
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abc123XYZ"}]',
        "",
        [ToolCall("get_weather", '{"city":"Paris"}', "abc123XYZ")],
    ),
    ('[{"name": "get_weather", "arguments": {"city": "Paris"}}]', "", [WEATHER]),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', "", [WEATHER]),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}', "", [WEATHER, TIME]),
    # OpenAI's own shape inside a block
    ('<tool_call>{"type": "function", "function": {"name": "get_time", "arguments": {}}}</tool_call>', "", [TIME]),
]


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_each_familys_calls_are_parsed(text: str, content: str, calls: list[ToolCall]) -> None:
    parsed = parse(text, NAMES)
    assert parsed.calls == calls and parsed.content == content


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
@pytest.mark.parametrize("size", [1, 2, 5, 1000])
def test_pieces_give_what_the_whole_gives(text: str, content: str, calls: list[ToolCall], size: int) -> None:
    got_text, got_calls = _joined(_pieces(text, ToolCallScanner(NAMES), size))
    assert got_calls == calls and got_text.strip() == content


TEXTS = [
    "The weather in Paris is mild.",
    '{"name": "Bob", "age": 3}',  # JSON, but no call: no arguments
    '{"name": "get_weather", "parameters": {"city": "Par',  # cut short
    '<tool_call>{"name": "get_weather", "arguments": {"city"',  # cut short in a block
    '<tool_call>{"name": "launch_rockets", "arguments": {}}</tool_call>',  # no such tool
    "I use <tool_ in prose, and [TOOL_ too.",
    "Use <tool_call> tags like this: <tool_call>not json</tool_call>",
    "[1, 2, 3]",
    "{}",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("size", [1, 3, 1000])
def test_what_is_no_call_is_text_as_written(text: str, size: int) -> None:
    got_text, got_calls = _joined(_pieces(text, ToolCallScanner(NAMES), size))
    assert got_calls == [] and got_text == text
    assert parse(text, NAMES).calls == [] and parse(text, NAMES).content == text.strip()


def test_text_before_a_call_is_given_before_the_call_opens() -> None:
    scanner = ToolCallScanner(NAMES)
    assert scanner.feed("Checking ") == ["Checking "]
    assert scanner.feed("now <tool") == ["now "]  # "<tool" may open a call: held
    assert scanner.feed("_call>") == []
    assert scanner.feed('{"name": "get_time", "arguments": {}}') == []
    assert scanner.feed("</tool_call>") == [TIME]  # a Hermes call is given once its block closes
    assert scanner.finish() == []
    assert scanner.calls == 1


def test_held_text_that_is_no_marker_is_given() -> None:
    scanner = ToolCallScanner(NAMES)
    assert scanner.feed("a <tool") == ["a "]
    assert scanner.feed("s are handy") == ["<tools are handy"]


def test_any_name_without_a_list_of_tools() -> None:
    parsed = parse('<tool_call>{"name": "anything", "arguments": {"x": [1, "é"]}}</tool_call>')
    assert parsed.calls == [ToolCall("anything", '{"x":[1,"é"]}')]
    assert json.loads(parsed.calls[0].arguments) == {"x": [1, "é"]}


def test_text_after_the_calls_is_kept() -> None:
    parsed = parse('<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\nDone.', NAMES)
    assert parsed.calls == [TIME] and parsed.content == "Done."
