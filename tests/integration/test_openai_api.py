"""The OpenAI-compatible API through a real queen and hive, with the official ``openai`` client.

Workers run the scripted fake engine (40 pieces ``tok0 `` ... at 25 ms each),
so every answer is known in advance and jobs last long enough to overlap.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from cluster import Daemon, free_port, hive, queen, wait_for

pytestmark = pytest.mark.timeout(120)

FAKE = {"RBEE_FAKE_TOKENS": "40", "RBEE_FAKE_DELAY_MS": "25"}
MODEL = "gemma3-270m"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]


def _pieces(n: int) -> str:
    return "".join(f"tok{i} " for i in range(n))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Daemon]]:
    home = tmp_path_factory.mktemp("openai")
    q = queen(home / "queen", free_port(), "--queue-size", "1").start()
    # One slot: the queue tests below need a worker that runs one job at a time.
    h = hive(
        home / "hive", free_port(), q.url, "alpha", "--worker-engine", "fake", "--worker-arg=--slots=1", env=FAKE
    ).start()
    try:
        wait_for(lambda: _models(q.url), 15)
        # One request up front, so the worker exists before the tests race it.
        r = httpx.post(q.url + "/v1/completions", json={"model": MODEL, "prompt": "warm", "max_tokens": 1}, timeout=60)
        assert r.status_code == 200, r.text
        yield {"queen": q, "hive": h}
    finally:
        h.stop()
        q.stop()


def _models(url: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = httpx.get(url + "/v1/models").json()["data"]
    return data


@pytest.fixture
def client(cluster: dict[str, Daemon]) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=cluster["queen"].url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def _job(url: str, job_id: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/v1/jobs/{job_id}")
    assert r.status_code == 200, r.text
    job: dict[str, Any] = r.json()
    return job


def _wait_job(url: str, job_id: str, *, status: str | None = None) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        job = _job(url, job_id)
        if job["status"] in ("completed", "failed", "cancelled", "timed_out"):
            return job
        return None

    job: dict[str, Any] = wait_for(ended, 15)
    if status is not None:
        assert job["status"] == status, job
    return job


def _queue_depth(url: str) -> int:
    """Jobs waiting in the queen's scheduler queue for the model."""
    return int(_status(url)["queues"].get(MODEL, 0))


def _status(url: str) -> dict[str, Any]:
    job_id = httpx.post(url + "/v1/jobs", json={"operation": "status"}).json()["job_id"]
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/stream", timeout=10) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"queues"' in line:
                result: dict[str, Any] = json.loads(line[len("data: ") :])
                return result
    raise AssertionError("the status job gave no result")


def _worker_jobs(url: str) -> list[dict[str, Any]]:
    """The jobs of the (one) worker, newest first, from the worker itself."""
    [worker] = _status(url)["workers"]
    jobs: list[dict[str, Any]] = httpx.get(worker["url"] + "/v1/jobs").json()["jobs"]
    return jobs


def _live_infer_jobs(url: str) -> list[dict[str, Any]]:
    """Recent infer jobs that have not ended, newest first, as the queen sees them now."""
    recent = httpx.get(url + "/v1/jobs", params={"limit": 10}).json()["jobs"]
    live = [_job(url, j["job_id"]) for j in recent if j["operation"] == "infer"]
    return [j for j in live if j["status"] in ("queued", "running")]


# -- sync client -----------------------------------------------------------------


def test_models_lists_every_model_with_its_hives(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert models.object == "list"
    [model] = [m for m in models.data if MODEL in (m.model_extra or {}).get("aliases", [])]
    assert model.object == "model" and model.owned_by == "rbee"
    assert isinstance(model.created, int)
    assert (model.model_extra or {})["hives"] == ["alpha"]
    # Id and alias both name it.
    assert client.models.retrieve(MODEL).id == model.id
    assert client.models.retrieve(model.id).id == model.id
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat_completion_not_streaming(client: openai.OpenAI, cluster: dict[str, Daemon]) -> None:
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=CHAT, max_tokens=5)  # type: ignore[arg-type]
    job_id = raw.headers["x-rbee-job-id"]
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == MODEL
    assert abs(completion.created - time.time()) < 120
    [choice] = completion.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content == _pieces(5)
    assert choice.finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 5
    # The fake engine's chat template is one "role: content" line per turn.
    assert completion.usage.prompt_tokens == len(["system:", "Be", "brief.", "user:", "Say", "hello", "assistant:"])
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 5
    # The request was an ordinary job, kept with the others.
    job = _wait_job(cluster["queen"].url, job_id, status="completed")
    assert job["operation"] == "infer" and job["tokens"] == 5 and job["hive_id"] == "alpha"


