"""Structured output, log-probabilities, logit bias and penalties with the real model,
through a real queen and the official ``openai`` client: each is enforced in the
worker's native sampler chain of that sequence."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from cluster import Daemon, free_port, queen, wait_for

pytestmark = [pytest.mark.model, pytest.mark.timeout(300)]

MODEL = "gemma3-270m"
CAT = [{"role": "user", "content": "Reply with a JSON object with the name and age of a cat."}]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer"},
        "color": {"enum": ["black", "white", "orange"]},
    },
    "required": ["name", "age", "color"],
    "additionalProperties": False,
}
REPETITIVE = "List: apple, apple, apple, apple,"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    home = tmp_path_factory.mktemp("openai-sampling")
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


def _chat(client: openai.OpenAI, **fields: Any) -> Any:
    fields.setdefault("messages", CAT)
    return client.chat.completions.create(model=MODEL, temperature=0, **fields)


def test_json_object_output_parses(client: openai.OpenAI) -> None:
    got = _chat(client, max_tokens=120, response_format={"type": "json_object"}, frequency_penalty=1.0)
    assert got.choices[0].finish_reason == "stop", got.choices[0].message.content
    assert isinstance(json.loads(got.choices[0].message.content or ""), dict)


def test_json_schema_output_validates(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "cat", "schema": SCHEMA, "strict": True}}
    got = _chat(client, max_tokens=80, response_format=fmt)
    value = json.loads(got.choices[0].message.content or "")
    assert set(value) == {"name", "age", "color"}
    assert isinstance(value["name"], str) and len(value["name"]) <= 16
    assert type(value["age"]) is int and value["color"] in ("black", "white", "orange")


def test_llama_cpp_grammar_field_is_followed(client: openai.OpenAI) -> None:
    got = client.completions.create(
        model=MODEL,
        prompt="Is the sky blue? Answer:",
        max_tokens=8,
        temperature=0.8,
        seed=3,
        extra_body={"grammar": 'root ::= " yes" | " no"'},
    )
    assert got.choices[0].text in (" yes", " no")


def test_an_invalid_grammar_or_schema_is_400_naming_the_field(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="x", max_tokens=4, extra_body={"grammar": "root ::= (("})
    assert caught.value.param == "grammar"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="x", max_tokens=4, logit_bias={"99999999": -100})
    assert caught.value.param == "logit_bias"


def test_chat_logprobs(client: openai.OpenAI) -> None:
    got = _chat(client, max_tokens=8, logprobs=True, top_logprobs=3)
    content = got.choices[0].logprobs.content
    assert content and len(content) == got.usage.completion_tokens
    text = got.choices[0].message.content
    assert "".join(c.token for c in content).startswith(text[:1])
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the likeliest, so it heads its alternatives.
        assert entry.top_logprobs[0].token == entry.token
        assert math.isclose(entry.top_logprobs[0].logprob, entry.logprob)
        assert max(a.logprob for a in entry.top_logprobs) == entry.logprob
        assert bytes(entry.bytes or []).decode(errors="replace") == entry.token


def test_streamed_completion_logprobs(client: openai.OpenAI) -> None:
    tokens: list[str] = []
    text = ""
    for chunk in client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, logprobs=2, stream=True
    ):
        choice = chunk.choices[0]
        text += choice.text
        if choice.logprobs is not None and choice.logprobs.tokens:
            lp = choice.logprobs
            assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
            for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
                assert logprob <= 0 and token in top and len(top) <= 2
                assert max(top.values()) == logprob
            tokens += lp.tokens
    assert "".join(tokens) == text


def test_logit_bias_against_the_greedy_token_changes_the_output(client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=0)
    assert first.choices[0].logprobs is not None
    greedy = first.choices[0].logprobs.tokens[0]
    raw = client.completions.with_raw_response.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0)
    job = raw.headers["x-rbee-job-id"]
    assert raw.headers["x-request-id"]
    base = str(client.base_url).removesuffix("/v1/")
    events = httpx.get(f"{base}/v1/jobs/{job}/stream", timeout=30).text
    token_id = next(json.loads(line[6:])["ids"][0] for line in events.splitlines() if '"ids"' in line)
    biased = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logit_bias={str(token_id): -100}
    )
    assert not biased.choices[0].text.startswith(greedy)
    assert biased.choices[0].text != first.choices[0].text


def test_penalties_change_a_repetitive_greedy_output(client: openai.OpenAI) -> None:
    def run(**fields: Any) -> str:
        got = client.completions.create(model=MODEL, prompt=REPETITIVE, max_tokens=24, temperature=0, **fields)
        return got.choices[0].text

    plain = run()
    assert plain.count("apple") >= 6
    penalized = run(presence_penalty=1.5, frequency_penalty=1.5)
    assert penalized != plain
    assert penalized.count("apple") < plain.count("apple")
    assert run(presence_penalty=1.5, frequency_penalty=1.5) == penalized  # greedy stays deterministic
    assert run(extra_body={"repeat_penalty": 1.5}) != plain


def test_usage_reports_cached_tokens_and_a_fingerprint(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Name a color. " * 20}]
    _chat(client, messages=messages, max_tokens=2)
    again = _chat(client, messages=messages, max_tokens=2)
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    assert again.system_fingerprint and again.system_fingerprint.startswith("rbee-")
