"""Tools on chat completions: validation naming the field, the call's schema, tool turns
through the template, and the answers' shapes (whole and streamed) with the fake engine.

The real model's calls (arguments that validate against the function's schema) are in
tests/e2e/test_openai_tools_model.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from rbee.errors import InvalidOperation
from rbee.queen import tools
from rbee.queen.app import QueenSettings, create_queen_app
from rbee.queen.openai import errors as openai_errors
from rbee.queen.openai import schema
from rbee.worker.app import WorkerSettings, create_worker_app
from rbee.worker.fake import FakeEngine

pytestmark = pytest.mark.timeout(30)

MODEL = "gemma3-270m"
MODEL_ID = "gemma-3-270m-q4_k_m"
CHAT = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
CALL_PIECES = ['{"name": "get', '_weather", "arguments": ', '{"city": ', '"Par', 'is"}', "}"]


def _parse(**fields: Any) -> schema.Call:
    return schema.parse({"model": "m", "messages": CHAT, **fields}, chat=True)


def _refused(**fields: Any) -> str | None:
    with pytest.raises(InvalidOperation) as caught:
        _parse(**fields)
    return openai_errors.param_name(caught.value.field)


# -- requests ---------------------------------------------------------------------


def test_none_and_auto_answer_as_text() -> None:
    for fields in ({"tools": [WEATHER], "tool_choice": "none"}, {"tools": [WEATHER]}, {"tool_choice": "none"}):
        call = _parse(**fields)
        assert call.op.json_schema is None and call.constrained_by == ""
        assert [m.content for m in call.op.messages or []] == [CHAT[0]["content"]]
    assert _parse(tools=[WEATHER]).tools.choice == "auto"  # type: ignore[union-attr]


def test_required_is_one_of_the_functions_calls() -> None:
    call = _parse(tools=[WEATHER, TIME], tool_choice="required")
    schema = call.op.json_schema
    assert schema is not None and call.constrained_by == "tools"
    names = [alt["properties"]["name"]["const"] for alt in schema["anyOf"]]
    assert names == ["get_weather", "get_time"]
    assert schema["anyOf"][0]["properties"]["arguments"] == WEATHER["function"]["parameters"]
    assert schema["anyOf"][1]["properties"]["arguments"] == {"type": "object", "properties": {}}
    assert schema["anyOf"][0]["required"] == ["name", "arguments"]
    # The model is told about them in a system turn.
    messages = call.op.messages or []
    assert messages[0].role == "system" and "get_weather" in messages[0].content and "get_time" in messages[0].content


def test_a_named_function_is_its_call_only() -> None:
    call = _parse(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    schema = call.op.json_schema
    assert schema is not None and schema["properties"]["name"] == {"const": "get_weather"}
    system = (call.op.messages or [])[0]
    assert "get_time" not in system.content
    with_system = _parse(
        messages=[{"role": "system", "content": "Be brief."}, *CHAT], tools=[WEATHER], tool_choice="required"
    )
    first = (with_system.op.messages or [])[0]
    assert first.role == "system" and first.content.startswith("Be brief.\n\n")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": {"x": 1}}, "tools"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"tools": [{"type": "function"}]}, "tools[0].function"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools[0].function.name"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
            "tools[0].function.parameters",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
            "tools[0].function.parameters",
        ),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"messages": [{"role": "tool", "content": "18C"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c"}]}]}, "messages[0].tool_calls[0]"),
    ],
)
def test_bad_tools_name_the_field(fields: dict[str, Any], param: str) -> None:
    assert _refused(**fields) == param


def test_completions_refuse_tools() -> None:
    with pytest.raises(InvalidOperation) as caught:
        schema.parse({"model": "m", "prompt": "x", "tools": [WEATHER]}, chat=False)
    assert caught.value.field == "tools"


def test_tool_turns_go_through_the_template_as_text() -> None:
    messages = [
        *CHAT,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C and sunny"},
        {"role": "tool", "tool_call_id": "call_2", "name": "get_time", "content": [{"type": "text", "text": "noon"}]},
        {"role": "user", "content": "So?"},
    ]
    turns = [(m.role, m.content) for m in _parse(messages=messages).op.messages or []]
    assert turns == [
        ("user", CHAT[0]["content"]),
        ("assistant", '{"name":"get_weather","arguments":{"city":"Paris"}}'),
        ("user", "Tool result (get_weather): 18C and sunny\n\nTool result (get_time): noon\n\nSo?"),
    ]


# -- answers ----------------------------------------------------------------------------


def test_call_stream_sends_the_name_then_the_arguments() -> None:
    calls = tools.CallStream()
    deltas = [d for piece in CALL_PIECES for d in calls.feed(piece)] + calls.finish()
    assert deltas[0] == {
        "index": 0,
        "id": calls.id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    assert calls.id.startswith("call_")
    arguments = "".join(d["function"]["arguments"] for d in deltas[1:])
    assert json.loads(arguments) == {"city": "Paris"}
    assert all("id" not in d for d in deltas[1:])


@contextlib.asynccontextmanager
async def with_worker(
    tmp_path: Path, pieces: list[str], chat_tools: bool = False
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """A queen whose one worker is a fake one in process (``chat_tools``: its model's template renders tools)."""
    worker = create_worker_app(
        FakeEngine(model_id=MODEL_ID, pieces=pieces), WorkerSettings(worker_id="w1", aliases=[MODEL])
    )
    app = create_queen_app(QueenSettings(home=tmp_path))
    async with (
        worker.router.lifespan_context(worker),
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://queen") as client,
    ):
        app.state.queen.http._transport = httpx.ASGITransport(worker)
        app.state.queen.http.http1 = None  # every request through the worker app, not a socket
        await asyncio.wait_for(worker.state.worker.load_done.wait(), 10)  # the model is loaded
        report = {
            "worker_id": "w1",
            "model": MODEL_ID,
            "model_aliases": [MODEL],
            "state": "ready",
            "url": "http://worker",
            "n_ctx": 4096,
        }
        beat = {
            "hive_id": "alpha",
            "url": "http://hive",
            "models": [{"id": MODEL_ID, "alias": MODEL, "chat_tools": chat_tools}],
            "workers": [report],
        }
        assert (await client.post("/v1/hives/heartbeat", json=beat)).status_code == 200
        yield app, client


def _chunks(text: str) -> list[dict[str, Any]]:
    lines = [line[6:] for line in text.replace("\r\n", "\n").splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


async def test_a_required_call_is_answered_with_tool_calls(tmp_path: Path) -> None:
    async with with_worker(tmp_path, CALL_PIECES) as (_, client):
        body = {"model": MODEL, "messages": CHAT, "tools": [WEATHER], "tool_choice": "required", "max_tokens": 6}
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        message = choice["message"]
        assert message["content"] is None and message["role"] == "assistant"
        (call,) = message["tool_calls"]
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


async def test_a_streamed_call_is_tool_call_deltas(tmp_path: Path) -> None:
    async with with_worker(tmp_path, CALL_PIECES) as (_, client):
        body = {
            "model": MODEL,
            "messages": CHAT,
            "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "max_tokens": 6,
            "stream": True,
        }
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        chunks = _chunks(r.text)
        deltas = [c["choices"][0]["delta"] for c in chunks]
        assert deltas[0] == {"role": "assistant", "content": None}
        calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
        assert calls[0]["function"] == {"name": "get_weather", "arguments": ""} and calls[0]["id"].startswith("call_")
        assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {"city": "Paris"}
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
        assert all("content" not in d for d in deltas[1:])


async def test_auto_answers_as_text_and_says_so(tmp_path: Path) -> None:
    async with with_worker(tmp_path, ["Hello", " there"]) as (_, client):
        r = await client.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "tools": [WEATHER], "max_tokens": 2}
        )
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["message"]["content"] == "Hello there" and choice["finish_reason"] == "stop"
        assert "tool_calls" not in choice["message"]
        events = (await client.get(f"/v1/jobs/{r.headers['x-rbee-job-id']}/stream")).text
        assert "openai_tools_auto" in events


