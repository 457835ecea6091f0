"""Tools on Ollama's ``/api/chat``: with tools the answer is a grammar-constrained call
(``message.tool_calls``, arguments an object), after a tool result it is text; tool turns
go back through the template; validation and the answers' shapes, whole and streamed,
with the fake engine.

The real model's calls through the official ``ollama`` client are in
tests/e2e/test_ollama_api.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from inproc import with_worker
from rbee.queen import ollama as api

pytestmark = pytest.mark.timeout(30)

MODEL = "gemma3-270m"
MODEL_ID = "gemma-3-270m-q4_k_m"
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather", "parameters": CITY}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
CALL_PIECES = ['{"name": "get', '_weather", "arguments": ', '{"city": ', '"Par', 'is"}', "}"]
CALLED = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {}}}]}


def _parse(**fields: Any) -> api._Call:
    return api._parse({"model": MODEL, "messages": ASK, **fields}, chat=True)


# -- requests ---------------------------------------------------------------------


def test_tools_make_the_answer_a_call_of_one_of_them() -> None:
    call = _parse(tools=[WEATHER, TIME])
    assert call.calling and call.op is not None
    schema = call.op.json_schema
    assert schema is not None
    assert [alt["properties"]["name"]["const"] for alt in schema["anyOf"]] == ["get_weather", "get_time"]
    assert schema["anyOf"][0]["properties"]["arguments"] == CITY
    assert call.op.messages is not None and call.op.messages[0].role == "system"
    assert "get_weather" in call.op.messages[0].content


def test_after_a_tool_result_the_answer_is_text() -> None:
    messages = [*ASK, CALLED, {"role": "tool", "content": "18C", "tool_name": "get_weather"}]
    call = _parse(messages=messages, tools=[WEATHER])
    assert not call.calling and call.tools is not None and call.op is not None
    assert call.op.json_schema is None
    assert not _parse().calling and _parse().tools is None
    assert _parse(tools=[]).tools is None


def test_tool_turns_go_through_the_template_as_text() -> None:
    messages = [
        *ASK,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                {"function": {"name": "get_time", "arguments": '{"zone": "CET"}'}},  # OpenAI's text, as some send
            ],
        },
        {"role": "tool", "content": "noon", "tool_name": "get_time"},
        {"role": "tool", "content": "18C and sunny"},  # answers the call not answered yet
        {"role": "user", "content": "So?"},
    ]
    call = _parse(messages=messages, tools=[WEATHER, TIME])
    assert call.op is not None and call.op.messages is not None
    turns = [(m.role, m.content) for m in call.op.messages if m.role != "system"]
    assert turns == [
        ("user", ASK[0]["content"]),
        (
            "assistant",
            '{"name":"get_weather","arguments":{"city":"Paris"}}\n{"name":"get_time","arguments":{"zone":"CET"}}',
        ),
        ("user", "Tool result (get_time): noon\n\nTool result (get_weather): 18C and sunny\n\nSo?"),
    ]


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"tools": {"x": 1}}, "tools"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
            "tools[0].function.parameters",
        ),
        ({"tools": [WEATHER], "format": "json"}, "format: cannot be given with tools"),
        ({"messages": [{"role": "assistant", "tool_calls": {"x": 1}}]}, "messages[0].tool_calls"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"function": {}}]}]}, "messages[0].tool_calls[0]"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": [CALLED]}]}, "messages[0].tool_calls"),
        ({"messages": [{"role": "tool", "content": "x", "tool_name": 3}]}, "messages[0].tool_name"),
    ],
)
async def test_bad_tools_are_400_naming_the_field(tmp_path: Path, fields: dict[str, Any], words: str) -> None:
    async with with_worker(tmp_path, CALL_PIECES) as (_, client):
        r = await client.post("/api/chat", json={"model": MODEL, "messages": ASK, **fields})
        assert r.status_code == 400, r.text
        assert set(r.json()) == {"error"} and words in r.json()["error"], r.json()
        assert (await client.get("/v1/jobs")).json()["jobs"] == []


async def test_generate_refuses_tools(tmp_path: Path) -> None:
    async with with_worker(tmp_path, CALL_PIECES) as (_, client):
        r = await client.post("/api/generate", json={"model": MODEL, "prompt": "x", "tools": [WEATHER]})
        assert r.status_code == 400 and "tools" in r.json()["error"] and "/api/chat" in r.json()["error"]


# -- answers from a fake worker ---------------------------------------------------------


def _lines(r: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in r.text.splitlines() if line.strip()]


async def test_a_call_is_answered_with_tool_calls_arguments_an_object(tmp_path: Path) -> None:
    async with with_worker(tmp_path, CALL_PIECES) as (engine, client):
        body = {"model": MODEL, "messages": ASK, "tools": [WEATHER, TIME], "stream": False}
        r = await client.post("/api/chat", json=body)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["done"] is True and answer["done_reason"] == "stop"
        assert answer["message"] == {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        }
        assert answer["eval_count"] == len(CALL_PIECES)
        assert engine.last_request is not None and engine.last_request.grammar is not None
        events = (await client.get(f"/v1/jobs/{r.headers['x-rbee-job-id']}/stream")).text
        assert "ollama_tools" in events


async def test_a_streamed_call_arrives_in_one_chunk_then_done(tmp_path: Path) -> None:
    async with with_worker(tmp_path, CALL_PIECES) as (_, client):
        r = await client.post("/api/chat", json={"model": MODEL, "messages": ASK, "tools": [WEATHER]})
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        lines = _lines(r)
        assert len(lines) == 2, lines
        call, last = lines
        assert call["done"] is False and call["message"]["content"] == ""
        assert call["message"]["tool_calls"] == [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
        assert last["done"] is True and last["done_reason"] == "stop" and "tool_calls" not in last["message"]
        assert last["eval_count"] == len(CALL_PIECES)


async def test_a_call_cut_short_is_answered_as_text(tmp_path: Path) -> None:
    async with with_worker(tmp_path, CALL_PIECES) as (_, client):
        body = {"model": MODEL, "messages": ASK, "tools": [WEATHER], "options": {"num_predict": 3}}
        whole = (await client.post("/api/chat", json={**body, "stream": False})).json()
        assert whole["done_reason"] == "length" and "tool_calls" not in whole["message"]
        assert whole["message"]["content"] == "".join(CALL_PIECES[:3])
        lines = _lines(await client.post("/api/chat", json=body))
        assert "".join(line["message"]["content"] for line in lines) == "".join(CALL_PIECES[:3])
        assert lines[-1]["done_reason"] == "length" and all("tool_calls" not in line["message"] for line in lines)


async def test_after_the_tool_result_the_answer_is_streamed_text(tmp_path: Path) -> None:
    async with with_worker(tmp_path, ["It is", " 18C."]) as (engine, client):
        messages = [*ASK, CALLED, {"role": "tool", "content": "18C", "tool_name": "get_weather"}]
        lines = _lines(await client.post("/api/chat", json={"model": MODEL, "messages": messages, "tools": [WEATHER]}))
        assert [line["message"]["content"] for line in lines] == ["It is", " 18C.", ""]
        assert lines[-1]["done"] is True
        assert engine.last_request is not None and engine.last_request.grammar is None
        assert engine.last_request.messages is not None
        assert engine.last_request.messages[-1]["content"].endswith("Tool result (get_weather): 18C")


async def test_show_says_tools_are_a_capability(tmp_path: Path) -> None:
    async with with_worker(tmp_path, CALL_PIECES) as (_, client):
        shown = (await client.post("/api/show", json={"model": MODEL})).json()
        assert shown["capabilities"] == ["completion", "tools"]


HERMES = [
    "Let me check. ",
    "<tool_call>",
    '{"name": "get_weather", ',
    '"arguments": {"city": "Paris"}}',
    "</tool_call>",
]
PARIS = [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]


async def test_a_model_with_a_tool_template_gets_the_tools_and_decides(tmp_path: Path) -> None:
    async with with_worker(tmp_path, HERMES, chat_tools=True) as (engine, client):
        body = {"model": MODEL, "messages": ASK, "tools": [WEATHER, TIME], "stream": False}
        answer = (await client.post("/api/chat", json=body)).json()
        assert answer["message"] == {"role": "assistant", "content": "Let me check.", "tool_calls": PARIS}
        assert answer["done_reason"] == "stop"
        request = engine.last_request
        assert request is not None and request.grammar is None
        assert [t["function"]["name"] for t in request.tools or []] == ["get_weather", "get_time"]
        # Streamed: the text as it comes, then the call in a chunk of its own once it is whole.
        lines = _lines(await client.post("/api/chat", json={**body, "stream": True}))
        assert [line["message"].get("tool_calls") for line in lines] == [None, PARIS, None]
        assert "".join(line["message"]["content"] for line in lines) == "Let me check. "
        assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "stop"
        # After a tool result the tools still go to the template: the model decides again.
        messages = [*ASK, CALLED, {"role": "tool", "content": "18C", "tool_name": "get_weather"}]
        await client.post("/api/chat", json={**body, "messages": messages})
        assert engine.last_request is not None and engine.last_request.tools is not None


async def test_a_model_with_a_tool_template_that_answers_text(tmp_path: Path) -> None:
    async with with_worker(tmp_path, ["It is", " sunny."], chat_tools=True) as (_, client):
        body = {"model": MODEL, "messages": ASK, "tools": [WEATHER]}
        answer = (await client.post("/api/chat", json={**body, "stream": False})).json()
        assert answer["message"] == {"role": "assistant", "content": "It is sunny."}
        lines = _lines(await client.post("/api/chat", json=body))
        assert "".join(line["message"]["content"] for line in lines) == "It is sunny."
        assert all("tool_calls" not in line["message"] for line in lines)
