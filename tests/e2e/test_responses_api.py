"""OpenAI's Responses API with the official ``openai`` SDK, the real bundled model and a queen with a token."""

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
TOKEN = "responses-e2e-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
QUESTION = "What is the capital of France? Answer in one word."
PERSON = "Describe a person as JSON with a name and an age."
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
SCHEMA_FORMAT: Any = {"format": {"type": "json_schema", "name": "person", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    home = tmp_path_factory.mktemp("responses-e2e")
    q = queen(home / "queen", free_port(), "--local-hive", "--token", TOKEN).start()
    try:
        wait_for(lambda: httpx.get(q.url + "/v1/models", headers=AUTH).json()["data"], 60)
        yield q
    finally:
        q.stop()


@pytest.fixture(scope="module")
def client(cluster: Daemon) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=cluster.url + "/v1", api_key=TOKEN, max_retries=0, timeout=240) as c:
        yield c


def test_create_answers_text_and_is_a_job(client: openai.OpenAI, cluster: Daemon) -> None:
    raw = client.responses.with_raw_response.create(
        model=MODEL,
        instructions="You are terse.",
        input=QUESTION,
        max_output_tokens=24,
        temperature=0,
        metadata={"test": "e2e"},
    )
    response = raw.parse()
    assert response.id.startswith("resp_") and response.object == "response" and response.model == MODEL
    assert response.output_text.strip()
    assert response.output[0].type == "message" and response.output[0].role == "assistant"
    assert response.metadata == {"test": "e2e"}
    assert response.usage is not None and response.usage.input_tokens > 0 and response.usage.output_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    job_id = raw.headers["x-rbee-job-id"]
    job = httpx.get(f"{cluster.url}/v1/jobs/{job_id}", headers=AUTH).json()
    assert job["status"] == "completed" and job["operation"] == "infer"
    # The same response, from the history.
    again = client.responses.retrieve(response.id)
    assert again.id == response.id and again.output_text == response.output_text


def test_stream_deltas_join_to_the_final_text(client: openai.OpenAI) -> None:
    # The bundled model rarely ends a turn by itself; a schema's grammar ends the answer when the object is whole.
    kinds = []
    deltas = []
    with client.responses.stream(
        model=MODEL, input=PERSON, max_output_tokens=200, temperature=0, text=SCHEMA_FORMAT
    ) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert final.status == "completed" and final.output_text.strip()
    assert "".join(deltas) == final.output_text
    # Greedy: the same as not streaming.
    whole = client.responses.create(model=MODEL, input=PERSON, max_output_tokens=200, temperature=0, text=SCHEMA_FORMAT)
    assert whole.output_text == final.output_text


def test_create_stream_true_cut_at_max_output_tokens(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=8, temperature=0, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    last = events[-1]
    assert last.type == "response.incomplete"
    assert last.response.incomplete_details is not None
    assert last.response.incomplete_details.reason == "max_output_tokens"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text and text == last.response.output_text
    assert last.response.usage is not None and last.response.usage.output_tokens == 8


def test_a_small_max_output_tokens_is_incomplete(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=MODEL,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Tell me a long story about a dragon."}]}],
        max_output_tokens=4,
        temperature=0,
    )
    assert response.status == "incomplete"
    assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 4
    assert response.output_text


def test_text_format_json_schema_output_validates(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=MODEL, input=PERSON, max_output_tokens=200, temperature=0.7, text=SCHEMA_FORMAT, extra_body={"seed": 3}
    )
    assert response.status == "completed", response
    person = json.loads(response.output_text)
    assert set(person) == {"name", "age"}
    assert isinstance(person["name"], str) and isinstance(person["age"], int) and not isinstance(person["age"], bool)


def test_tools_are_refused_by_name(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(
            model=MODEL,
            input=QUESTION,
            tools=[{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],  # type: ignore[typeddict-item]
        )
    assert "get_weather" in str(refused.value)


def test_previous_response_id_continues_and_unknown_ones_are_not_found(client: openai.OpenAI) -> None:
    first = client.responses.create(model=MODEL, input="My name is Ada.", max_output_tokens=8, temperature=0)
    second = client.responses.create(
        model=MODEL, input="What is my name?", previous_response_id=first.id, max_output_tokens=8, temperature=0
    )
    assert second.previous_response_id == first.id and second.status in ("completed", "incomplete")
    assert second.usage is not None and first.usage is not None
    # The first exchange is part of the second's input.
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_" + "0" * 32)
    assert missing.value.code == "previous_response_not_found"
    with pytest.raises(openai.BadRequestError) as unknown:
        client.responses.create(model=MODEL, input="hi", extra_body={"max_tokens": 4})
    assert unknown.value.code == "unknown_parameter" and unknown.value.param == "max_tokens"
