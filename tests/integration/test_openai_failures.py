"""OpenAI endpoints when things go wrong: a worker that fails mid-generation, a queen with a token."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from cluster import Daemon, free_port, hive, queen, wait_for

pytestmark = pytest.mark.timeout(120)

MODEL = "gemma3-270m"
CHAT = [{"role": "user", "content": "hi"}]
TOKEN = "s3cret-token-of-some-length"


@pytest.fixture(scope="module")
def failing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Workers that produce three pieces, then fail."""
    home = tmp_path_factory.mktemp("openai-fail")
    env = {"RBEE_FAKE_TOKENS": "20", "RBEE_FAKE_DELAY_MS": "5", "RBEE_FAKE_FAIL_AFTER": "3"}
    q = queen(home / "queen", free_port()).start()
    h = hive(home / "hive", free_port(), q.url, "alpha", "--worker-engine", "fake", env=env).start()
    try:
        wait_for(lambda: httpx.get(q.url + "/v1/models").json()["data"], 15)
        yield q.url
    finally:
        h.stop()
        q.stop()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    home = tmp_path_factory.mktemp("openai-token")
    q = queen(home / "queen", free_port(), "--token", TOKEN).start()
    try:
        yield q
    finally:
        q.stop()


def _frames(lines: list[str]) -> list[str]:
    return [line[len("data: ") :] for line in lines if line.startswith("data: ")]


async def test_failure_mid_stream_is_an_error_chunk_and_no_done(failing: str) -> None:
    body = {"model": MODEL, "prompt": "x", "max_tokens": 10, "stream": True}
    async with asyncio.timeout(60), httpx.AsyncClient(timeout=60) as http:
        async with http.stream("POST", failing + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            job_id = r.headers["x-rbee-job-id"]
            frames = _frames([line async for line in r.aiter_lines()])
        assert "[DONE]" not in frames
        chunks = [json.loads(f) for f in frames]
        assert [c["choices"][0]["text"] for c in chunks[:-1]] == ["tok0 ", "tok1 ", "tok2 "]
        error = chunks[-1]["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert "scripted failure" in error["message"]
        assert error["type"] == "server_error"
        # No chunk claimed a normal finish.
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
        job = (await http.get(f"{failing}/v1/jobs/{job_id}")).json()
        assert job["status"] == "failed"


def test_failure_mid_stream_raises_in_the_openai_client(failing: str) -> None:
    with openai.OpenAI(base_url=failing + "/v1", api_key="x", max_retries=0, timeout=60) as client:
        stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, stream=True)  # type: ignore[arg-type]
        received: list[str] = []
        with pytest.raises(openai.APIError) as info, stream:
            for chunk in stream:
                if chunk.choices:
                    received.append(chunk.choices[0].delta.content or "")
        assert "".join(received) == "tok0 tok1 tok2 "
        assert "scripted failure" in info.value.message


def test_failure_without_streaming_is_a_server_error(failing: str) -> None:
    with (
        openai.OpenAI(base_url=failing + "/v1", api_key="x", max_retries=0, timeout=60) as client,
        pytest.raises(openai.InternalServerError) as info,
    ):
        client.completions.with_raw_response.create(model=MODEL, prompt="x", max_tokens=10)
    assert info.value.status_code == 500
    assert info.value.response.headers["x-rbee-job-id"].startswith("job-")
    assert "scripted failure" in info.value.message


def test_no_token_is_401_in_openai_shape(guarded: Daemon) -> None:
    for key in ("wrong-token", ""):
        with openai.OpenAI(base_url=guarded.url + "/v1", api_key=key or "x", max_retries=0) as client:
            with pytest.raises(openai.AuthenticationError) as info:
                client.models.list()
            assert info.value.status_code == 401
            assert info.value.code == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                client.chat.completions.create(model=MODEL, messages=CHAT)  # type: ignore[arg-type]
            with pytest.raises(openai.AuthenticationError):
                client.completions.create(model=MODEL, prompt="x")
    r = httpx.get(guarded.url + "/v1/models")
    assert r.status_code == 401
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    # The job API keeps rbee's own shape.
    r = httpx.get(guarded.url + "/v1/jobs")
    assert r.status_code == 401 and r.json()["error"]["kind"] == "unauthorized"


def test_right_token_is_let_in(guarded: Daemon) -> None:
    with openai.OpenAI(base_url=guarded.url + "/v1", api_key=TOKEN, max_retries=0) as client:
        assert client.models.list().data == []
        # No hive at all: nothing can serve the model yet.
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(model=MODEL, prompt="x")
        assert info.value.status_code == 503
        body: Any = info.value.body
        assert body["code"] == "no_worker"
