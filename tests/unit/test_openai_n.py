"""``n`` > 1 on chat and text completions: one job a choice (seeds seed+i), choices with
their index, usage summed with the prompt counted once, interleaved stream chunks, and
every job cancelled when the client goes. The fake engine stands in for the model."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from rbee.queen.app import QueenSettings, create_queen_app
from rbee.queen.openai import routes, schema
from rbee.worker.app import WorkerSettings, create_worker_app
from rbee.worker.fake import FakeEngine

pytestmark = pytest.mark.timeout(30)

MODEL = "gemma3-270m"
MODEL_ID = "gemma-3-270m-q4_k_m"
CHAT = [{"role": "user", "content": "hi"}]
PIECES = ["Hello", " there", ", friend"]


@contextlib.asynccontextmanager
async def with_worker(tmp_path: Path, **engine: Any) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """A queen whose one worker is a fake one in process."""
    worker = create_worker_app(
        FakeEngine(model_id=MODEL_ID, pieces=engine.pop("pieces", PIECES), **engine),
        WorkerSettings(worker_id="w1", aliases=[MODEL]),
    )
    app = create_queen_app(QueenSettings(home=tmp_path))
    async with (
        worker.router.lifespan_context(worker),
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://queen") as client,
    ):
        app.state.queen.http._transport = httpx.ASGITransport(worker)
        app.state.queen.http.http1 = None  # every request through the worker app, not a socket
        await asyncio.wait_for(worker.state.worker.load_done.wait(), 10)  # the model is loaded
        report = {
            "worker_id": "w1",
            "model": MODEL_ID,
            "model_aliases": [MODEL],
            "state": "ready",
            "url": "http://worker",
            "n_ctx": 4096,
            "slots": 8,
        }
        beat = {
            "hive_id": "alpha",
            "url": "http://hive",
            "models": [{"id": MODEL_ID, "alias": MODEL}],
            "workers": [report],
        }
        assert (await client.post("/v1/hives/heartbeat", json=beat)).status_code == 200
        yield app, client


def _chunks(text: str) -> list[dict[str, Any]]:
    lines = [line[6:] for line in text.replace("\r\n", "\n").splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]" and lines.count("[DONE]") == 1
    return [json.loads(line) for line in lines[:-1]]


def test_n_is_bounded_and_seeds_follow() -> None:
    call = schema.parse({"model": "m", "messages": CHAT, "n": 8, "seed": 7}, chat=True)
    assert call.n == 8
    assert [routes.seeded(call.op, i).seed for i in range(3)] == [7, 8, 9]
    unseeded = schema.parse({"model": "m", "prompt": "x", "n": 2}, chat=False).op
    assert routes.seeded(unseeded, 1).seed is None
    assert routes.seeded(schema.parse({"model": "m", "prompt": "x", "seed": 2**32 - 1}, chat=False).op, 1).seed == 0


async def test_chat_n_answers_n_choices_with_usage_summed(tmp_path: Path) -> None:
    async with with_worker(tmp_path) as (app, client):
        body = {"model": MODEL, "messages": CHAT, "n": 3, "seed": 11, "max_tokens": 8}
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert [c["index"] for c in answer["choices"]] == [0, 1, 2]
        assert all(c["message"]["content"] == "Hello there, friend" for c in answer["choices"])
        usage = answer["usage"]
        single = (await client.post("/v1/chat/completions", json={**body, "n": 1})).json()["usage"]
        assert usage["prompt_tokens"] == single["prompt_tokens"]
        assert usage["completion_tokens"] == 3 * single["completion_tokens"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        ids = r.headers["x-rbee-job-ids"].split(",")
        assert len(ids) == 3 and ids[0] == r.headers["x-rbee-job-id"]
        seeds = [app.state.queen.registry.get(job_id).operation.seed for job_id in ids]
        assert seeds == [11, 12, 13]


async def test_completion_n(tmp_path: Path) -> None:
    async with with_worker(tmp_path) as (_, client):
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "n": 2, "max_tokens": 8})
        assert r.status_code == 200, r.text
        assert [(c["index"], c["text"]) for c in r.json()["choices"]] == [
            (0, "Hello there, friend"),
            (1, "Hello there, friend"),
        ]


async def test_streamed_n_interleaves_choices_by_index(tmp_path: Path) -> None:
    async with with_worker(tmp_path) as (_, client):
        for path, body in (
            ("/v1/chat/completions", {"messages": CHAT}),
            ("/v1/completions", {"prompt": "x"}),
        ):
            r = await client.post(
                path,
                json={
                    "model": MODEL,
                    "n": 2,
                    "max_tokens": 8,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    **body,
                },
            )
            assert r.status_code == 200, r.text
            chunks = _chunks(r.text)
            assert len({c["id"] for c in chunks}) == 1
            by_index: dict[int, str] = {0: "", 1: ""}
            reasons: dict[int, str] = {}
            for chunk in chunks[:-1]:
                (choice,) = chunk["choices"]
                by_index[choice["index"]] += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                if choice["finish_reason"]:
                    reasons[choice["index"]] = choice["finish_reason"]
            assert by_index == {0: "Hello there, friend", 1: "Hello there, friend"}
            assert reasons == {0: "stop", 1: "stop"}
            usage = chunks[-1]["usage"]
            assert chunks[-1]["choices"] == [] and usage["completion_tokens"] == 6


async def test_a_client_that_leaves_cancels_every_choice(tmp_path: Path) -> None:
    async with with_worker(tmp_path, delay_ms=100, pieces=["x"] * 100) as (app, client):
        for stream in (False, True):
            body = {"model": MODEL, "messages": CHAT, "n": 3, "max_tokens": 90, "stream": stream}
            task = asyncio.create_task(client.post("/v1/chat/completions", json=body))
            registry = app.state.queen.registry
            for _ in range(200):
                if registry.live >= 3:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            for _ in range(100):
                if not registry.live:
                    break
                await asyncio.sleep(0.05)
            assert not registry.live
        statuses = [j["status"] for j in (await client.get("/v1/jobs")).json()["jobs"]]
        assert statuses == ["cancelled"] * 6, statuses
