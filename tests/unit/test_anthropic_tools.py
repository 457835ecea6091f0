"""Tools on Anthropic's Messages API: validation naming the field, the call's schema,
``tool_use`` and ``tool_result`` turns through the template, and the answers' shapes
(whole and streamed) with the fake engine.

The real model's calls (input that validates against the tool's ``input_schema``,
through the official SDK) are in tests/e2e/test_anthropic_api.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from inproc import with_worker
from rbee.errors import InvalidOperation
from rbee.queen import anthropic as api

pytestmark = pytest.mark.timeout(30)

MODEL = "gemma3-270m"
MODEL_ID = "gemma-3-270m-q4_k_m"
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"name": "get_weather", "description": "The weather in a city", "input_schema": CITY}
TIME = {"name": "get_time", "input_schema": {"type": "object", "properties": {}}}
CALL_PIECES = ['{"name": "get', '_weather", "arguments": ', '{"city": ', '"Par', 'is"}', "}"]


def _parse(**fields: Any) -> api._Call:
    return api._parse({"model": "m", "max_tokens": 8, "messages": ASK, **fields})


def _refused(**fields: Any) -> str:
    with pytest.raises(InvalidOperation) as caught:
        _parse(**fields)
    assert caught.value.field is not None
    return api._field(caught.value.field)


# -- requests ---------------------------------------------------------------------


def test_none_and_auto_answer_as_text() -> None:
    for fields in (
        {"tools": [WEATHER]},
        {"tools": [WEATHER], "tool_choice": {"type": "auto"}},
        {"tools": [WEATHER], "tool_choice": {"type": "none"}},
        {"tool_choice": {"type": "none"}},
    ):
        call = _parse(**fields)
        assert not call.calling and call.op.json_schema is None, fields
        assert call.op.messages is not None and call.op.messages[0].role == "user"
    assert _parse(tools=[WEATHER]).tools.choice == "auto"


def test_any_is_a_call_of_one_of_the_tools_under_their_schemas() -> None:
    call = _parse(tools=[WEATHER, TIME], tool_choice={"type": "any", "disable_parallel_tool_use": True})
    assert call.calling
    schema = call.op.json_schema
    assert schema is not None
    names = [alt["properties"]["name"]["const"] for alt in schema["anyOf"]]
    assert names == ["get_weather", "get_time"]
    assert schema["anyOf"][0]["properties"]["arguments"] == CITY
    assert schema["anyOf"][0]["required"] == ["name", "arguments"]
    assert call.op.messages is not None
    system = call.op.messages[0]
    assert system.role == "system" and "get_weather" in system.content and "get_time" in system.content


def test_tool_is_a_call_of_the_one_named() -> None:
    call = _parse(system="Be brief.", tools=[WEATHER, TIME], tool_choice={"type": "tool", "name": "get_weather"})
    schema = call.op.json_schema
    assert schema is not None and schema["properties"]["name"] == {"const": "get_weather"}
    assert schema["properties"]["arguments"] == CITY
    assert call.op.messages is not None
    system = call.op.messages[0].content
    assert system.startswith("Be brief.") and "get_weather" in system and "get_time" not in system


def test_tool_use_and_tool_result_blocks_go_back_as_turns() -> None:
    messages = [
        *ASK,
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C and sunny"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "noon"}]},
                {"type": "text", "text": "So?"},
            ],
        },
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_3", "name": "get_time", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_3", "is_error": True}]},
    ]
    call = _parse(messages=messages, tools=[WEATHER, TIME])
    assert call.op.messages is not None
    turns = [(m.role, m.content) for m in call.op.messages]
    assert turns == [
        ("user", ASK[0]["content"]),
        (
            "assistant",
            'Let me look.\n{"name":"get_weather","arguments":{"city":"Paris"}}\n{"name":"get_time","arguments":{}}',
        ),
        ("user", "Tool result (get_weather): 18C and sunny\n\nTool result (get_time): noon\n\nSo?"),
        ("assistant", '{"name":"get_time","arguments":{}}'),
        ("user", "Tool error (get_time): "),
    ]


def _user(*blocks: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": list(blocks)}]


USED = [
    {"role": "user", "content": "x"},
    {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]},
]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"tools": {"name": "f"}}, "tools"),
        ({"tools": ["f"]}, "tools[0]"),
        ({"tools": [{"name": "f"}]}, "tools[0].input_schema"),
        ({"tools": [{"name": "has space", "input_schema": CITY}]}, "tools[0].name"),
        ({"tools": [{"name": "x" * 65, "input_schema": CITY}]}, "tools[0].name"),
        ({"tools": [{"input_schema": CITY}]}, "tools[0].name"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].name"),
        ({"tools": [{"name": "f", "input_schema": {"type": "string"}}]}, "tools[0].input_schema"),
        ({"tools": [{"name": "f", "input_schema": {"properties": {}}}]}, "tools[0].input_schema"),
        ({"tools": [{"name": "f", "input_schema": []}]}, "tools[0].input_schema"),
        ({"tools": [{"name": "f", "input_schema": CITY, "description": 3}]}, "tools[0].description"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type"),
        ({"tools": [WEATHER], "tool_choice": "any"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "sometimes"}}, "tool_choice"),
        ({"tool_choice": {"type": "auto"}}, "tool_choice"),
        ({"tool_choice": {"type": "any"}}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "tool"}}, "tool_choice.name"),
        ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice.name"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "any", "disable_parallel_tool_use": 1}},
            "tool_choice.disable_parallel_tool_use",
        ),
        ({"messages": _user({"type": "tool_result"})}, "messages[0].content[0].tool_use_id"),
        ({"messages": _user({"type": "tool_result", "tool_use_id": "toolu_9"})}, "messages[0].content[0].tool_use_id"),
        (
            {"messages": [*USED, *_user({"type": "tool_result", "tool_use_id": "toolu_2"})]},
            "messages[2].content[0].tool_use_id",
        ),
        (
            {"messages": [*USED, *_user({"type": "tool_result", "tool_use_id": "toolu_1", "is_error": "yes"})]},
            "messages[2].content[0].is_error",
        ),
        (
            {"messages": [*USED, *_user({"type": "tool_result", "tool_use_id": "toolu_1", "content": 3})]},
            "messages[2].content[0].content",
        ),
        (
            {
                "messages": [
                    *USED,
                    *_user({"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "image"}]}),
                ]
            },
            "messages[2].content[0].content[0].type",
        ),
        ({"messages": _user({"type": "tool_use", "id": "t", "name": "f", "input": {}})}, "messages[0].content[0].type"),
        (
            {"messages": [{"role": "assistant", "content": [{"type": "tool_use", "name": "f", "input": {}}]}]},
            "messages[0].content[0].id",
        ),
        (
            {"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "input": {}}]}]},
            "messages[0].content[0].name",
        ),
        (
            {
                "messages": [
                    {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": 1}]}
                ]
            },
            "messages[0].content[0].input",
        ),
    ],
)
def test_bad_tools_name_the_field(fields: dict[str, Any], field: str) -> None:
    assert _refused(**fields) == field


# -- answers from a fake worker ---------------------------------------------------------


def _events(text: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for frame in text.replace("\r\n", "\n").split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.splitlines() if ": " in line and not line.startswith(":"))
        if "event" in lines:
            out.append((lines["event"], json.loads(lines["data"])))
    return out


def _body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 6, "messages": ASK, "tools": [WEATHER, TIME], **fields}


async def test_any_is_answered_with_a_tool_use_block(tmp_path: Path) -> None:
    async with with_worker(tmp_path, CALL_PIECES) as (engine, client):
        r = await client.post("/v1/messages", json=_body(tool_choice={"type": "any"}))
        assert r.status_code == 200, r.text
        message = r.json()
        assert message["stop_reason"] == "tool_use" and message["stop_sequence"] is None
        (block,) = message["content"]
        assert block["type"] == "tool_use" and block["id"].startswith("toolu_") and len(block["id"]) > 12
        assert block["name"] == "get_weather" and block["input"] == {"city": "Paris"}
        assert message["usage"]["output_tokens"] == 6
        # The worker generated it under the call's grammar.
        assert engine.last_request is not None and engine.last_request.grammar is not None


async def test_a_streamed_call_is_a_tool_use_block_with_input_json_deltas(tmp_path: Path) -> None:
    async with with_worker(tmp_path, CALL_PIECES) as (_, client):
        body = _body(tool_choice={"type": "tool", "name": "get_weather"}, stream=True)
        r = await client.post("/v1/messages", json=body)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _events(r.text)
        names = [name for name, _ in events]
        assert names[:3] == ["message_start", "ping", "content_block_start"]
        assert set(names[3:-3]) == {"content_block_delta"}
        assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
        block = events[2][1]["content_block"]
        assert block["type"] == "tool_use" and block["name"] == "get_weather" and block["input"] == {}
        assert block["id"].startswith("toolu_")
        deltas = [data["delta"] for name, data in events if name == "content_block_delta"]
        assert {d["type"] for d in deltas} == {"input_json_delta"}
        assert json.loads("".join(d["partial_json"] for d in deltas)) == {"city": "Paris"}
        assert events[-2][1]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
        assert all(data["index"] == 0 for name, data in events if name.startswith("content_block"))


async def test_a_call_cut_short_is_answered_as_what_there_is(tmp_path: Path) -> None:
    async with with_worker(tmp_path, CALL_PIECES) as (_, client):
        # Before the name is whole: text, in both forms.
        r = await client.post("/v1/messages", json=_body(tool_choice={"type": "any"}, max_tokens=1))
        assert r.json()["content"] == [{"type": "text", "text": '{"name": "get'}]
        assert r.json()["stop_reason"] == "max_tokens"
        r = await client.post("/v1/messages", json=_body(tool_choice={"type": "any"}, max_tokens=1, stream=True))
        events = _events(r.text)
        assert events[2][1]["content_block"] == {"type": "text", "text": ""}
        assert events[3][1]["delta"] == {"type": "text_delta", "text": '{"name": "get'}
        assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"
        # With the name but not all of the input: the streamed block is a tool_use cut short.
        r = await client.post("/v1/messages", json=_body(tool_choice={"type": "any"}, max_tokens=4, stream=True))
        events = _events(r.text)
        assert events[2][1]["content_block"]["type"] == "tool_use"
        assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"


async def test_auto_answers_as_text_and_says_so(tmp_path: Path) -> None:
    async with with_worker(tmp_path, ["Hello", " there"]) as (engine, client):
        r = await client.post("/v1/messages", json=_body())
        assert r.status_code == 200, r.text
        assert r.json()["content"] == [{"type": "text", "text": "Hello there"}]
        assert r.json()["stop_reason"] == "end_turn"
        assert engine.last_request is not None and engine.last_request.grammar is None
        events = (await client.get(f"/v1/jobs/{r.headers['x-rbee-job-id']}/stream")).text
        assert "anthropic_tools_auto" in events and "get_weather" in events


async def test_a_bad_tool_is_400_in_anthropics_shape_and_no_job(tmp_path: Path) -> None:
    async with with_worker(tmp_path, CALL_PIECES) as (_, client):
        for body, field in (
            (_body(tools=[{"name": "f", "input_schema": {"type": "array"}}]), "tools[0].input_schema"),
            (_body(tool_choice={"type": "tool", "name": "nope"}), "tool_choice.name"),
            (_body(tools=[{"name": "bad name!", "input_schema": CITY}]), "tools[0].name"),
        ):
            r = await client.post("/v1/messages", json=body)
            assert r.status_code == 400, r.text
            error = r.json()
            assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
            assert error["error"]["message"].startswith(field), error
        assert (await client.get("/v1/jobs")).json()["jobs"] == []


async def test_count_tokens_counts_the_tools_told_to_the_model(tmp_path: Path) -> None:
    async with with_worker(tmp_path, CALL_PIECES) as (_, client):
        body = {"model": MODEL, "messages": ASK, "tools": [WEATHER]}
        plain = (await client.post("/v1/messages/count_tokens", json=body)).json()["input_tokens"]
        forced = await client.post("/v1/messages/count_tokens", json={**body, "tool_choice": {"type": "any"}})
        assert forced.status_code == 200, forced.text
        assert forced.json()["input_tokens"] > plain > 0


HERMES = [
    "Let me check. ",
    "<tool_call>",
    '{"name": "get_weather", ',
    '"arguments": {"city": "Paris"}}',
    "</tool_call>",
]


async def test_auto_with_a_tool_template_gives_the_tools_and_reads_the_models_calls(tmp_path: Path) -> None:
    async with with_worker(tmp_path, HERMES, chat_tools=True) as (engine, client):
        r = await client.post("/v1/messages", json=_body(max_tokens=20))
        assert r.status_code == 200, r.text
        message = r.json()
        assert message["stop_reason"] == "tool_use"
        text, block = message["content"]
        assert text == {"type": "text", "text": "Let me check."}
        assert block["type"] == "tool_use" and block["id"].startswith("toolu_")
        assert (block["name"], block["input"]) == ("get_weather", {"city": "Paris"})
        request = engine.last_request
        assert request is not None and request.grammar is None
        assert [t["function"]["name"] for t in request.tools or []] == ["get_weather", "get_time"]
        narration = (await client.get(f"/v1/jobs/{r.headers['x-rbee-job-id']}/stream")).text
        assert "anthropic_tools_template" in narration
        # Streamed: the text block, then the call's block once it is whole.
        r = await client.post("/v1/messages", json=_body(max_tokens=20, stream=True))
        events = _events(r.text)
        starts = [(d["index"], d["content_block"]["type"]) for n, d in events if n == "content_block_start"]
        assert starts == [(0, "text"), (1, "tool_use")]
        stops = [d["index"] for n, d in events if n == "content_block_stop"]
        assert stops == [0, 1]
        text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta" and d["index"] == 0)
        assert text == "Let me check. "
        partial = [d["delta"]["partial_json"] for n, d in events if n == "content_block_delta" and d["index"] == 1]
        assert json.loads("".join(partial)) == {"city": "Paris"}
        assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


async def test_auto_with_a_tool_template_and_no_call_is_text(tmp_path: Path) -> None:
    async with with_worker(tmp_path, ["It is", " sunny."], chat_tools=True) as (engine, client):
        r = await client.post("/v1/messages", json=_body(max_tokens=20))
        assert r.json()["content"] == [{"type": "text", "text": "It is sunny."}]
        assert r.json()["stop_reason"] == "end_turn"
        assert engine.last_request is not None and engine.last_request.tools is not None
        r = await client.post("/v1/messages", json=_body(max_tokens=20, stream=True))
        events = _events(r.text)
        assert [n for n, _ in events if n == "content_block_start"] == ["content_block_start"]
        assert events[-2][1]["delta"]["stop_reason"] == "end_turn"
        # tool_choice none: the tools are not given to the template.
        r = await client.post("/v1/messages", json=_body(max_tokens=20, tool_choice={"type": "none"}))
        assert r.json()["content"] == [{"type": "text", "text": "It is sunny."}]
        assert engine.last_request is not None and engine.last_request.tools is None
