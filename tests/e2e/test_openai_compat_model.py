"""What clients of OpenAI and llama.cpp's server expect, with the real model through a real
queen and the official ``openai`` client: ``n`` choices, a chat without ``max_tokens``
that runs to the end of the context, ``n_predict``, ignored parameters said so."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

import openai
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
