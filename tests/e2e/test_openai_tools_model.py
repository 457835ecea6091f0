"""Tool calls with the real model, through a real queen and the official ``openai`` client:
a required or named call is constrained by a grammar of the call's JSON schema, so its
arguments parse and validate against the function's parameters."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from cluster import Daemon, free_port, queen, wait_for

pytestmark = [pytest.mark.model, pytest.mark.timeout(300)]

MODEL = "gemma3-270m"
ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 40}},
            "required": ["zone"],
        },
    },
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    home = tmp_path_factory.mktemp("openai-tools")
    q = queen(home / "queen", free_port(), "--local-hive").start()
    try:
        wait_for(lambda: httpx.get(q.url + "/v1/models").json()["data"], 60)
        yield q
    finally:
        q.stop()


@pytest.fixture(scope="module")
def client(cluster: Daemon) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=240) as c:
        yield c


def _valid(name: str, arguments: str) -> dict[str, Any]:
    """The arguments, checked against the function's schema."""
    value = json.loads(arguments)
    assert isinstance(value, dict)
    if name == "get_weather":
        assert set(value) == {"city", "unit"}
        assert isinstance(value["city"], str) and len(value["city"]) <= 40
        assert value["unit"] in ("celsius", "fahrenheit")
    else:
        assert name == "get_time" and isinstance(value["zone"], str)
    return value


def test_a_required_call_validates(client: openai.OpenAI) -> None:
    got = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", temperature=0, max_tokens=80
    )
    choice = got.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    _valid(call.function.name, call.function.arguments)


def test_a_named_call_streamed_validates(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=80,
        stream=True,
    )
    name, arguments, ids, reasons = "", "", [], []
    for chunk in stream:
        choice = chunk.choices[0]
        for delta in choice.delta.tool_calls or []:
            if delta.id:
                ids.append(delta.id)
            if delta.function and delta.function.name:
                name += delta.function.name
            if delta.function and delta.function.arguments:
                arguments += delta.function.arguments
        if choice.finish_reason:
            reasons.append(choice.finish_reason)
    assert reasons == ["tool_calls"] and len(ids) == 1 and name == "get_weather"
    assert _valid(name, arguments)["unit"] in ("celsius", "fahrenheit")


def test_a_tool_result_goes_back_through_the_template(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=80
    )
    call = (first.choices[0].message.tool_calls or [])[0]
    messages: list[Any] = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": "sunny"}'},
    ]
    got = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], temperature=0, max_tokens=24)
    assert got.choices[0].message.content and got.choices[0].finish_reason in ("stop", "length")
    assert not got.choices[0].message.tool_calls  # auto answers as text with this model
