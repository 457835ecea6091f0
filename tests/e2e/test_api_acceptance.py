"""One queen (``--local-hive``, the real model), four APIs: the job API, OpenAI, Ollama and Anthropic.

Greedy answers to the same chat (or the same raw prompt) are the same text through
every API that serves it; the async OpenAI client streams and parses structured
output; and sampled (temperature 1.0) structured output and required tool calls
validate against their schemas on every one of 20 runs.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import anthropic
import httpx
import ollama
import openai
import pytest
from pydantic import BaseModel, Field

from cluster import Daemon, free_port, queen, wait_for
from rbee.jobs.client import JobClient

pytestmark = [pytest.mark.model, pytest.mark.timeout(300)]

MODEL = "gemma3-270m"
SYSTEM = "You are terse."
USER = "Name three colors."
CHAT = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
PROMPT = "The sky is blue because"
MAX_TOKENS = 24
RUNS = 20
#: Runs in flight at once; the worker batches them.
PARALLEL = 4

PET = [{"role": "user", "content": "Reply with a JSON object with the name and color of a cat."}]
COLORS = ("black", "white", "orange")
PET_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "color": {"enum": list(COLORS)},
    },
    "required": ["name", "color"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


class Pet(BaseModel):
    name: str = Field(max_length=12)
    color: Literal["black", "white", "orange"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    home = tmp_path_factory.mktemp("api-acceptance")
    q = queen(home / "queen", free_port(), "--local-hive").start()
    try:
        wait_for(lambda: httpx.get(q.url + "/v1/models").json()["data"], 60)
        yield q
    finally:
        q.stop()


@pytest.fixture(scope="module")
def oai(cluster: Daemon) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=240) as c:
        yield c


@pytest.fixture
async def aoai(cluster: Daemon) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=240) as c:
        yield c


@pytest.fixture(scope="module")
def oll(cluster: Daemon) -> Iterator[ollama.Client]:
    with ollama.Client(host=cluster.url, timeout=240) as c:  # closed, so no socket is left for the GC
        yield c


@pytest.fixture(scope="module")
def ant(cluster: Daemon) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=cluster.url, api_key="unused", max_retries=0, timeout=240) as c:
        yield c


def _job_text(url: str, op: dict[str, Any]) -> str:
    async def run() -> list[Any]:
        async with JobClient(url) as client:
            job_id = await client.submit(op)
            return [e async for e in client.events(job_id)]

    events = asyncio.run(asyncio.wait_for(run(), 120))
    (end,) = [e.data for e in events if e.kind == "end"]
    assert end["status"] == "completed", end
    return "".join(e.data["t"] for e in events if e.kind == "token")


def test_greedy_chat_is_the_same_through_all_four_apis(
    cluster: Daemon, oai: openai.OpenAI, oll: ollama.Client, ant: anthropic.Anthropic
) -> None:
    job = _job_text(cluster.url, {"operation": "infer", "messages": CHAT, "temperature": 0, "max_tokens": MAX_TOKENS})
    chat = oai.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=MAX_TOKENS)  # type: ignore[arg-type]
    via_openai = chat.choices[0].message.content
    via_ollama = oll.chat(model=MODEL, messages=CHAT, options={"temperature": 0, "num_predict": MAX_TOKENS})
    message = ant.messages.create(
        model=MODEL,
        max_tokens=MAX_TOKENS,
        system=SYSTEM,
        messages=[{"role": "user", "content": USER}],
        extra_body={"temperature": 0},
    )
    via_anthropic = "".join(b.text for b in message.content if b.type == "text")
    assert job.strip(), "pick a chat with a non-empty answer"
    texts = {"job": job, "openai": via_openai, "ollama": via_ollama.message.content, "anthropic": via_anthropic}
    assert set(texts.values()) == {job}, texts


def test_greedy_raw_prompt_is_the_same_through_job_api_openai_and_ollama(
    cluster: Daemon, oai: openai.OpenAI, oll: ollama.Client
) -> None:
    job = _job_text(cluster.url, {"operation": "infer", "prompt": PROMPT, "temperature": 0, "max_tokens": MAX_TOKENS})
    via_openai = oai.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=MAX_TOKENS)
    via_ollama = oll.generate(
        model=MODEL, prompt=PROMPT, raw=True, options={"temperature": 0, "num_predict": MAX_TOKENS}
    )
    assert job.strip()
    texts = {"job": job, "openai": via_openai.choices[0].text, "ollama": via_ollama.response}
    assert set(texts.values()) == {job}, texts


async def test_async_client_streams_a_chat_and_parses_a_pydantic_format(
    aoai: openai.AsyncOpenAI, oai: openai.OpenAI
) -> None:
    stream = await aoai.chat.completions.create(
        model=MODEL,
        messages=CHAT,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=MAX_TOKENS,
        stream=True,
    )
    pieces, reasons = [], []
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            if chunk.choices[0].finish_reason:
                reasons.append(chunk.choices[0].finish_reason)
    streamed = "".join(pieces)
    assert streamed.strip() and len(reasons) == 1 and reasons[0] in ("stop", "length")
    whole = await asyncio.to_thread(
        oai.chat.completions.create,
        model=MODEL,
        messages=CHAT,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=MAX_TOKENS,
    )
    assert streamed == whole.choices[0].message.content

    parsed = await aoai.chat.completions.parse(
        model=MODEL,
        messages=PET,  # type: ignore[arg-type]
        response_format=Pet,
        temperature=0,
        max_tokens=48,
    )
    message = parsed.choices[0].message
    assert parsed.choices[0].finish_reason == "stop", message.content
    assert isinstance(message.parsed, Pet), message.content
    assert message.parsed.color in COLORS and len(message.parsed.name) <= 12


def _valid_pet(text: str) -> None:
    value = json.loads(text)
    assert isinstance(value, dict) and set(value) == {"name", "color"}, value
    assert isinstance(value["name"], str) and 1 <= len(value["name"]) <= 12, value
    assert value["color"] in COLORS, value
    Pet.model_validate(value)


def _valid_weather(arguments: str) -> None:
    value = json.loads(arguments)
    assert isinstance(value, dict) and set(value) == {"city", "unit"}, value
    assert isinstance(value["city"], str) and len(value["city"]) <= 24, value
    assert value["unit"] in ("celsius", "fahrenheit"), value


# Twenty constrained answers sampled from a base model: most tokens it picks are refused
# and resampled over the whole vocabulary, ~70 ms a step on two shared cores.
@pytest.mark.timeout(900)
def test_sampled_json_schema_answers_validate_every_time(oai: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET_SCHEMA, "strict": True}}

    def one(_: int) -> str:
        got = oai.chat.completions.create(
            model=MODEL,
            messages=PET,  # type: ignore[arg-type]
            response_format=fmt,  # type: ignore[arg-type]
            temperature=1.0,
            max_tokens=48,
        )
        choice = got.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        _valid_pet(choice.message.content or "")
        return choice.message.content or ""

    started = time.monotonic()
    with ThreadPoolExecutor(PARALLEL) as pool:
        answers = list(pool.map(one, range(RUNS)))
    assert len(answers) == RUNS
    print(f"\n{RUNS} json_schema runs in {time.monotonic() - started:.1f}s; {len(set(answers))} distinct answers")


# Twenty constrained answers sampled from a base model: most tokens it picks are refused
# and resampled over the whole vocabulary, ~70 ms a step on two shared cores.
@pytest.mark.timeout(900)
def test_sampled_required_tool_calls_validate_every_time(oai: openai.OpenAI) -> None:
    def one(_: int) -> str:
        got = oai.chat.completions.create(
            model=MODEL,
            messages=ASK,  # type: ignore[arg-type]
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice="required",
            temperature=1.0,
            max_tokens=48,
        )
        choice = got.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        (call,) = choice.message.tool_calls or []
        assert call.type == "function" and call.function.name == "get_weather"
        _valid_weather(call.function.arguments)
        return call.function.arguments

    started = time.monotonic()
    with ThreadPoolExecutor(PARALLEL) as pool:
        calls = list(pool.map(one, range(RUNS)))
    assert len(calls) == RUNS
    print(f"\n{RUNS} required tool-call runs in {time.monotonic() - started:.1f}s; {len(set(calls))} distinct calls")
