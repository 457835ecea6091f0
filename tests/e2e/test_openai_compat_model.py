"""What clients of OpenAI and llama.cpp's server expect, with the real model through a real
queen and the official ``openai`` client: ``n`` choices, a chat without ``max_tokens``
that runs to the end of the context, ``n_predict``, unknown parameters refused by name
and the SDK's own requests (with their defaults and informational fields) accepted."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from cluster import Daemon, free_port, queen, wait_for

pytestmark = [pytest.mark.model, pytest.mark.timeout(300)]

MODEL = "gemma3-270m"
ASK = [{"role": "user", "content": "Write a sentence about the sea."}]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    home = tmp_path_factory.mktemp("openai-compat")
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


def test_n_sampled_choices(client: openai.OpenAI) -> None:
    got = client.chat.completions.create(model=MODEL, messages=ASK, n=3, temperature=1.0, seed=5, max_tokens=16)
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert all(c.message.content for c in got.choices)
    assert got.usage is not None and got.usage.completion_tokens >= 3
    single = client.chat.completions.create(model=MODEL, messages=ASK, temperature=1.0, seed=5, max_tokens=16)
    assert got.usage.prompt_tokens == single.usage.prompt_tokens  # type: ignore[union-attr]
    texts: dict[int, str] = {}
    for chunk in client.completions.create(
        model=MODEL, prompt="The sea is", n=2, temperature=1.0, max_tokens=8, stream=True
    ):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert set(texts) == {0, 1} and all(texts.values())


def _n_ctx(client: openai.OpenAI) -> int:
    base = str(client.base_url).removesuffix("/").removesuffix("/v1")
    workers = httpx.get(f"{base}/api/ps", timeout=30).json()["models"]
    return min(int(w["context_length"]) for w in workers)


def test_a_long_chat_without_max_tokens_runs_to_the_end_of_the_context(client: openai.OpenAI) -> None:
    client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1)  # a worker is up: its context is known
    n_ctx = _n_ctx(client)

    def chat(count: int, **fields: object) -> object:
        words = " ".join(["apple"] * count)
        messages = [{"role": "user", "content": f"Repeat the word: {words}"}]
        return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **fields)  # type: ignore[call-overload]

    def tokens(count: int) -> int:
        return int(chat(count, max_tokens=1).usage.prompt_tokens)  # type: ignore[attr-defined]

    small, large = tokens(100), tokens(300)
    per_word = (large - small) / 200
    count = int((n_ctx - 150 - (small - 100 * per_word)) / per_word)  # far more than 1 024 tokens, ~150 left
    # Neither end of turn nor end of text: the answer can only end at the context.
    got = chat(count, logit_bias={"1": -100, "106": -100})
    usage = got.usage  # type: ignore[attr-defined]
    assert usage.prompt_tokens > 1024
    assert got.choices[0].finish_reason == "length"  # type: ignore[attr-defined]
    assert usage.prompt_tokens + usage.completion_tokens == n_ctx


def test_n_predict_and_parameters_as_openai_takes_them(client: openai.OpenAI) -> None:
    got = client.completions.create(
        model=MODEL, prompt="The sea is", temperature=0, user="u1", extra_body={"n_predict": 3, "cache_prompt": True}
    )
    assert got.usage is not None and got.usage.completion_tokens <= 3
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, extra_body={"frobnicate": 1})
    assert caught.value.code == "unknown_parameter" and caught.value.param == "frobnicate"
    assert "Unrecognized request argument supplied: frobnicate" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, modalities=["text", "audio"])
    assert caught.value.code == "unsupported_parameter" and caught.value.param == "modalities"
    # What the SDK sends, informational fields included, is taken.
    answer = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Page one.\fPage two."}],
        max_tokens=2,
        temperature=0,
        user="u1",
        metadata={"run": "e2e"},
        store=False,
        service_tier="auto",
        stream_options=None,
    )
    assert answer.choices[0].message.content is not None