def test_completion_not_streaming_stops_at_eos_with_stop(client: openai.OpenAI) -> None:
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="a b c", max_tokens=100)
    assert raw.headers["x-rbee-job-id"].startswith("job-")
    completion = raw.parse()
    assert completion.object == "text_completion"
    assert completion.id.startswith("cmpl-")
    [choice] = completion.choices
    assert choice.text == _pieces(40)
    assert choice.finish_reason == "stop"  # the engine's end of text, before max_tokens
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (3, 40)


def test_stop_string_cuts_the_text_and_finishes_with_stop(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=MODEL, prompt="x", max_tokens=30, stop="tok3")
    assert completion.choices[0].text == _pieces(3)
    assert completion.choices[0].finish_reason == "stop"
    chat = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,  # type: ignore[arg-type]
        max_completion_tokens=30,
        stop=["never", "tok2 tok3"],
        temperature=0,
        top_p=0.5,
        seed=7,
    )
    assert chat.choices[0].message.content == _pieces(2)
    assert chat.choices[0].finish_reason == "stop"


def test_chat_streaming_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,  # type: ignore[arg-type]
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    with stream:
        assert stream.response.headers["x-rbee-job-id"].startswith("job-")
        chunks = list(stream)
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _pieces(4)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    # include_usage: every chunk carries usage null, the last one has no choices and the usage.
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4


def test_completion_streaming_without_usage(client: openai.OpenAI) -> None:
    with client.completions.create(model=MODEL, prompt="p", max_tokens=3, stream=True) as stream:
        chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == _pieces(3)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)


# -- errors ---------------------------------------------------------------------------


def test_unknown_model_is_404_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=CHAT)  # type: ignore[arg-type]
    err = info.value
    assert err.status_code == 404
    assert err.code == "model_not_found" and err.param == "model" and err.type == "invalid_request_error"
    assert "no-such-model" in err.message
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 99}, "n"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": -1}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"seed": -5}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "bell \x07"}]}, "messages[0].content"),
    ],
)
def test_bad_chat_field_is_400_naming_the_param(client: openai.OpenAI, fields: dict[str, Any], param: str) -> None:
    body = {"model": MODEL, "messages": CHAT, **fields}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**body)
    assert info.value.status_code == 400
    assert info.value.param == param, info.value.body
    assert info.value.type == "invalid_request_error"


def test_bad_completion_field_is_400_naming_the_param(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=["one", "two"])
    assert info.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", echo=True)
    assert info.value.param == "echo"


def test_malformed_body_is_400_in_openai_shape(cluster: dict[str, Daemon]) -> None:
    r = httpx.post(
        cluster["queen"].url + "/v1/chat/completions",
        content=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_full_queue_is_429_with_retry_after(cluster: dict[str, Daemon]) -> None:
    """Queue size 1: one job runs, one waits, the next is refused."""
    url = cluster["queen"].url + "/v1"

    async def scenario() -> openai.RateLimitError:
        async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=60) as client:
            running = await client.completions.create(model=MODEL, prompt="a", max_tokens=30, stream=True)
            await anext(aiter(running))  # it has the worker
            waiting = asyncio.create_task(client.completions.create(model=MODEL, prompt="b", max_tokens=2))

            async def queued() -> None:
                while True:
                    if await asyncio.to_thread(_queue_depth, cluster["queen"].url):
                        return
                    await asyncio.sleep(0.02)

            await asyncio.wait_for(queued(), 10)
            try:
                await client.completions.create(model=MODEL, prompt="c", max_tokens=2)
            except openai.RateLimitError as exc:
                refused = exc
            else:  # pragma: no cover - the assertion below says what happened
                pytest.fail("the third request was not refused")
            # The others are unaffected.
            chunks = [c async for c in running]
            assert chunks[-1].choices[0].finish_reason == "length"
            done = await waiting
            assert done.choices[0].text == _pieces(2)
            return refused

    exc = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert exc.status_code == 429
    assert exc.response.headers["retry-after"].isdigit()
    assert exc.code == "queue_full" and exc.type == "rate_limit_error"


# -- async client -------------------------------------------------------------------


