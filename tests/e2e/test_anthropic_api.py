"""Anthropic's Messages API with the official ``anthropic`` SDK, the real bundled model and a queen with a token.

The queen runs with ``--local-hive`` and ``--token``; the SDK sends the token as
``x-api-key``, which the queen accepts as its bearer token. A forced tool call
(``tool_choice`` any or tool) is constrained by a grammar of the tool's
``input_schema``, so every call's ``input`` validates (``jsonschema_rs``, which
schemathesis brings), greedy or sampled.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import jsonschema_rs
import pytest

from cluster import Daemon, free_port, queen, wait_for

pytestmark = [pytest.mark.model, pytest.mark.timeout(300)]

MODEL = "gemma3-270m"
TOKEN = "anthropic-e2e-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HELLO = [{"role": "user", "content": "Name three colors."}]
# The SDK's newest create() has no sampling arguments; extra_body sends them as Anthropic's API takes them.


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    home = tmp_path_factory.mktemp("anthropic-e2e")
    q = queen(home / "queen", free_port(), "--local-hive", "--token", TOKEN).start()
    try:
        wait_for(lambda: httpx.get(q.url + "/v1/models", headers=AUTH).json()["data"], 60)
        yield q
    finally:
        q.stop()


@pytest.fixture(scope="module")
def client(cluster: Daemon) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=cluster.url, api_key=TOKEN, max_retries=0, timeout=240) as c:
        yield c


def test_create_answers_text_with_usage_and_max_tokens(client: anthropic.Anthropic, cluster: Daemon) -> None:
    raw = client.messages.with_raw_response.create(
        model=MODEL,
        max_tokens=5,
        system="You are terse.",
        messages=HELLO,  # type: ignore[arg-type]
        extra_body={"temperature": 0},
    )
    message = raw.parse()
    assert message.type == "message" and message.role == "assistant" and message.model == MODEL
    assert message.id.startswith("msg_")
    assert len(message.content) == 1 and message.content[0].type == "text"
    assert message.content[0].text
    assert message.stop_reason == "max_tokens" and message.stop_sequence is None
    assert message.usage.output_tokens == 5
    assert message.usage.input_tokens > 5
    # An ordinary job of the queen's, in the history.
    job_id = raw.headers["x-rbee-job-id"]
    assert raw.headers["request-id"].startswith("req_")
    job = httpx.get(f"{cluster.url}/v1/jobs/{job_id}", headers=AUTH).json()
    assert job["status"] == "completed" and job["operation"] == "infer"


def test_stream_events_in_order_and_deltas_join_to_the_final_message(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model=MODEL,
        max_tokens=12,
        messages=HELLO,  # type: ignore[arg-type]
        extra_body={"temperature": 0},
    ) as stream:
        kinds = []
        deltas = []
        for event in stream:
            kinds.append(event.type)
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                deltas.append(event.delta.text)
        final = stream.get_final_message()
    # The SDK's own events ("text") come along with the wire's; keep the wire's.
    wire = [k for k in kinds if k not in ("text", "ping")]
    assert wire[:2] == ["message_start", "content_block_start"]
    assert wire[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(wire[2:-3]) == {"content_block_delta"}
    assert "".join(deltas) == final.content[0].text  # type: ignore[union-attr]
    assert final.content[0].text  # type: ignore[union-attr]
    assert final.usage.output_tokens > 0 and final.usage.input_tokens > 0
    # Greedy: the same as not streaming.
    whole = client.messages.create(model=MODEL, max_tokens=12, messages=HELLO, extra_body={"temperature": 0})  # type: ignore[arg-type]
    assert whole.content[0].text == final.content[0].text  # type: ignore[union-attr]
    assert whole.stop_reason == final.stop_reason


def test_stop_sequence_is_named(client: anthropic.Anthropic) -> None:
    whole = client.messages.create(model=MODEL, max_tokens=48, messages=HELLO, extra_body={"temperature": 0})  # type: ignore[arg-type]
    text = whole.content[0].text  # type: ignore[union-attr]
    assert len(text) > 3
    stop = text[2:4] if text[2:4].strip() else text[1:3]  # something the answer is sure to say
    cut = client.messages.create(
        model=MODEL,
        max_tokens=48,
        messages=HELLO,  # type: ignore[arg-type]
        extra_body={"temperature": 0},
        stop_sequences=[stop],
    )
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == text[: text.index(stop)]  # type: ignore[union-attr]


def test_count_tokens_equals_the_messages_input_tokens(client: anthropic.Anthropic) -> None:
    counted = client.messages.count_tokens(model=MODEL, system="You are terse.", messages=HELLO)  # type: ignore[arg-type]
    used = client.messages.create(
        model=MODEL,
        max_tokens=1,
        system="You are terse.",
        messages=HELLO,  # type: ignore[arg-type]
    )
    assert counted.input_tokens == used.usage.input_tokens > 0


def test_unknown_model_is_not_found(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(model="no-such-model", max_tokens=4, messages=HELLO)  # type: ignore[arg-type]
    assert caught.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


def test_bad_input_is_a_bad_request_naming_the_field(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model=MODEL, max_tokens=4, messages=HELLO, extra_body={"temperature": 1.5})  # type: ignore[arg-type]
    assert "temperature" in caught.value.message
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    with pytest.raises(anthropic.BadRequestError) as caught:
        with_image: Any = [{"role": "user", "content": [image]}]
        client.messages.create(model=MODEL, max_tokens=4, messages=with_image)
    assert "messages[0].content[0].type" in caught.value.message and "image" in caught.value.message
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(
            model=MODEL,
            max_tokens=4,
            messages=HELLO,  # type: ignore[arg-type]
            tools=[{"name": "has space", "input_schema": {"type": "object"}}],
        )
    assert "tools[0].name" in caught.value.message
    tools: Any = [{"name": "f", "input_schema": {"type": "object"}}]
    hello: Any = HELLO
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(
            model=MODEL,
            max_tokens=4,
            messages=hello,
            tools=tools,
            tool_choice={"type": "tool", "name": "g"},
        )
    assert "tool_choice.name" in caught.value.message


def test_the_api_key_is_the_queens_token(cluster: Daemon) -> None:
    with (
        anthropic.Anthropic(base_url=cluster.url, api_key="wrong", max_retries=0, timeout=60) as other,
        pytest.raises(anthropic.AuthenticationError) as caught,
    ):
        other.messages.create(model=MODEL, max_tokens=1, messages=HELLO)  # type: ignore[arg-type]
    assert caught.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    body = {"model": MODEL, "messages": HELLO}
    r = httpx.post(f"{cluster.url}/v1/messages/count_tokens", json=body)  # no key at all
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    # The token as a bearer token works here too.
    r = httpx.post(f"{cluster.url}/v1/messages/count_tokens", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["input_tokens"] > 0


WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER: Any = {"name": "get_weather", "description": "The current weather in a city", "input_schema": WEATHER_SCHEMA}
TIME: Any = {
    "name": "get_time",
    "description": "The current time in a time zone",
    "input_schema": {
        "type": "object",
        "properties": {"zone": {"type": "string", "maxLength": 40}},
        "required": ["zone"],
    },
}
ASK: Any = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]


def test_a_forced_tool_call_validates_greedy_and_sampled(client: anthropic.Anthropic) -> None:
    for temperature in (0.0, 1.0, 1.0, 1.0, 1.0, 1.0):
        message = client.messages.create(
            model=MODEL,
            max_tokens=120,
            messages=ASK,
            tools=[WEATHER, TIME],
            tool_choice={"type": "any"},
            extra_body={"temperature": temperature},
        )
        assert message.stop_reason == "tool_use", message
        (block,) = message.content
        assert block.type == "tool_use" and block.id.startswith("toolu_")
        assert block.name in ("get_weather", "get_time")
        assert isinstance(block.input, dict)
        schema = WEATHER_SCHEMA if block.name == "get_weather" else TIME["input_schema"]
        jsonschema_rs.validate(schema, block.input)


def test_a_named_tool_call_streamed_validates(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model=MODEL,
        max_tokens=120,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice={"type": "tool", "name": "get_weather"},
        extra_body={"temperature": 0},
    ) as stream:
        kinds, partial = [], []
        for event in stream:
            kinds.append(event.type)
            if event.type == "content_block_start":
                assert event.content_block.type == "tool_use" and event.content_block.name == "get_weather"
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                partial.append(event.delta.partial_json)
        final = stream.get_final_message()
    wire = [k for k in kinds if k not in ("ping", "input_json")]
    assert wire[:2] == ["message_start", "content_block_start"]
    assert wire[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert final.stop_reason == "tool_use"
    (block,) = final.content
    assert block.type == "tool_use" and block.name == "get_weather"
    jsonschema_rs.validate(WEATHER_SCHEMA, block.input)
    assert json.loads("".join(partial)) == block.input
    # Greedy: the same call as not streaming.
    whole = client.messages.create(
        model=MODEL,
        max_tokens=120,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice={"type": "tool", "name": "get_weather"},
        extra_body={"temperature": 0},
    )
    assert whole.content[0].input == block.input  # type: ignore[union-attr]


def test_the_tool_result_goes_back_through_the_template(client: anthropic.Anthropic) -> None:
    first = client.messages.create(
        model=MODEL,
        max_tokens=120,
        messages=ASK,
        tools=[WEATHER],
        tool_choice={"type": "any"},
        extra_body={"temperature": 0},
    )
    block = first.content[0]
    assert block.type == "tool_use"
    messages: list[Any] = [
        *ASK,
        {"role": "assistant", "content": [b.model_dump() for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id, "content": "18C, sunny"}]},
    ]
    answer = client.messages.create(
        model=MODEL,
        max_tokens=24,
        messages=messages,
        tools=[WEATHER],
        extra_body={"temperature": 0},
    )
    assert answer.content[0].type == "text" and answer.content[0].text
    assert answer.stop_reason in ("end_turn", "max_tokens")
