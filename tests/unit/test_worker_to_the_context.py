"""A job that asks for no limit (``to_the_context``: an OpenAI chat without ``max_tokens``,
llama.cpp's ``n_predict: -1``): the worker bounds it by its own context, whatever
``max_tokens`` the queen could put in before any worker was there to count the prompt."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from rbee.worker.app import WorkerSettings, create_worker_app
from rbee.worker.fake import FakeEngine

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def worker() -> AsyncIterator[tuple[httpx.AsyncClient, FakeEngine]]:
    engine = FakeEngine(tokens=4, n_ctx=64)
    app = create_worker_app(engine, WorkerSettings(worker_id="worker-test"))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://worker") as client,
    ):
        await asyncio.wait_for(app.state.worker.load_done.wait(), 10)  # the model is loaded
        yield client, engine


def _op(**fields: Any) -> dict[str, Any]:
    return {"operation": "infer", "model": "fake-model", "prompt": "one two three", **fields}


async def _run(client: httpx.AsyncClient, **fields: Any) -> httpx.Response:
    r = await client.post("/v1/jobs", json=_op(**fields))
    if r.status_code == 201:
        async with client.stream("GET", f"/v1/jobs/{r.json()['job_id']}/stream") as stream:
            async for _ in stream.aiter_bytes():
                pass
    return r


async def test_the_context_bounds_a_job_without_a_limit(worker: tuple[httpx.AsyncClient, FakeEngine]) -> None:
    client, engine = worker
    r = await _run(client, max_tokens=1024, to_the_context=True)
    assert r.status_code == 201, r.text
    assert engine.last_request is not None and engine.last_request.max_tokens == 64 - 3


async def test_a_limit_given_over_the_context_is_still_refused(worker: tuple[httpx.AsyncClient, FakeEngine]) -> None:
    client, _ = worker
    r = await _run(client, max_tokens=1024)
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "max_tokens"


async def test_a_prompt_that_fills_the_context_is_refused_naming_it(
    worker: tuple[httpx.AsyncClient, FakeEngine],
) -> None:
    client, engine = worker
    before = engine.last_request
    r = await _run(client, prompt=" ".join(["w"] * 64), to_the_context=True)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == "prompt" and "does not fit the context of 64 tokens" in error["message"]
    assert engine.last_request is before  # nothing ran


async def test_resumed_tokens_beyond_the_placeholder_limit_are_taken(
    worker: tuple[httpx.AsyncClient, FakeEngine],
) -> None:
    client, engine = worker
    r = await _run(client, max_tokens=2, resume_tokens=[1, 2, 3], to_the_context=True)
    assert r.status_code == 201, r.text
    assert engine.last_request is not None and engine.last_request.max_tokens == 61