async def test_async_client_chat_and_completion(cluster: dict[str, Daemon]) -> None:
    async with asyncio.timeout(60):
        async with openai.AsyncOpenAI(base_url=cluster["queen"].url + "/v1", api_key="x", max_retries=0) as client:
            chat = await client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3)  # type: ignore[arg-type]
            assert chat.choices[0].message.content == _pieces(3)
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=CHAT,  # type: ignore[arg-type]
                max_tokens=6,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [c async for c in stream]
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == _pieces(6)
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
            text = await client.completions.create(model=MODEL, prompt="q", max_tokens=2)
            assert text.choices[0].text == _pieces(2)
            pieces = [
                c.choices[0].text
                async for c in await client.completions.create(model=MODEL, prompt="q", max_tokens=2, stream=True)
            ]
            assert "".join(pieces) == _pieces(2)
            with pytest.raises(openai.NotFoundError):
                await client.chat.completions.create(model="nope", messages=CHAT)  # type: ignore[arg-type]


# -- the wire, with a raw SSE client ----------------------------------------------------


async def _sse_lines(response: httpx.Response) -> list[str]:
    return [line async for line in response.aiter_lines()]


async def test_wire_format_of_a_stream_with_usage(cluster: dict[str, Daemon]) -> None:
    body = {
        "model": MODEL,
        "messages": CHAT,
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    url = cluster["queen"].url + "/v1/chat/completions"
    async with asyncio.timeout(30), httpx.AsyncClient(timeout=30) as http, http.stream("POST", url, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        job_id = r.headers["x-rbee-job-id"]
        lines = await _sse_lines(r)
    frames = [line for line in lines if line]
    assert all(f.startswith("data: ") for f in frames), frames
    assert frames[-1] == "data: [DONE]" and frames.count("data: [DONE]") == 1
    chunks = [json.loads(f[len("data: ") :]) for f in frames[:-1]]
    # role, three tokens, the finish, the usage.
    assert len(chunks) == 6
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:4]] == ["tok0 ", "tok1 ", "tok2 "]
    assert chunks[4]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert all("usage" in c and c["usage"] is None for c in chunks[:5])
    assert chunks[5]["choices"] == []
    assert chunks[5]["usage"]["completion_tokens"] == 3
    assert chunks[5]["usage"]["total_tokens"] == chunks[5]["usage"]["prompt_tokens"] + 3
    for c in chunks:
        assert c["object"] == "chat.completion.chunk" and c["model"] == MODEL and c["id"] == chunks[0]["id"]
    job = _wait_job(cluster["queen"].url, job_id, status="completed")
    assert job["tokens"] == 3


async def test_client_that_disconnects_mid_stream_cancels_its_job(cluster: dict[str, Daemon]) -> None:
    url = cluster["queen"].url
    body = {"model": MODEL, "prompt": "long", "max_tokens": 40, "stream": True}
    async with asyncio.timeout(60), httpx.AsyncClient(timeout=30) as http:
        async with http.stream("POST", url + "/v1/completions", json=body) as r:
            job_id = r.headers["x-rbee-job-id"]
            seen = 0
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    seen += 1
                    if seen == 3:
                        break
        # Leaving the block closed the connection mid-stream.
        job = await asyncio.to_thread(_wait_job, url, job_id, status="cancelled")
        assert job["error"]["message"] == "client disconnected"
        assert job["tokens"] < 40
        # The worker is free: the next request is served at once, in full.
        r2 = await http.post(url + "/v1/completions", json={"model": MODEL, "prompt": "next", "max_tokens": 4})
        assert r2.status_code == 200
        assert r2.json()["choices"][0]["text"] == _pieces(4)
        # The worker itself stopped generating: its own job ended cancelled, short of the 40 pieces.
        worker_jobs = await asyncio.to_thread(_worker_jobs, url)
        cancelled = [j for j in worker_jobs if j["status"] == "cancelled"]
        assert cancelled and cancelled[0]["tokens"] < 40


async def test_client_that_disconnects_before_the_answer_cancels_its_job(cluster: dict[str, Daemon]) -> None:
    url = cluster["queen"].url
    body = {"model": MODEL, "prompt": "long", "max_tokens": 40}
    async with asyncio.timeout(60), httpx.AsyncClient(timeout=30) as http:
        request = asyncio.create_task(http.post(url + "/v1/completions", json=body))

        async def job_id() -> str:
            while True:
                running = await asyncio.to_thread(_live_infer_jobs, url)
                if running and running[0]["tokens"] > 0:
                    return str(running[0]["job_id"])
                await asyncio.sleep(0.02)

        found = await job_id()
        request.cancel()  # the connection closes without an answer
        await asyncio.gather(request, return_exceptions=True)
        job = await asyncio.to_thread(_wait_job, url, found, status="cancelled")
        assert job["error"]["message"] == "client disconnected"