# -- auto, with the model's own template --------------------------------------------------

HERMES_PIECES = [
    "Let me",
    " look.",
    "\n<tool",
    '_call>\n{"name": "get_weather", ',
    '"arguments": {"city": "Paris"}}\n</tool_call>',
    '\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
]


async def _job(client: httpx.AsyncClient, r: httpx.Response) -> dict[str, Any]:
    job: dict[str, Any] = (await client.get(f"/v1/jobs/{r.headers['x-rbee-job-id']}")).json()
    return job


async def test_auto_with_a_tool_template_gives_the_tools_and_parses_the_calls(tmp_path: Path) -> None:
    async with with_worker(tmp_path, HERMES_PIECES, chat_tools=True) as (_, client):
        body = {"model": MODEL, "messages": CHAT, "tools": [WEATHER, TIME], "max_tokens": 10}
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        message = choice["message"]
        assert message["content"] == "Let me look."
        calls = message["tool_calls"]
        assert [(c["type"], c["function"]["name"]) for c in calls] == [
            ("function", "get_weather"),
            ("function", "get_time"),
        ]
        assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
        assert all(c["id"].startswith("call_") for c in calls) and calls[0]["id"] != calls[1]["id"]
        job = await _job(client, r)
        assert job["payload"]["tools"] == [
            WEATHER,
            {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
        ]
        assert job["payload"].get("json_schema") is None  # not constrained: the model chose
        assert [m["content"] for m in job["payload"]["messages"]] == [CHAT[0]["content"]]  # the template tells it
        events = (await client.get(f"/v1/jobs/{r.headers['x-rbee-job-id']}/stream")).text
        assert "openai_tools_template" in events and "openai_tools_auto" not in events
        # parallel_tool_calls false: the first call only.
        r = await client.post("/v1/chat/completions", json={**body, "parallel_tool_calls": False})
        assert [c["function"]["name"] for c in r.json()["choices"][0]["message"]["tool_calls"]] == ["get_weather"]


async def test_auto_with_a_tool_template_streams_text_then_tool_call_deltas(tmp_path: Path) -> None:
    async with with_worker(tmp_path, HERMES_PIECES, chat_tools=True) as (_, client):
        body = {"model": MODEL, "messages": CHAT, "tools": [WEATHER, TIME], "max_tokens": 10, "stream": True}
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        deltas = [c["choices"][0]["delta"] for c in _chunks(r.text)]
        assert deltas[0] == {"role": "assistant", "content": ""}
        text = "".join(d.get("content") or "" for d in deltas[1:])
        assert text == "Let me look.\n"  # the text up to the opening, none of the call
        first_call = next(i for i, d in enumerate(deltas) if "tool_calls" in d)
        assert all("tool_calls" not in d for d in deltas[:first_call]) and "<tool" not in text
        calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
        heads = [c for c in calls if "id" in c]
        assert [(h["index"], h["type"], h["function"]["name"]) for h in heads] == [
            (0, "function", "get_weather"),
            (1, "function", "get_time"),
        ]
        arguments = ["".join(c["function"]["arguments"] for c in calls if c["index"] == i) for i in (0, 1)]
        assert [json.loads(a) for a in arguments] == [{"city": "Paris"}, {}]
        assert _chunks(r.text)[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_auto_with_a_tool_template_that_answers_text_is_text(tmp_path: Path) -> None:
    async with with_worker(tmp_path, ["It is", " sunny <", "3."], chat_tools=True) as (_, client):
        body = {"model": MODEL, "messages": CHAT, "tools": [WEATHER], "max_tokens": 2}
        r = await client.post("/v1/chat/completions", json=body)
        choice = r.json()["choices"][0]
        assert choice["message"]["content"] == "It is sunny <" and "tool_calls" not in choice["message"]
        assert choice["finish_reason"] == "length"
        r = await client.post("/v1/chat/completions", json={**body, "stream": True})
        deltas = [c["choices"][0]["delta"] for c in _chunks(r.text)]
        assert "".join(d.get("content") or "" for d in deltas) == "It is sunny <"  # held, then given at the end
        # tool_choice none sends no tools to the template.
        r = await client.post("/v1/chat/completions", json={**body, "tool_choice": "none"})
        assert "tools" not in (await _job(client, r))["payload"]
