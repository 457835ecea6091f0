"""Anthropic's Messages API with the official ``anthropic`` SDK, the real bundled model and a queen with a token.

The queen runs with ``--local-hive`` and ``--token``; the SDK sends the token as
``x-api-key``, which the queen accepts as its bearer token.
"""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import httpx
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
        client.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": [image]}])  # type: ignore[list-item]
    assert "messages[0].content[0].type" in caught.value.message and "image" in caught.value.message
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(
            model=MODEL,
            max_tokens=4,
            messages=HELLO,  # type: ignore[arg-type]
            tools=[{"name": "f", "input_schema": {"type": "object"}}],
        )
    assert "tools" in caught.value.message


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
