"""The queen's Anthropic Messages API in process: validation, errors, the edge, and answers from a fake worker.

The fake worker is a real worker app with the scripted engine, reached in
process (the queen's HTTP client is given an ASGI transport to it). The real
model, through real processes and the official SDK, is in
tests/e2e/test_anthropic_api.py.
"""

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
from rbee.worker.app import WorkerSettings, create_worker_app
from rbee.worker.fake import FakeEngine

pytestmark = pytest.mark.timeout(30)

TOKEN = "queen-test-token-0123456789"
MODEL = "gemma3-270m"
MODEL_ID = "gemma-3-270m-q4_k_m"
HI = [{"role": "user", "content": "hi"}]
JSON = {"Content-Type": "application/json"}
PIECES = ["Hello", " there", ", friend", ".", " Bye"]


@contextlib.asynccontextmanager
async def queen(home: Path, **settings: Any) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_queen_app(QueenSettings(home=home, **settings))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://queen") as client,
    ):
        yield app, client


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with queen(tmp_path) as (_, c):
        yield c


def _beat(workers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "hive_id": "alpha",
        "url": "http://hive",
        "models": [{"id": MODEL_ID, "alias": MODEL}],
        "workers": workers or [],
    }


async def in_process(app: FastAPI, worker: FastAPI) -> None:
    """The queen's HTTP client reaches ``worker`` in process (its HTTP/1.1 pool, for real sockets, is closed)."""
    http = app.state.queen.http
    http._transport = httpx.ASGITransport(worker)
    pool = getattr(http, "http1", None)
    if pool is not None:
        await pool.aclose()


@contextlib.asynccontextmanager
async def with_worker(tmp_path: Path, **engine: Any) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """A queen whose one worker is a fake one in process."""
    worker = create_worker_app(
        FakeEngine(model_id=MODEL_ID, pieces=engine.pop("pieces", PIECES), **engine),
        WorkerSettings(worker_id="w1", aliases=[MODEL]),
    )
    async with worker.router.lifespan_context(worker), queen(tmp_path) as (app, client):
        await in_process(app, worker)
        await asyncio.wait_for(worker.state.worker.load_done.wait(), 10)  # the model is loaded
        report = {
            "worker_id": "w1",
            "model": MODEL_ID,
            "model_aliases": [MODEL],
            "state": "ready",
            "url": "http://worker",
            "n_ctx": 4096,
        }
        assert (await client.post("/v1/hives/heartbeat", json=_beat([report]))).status_code == 200
        yield app, client


def _error(r: httpx.Response, status: int, kind: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and set(body) == {"type", "error"}, body
    assert set(body["error"]) == {"type", "message"} and body["error"]["type"] == kind, body
    message: str = body["error"]["message"]
    return message


def _events(text: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for frame in text.replace("\r\n", "\n").split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.splitlines() if ": " in line and not line.startswith(":"))
        if "event" in lines:
            out.append((lines["event"], json.loads(lines["data"])))
    return out


# -- refused before a job exists ----------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"max_tokens": 4, "messages": HI}, "model"),
        ({"model": MODEL, "messages": HI}, "max_tokens"),
        ({"model": MODEL, "max_tokens": 0, "messages": HI}, "max_tokens"),
        ({"model": MODEL, "max_tokens": "4", "messages": HI}, "max_tokens"),
        ({"model": MODEL, "max_tokens": 4}, "messages"),
        ({"model": MODEL, "max_tokens": 4, "messages": []}, "messages"),
        ({"model": MODEL, "max_tokens": 4, "messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
        ({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user"}]}, "messages[0].content"),
        (
            {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image"}]}]},
            "messages[0].content[0].type: 'image'",
        ),
        (
            {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "tool_result"}]}]},
            "messages[0].content[0].tool_use_id",
        ),
        (
            {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "thinking"}]}]},
            "messages[0].content[0].type: 'thinking' blocks",
        ),
        ({"model": MODEL, "max_tokens": 4, "messages": HI, "system": [{"type": "document"}]}, "system[0].type"),
        ({"model": MODEL, "max_tokens": 4, "messages": HI, "temperature": 1.5}, "temperature"),
        ({"model": MODEL, "max_tokens": 4, "messages": HI, "top_p": -1}, "top_p"),
        ({"model": MODEL, "max_tokens": 4, "messages": HI, "top_k": 1.5}, "top_k"),
        ({"model": MODEL, "max_tokens": 4, "messages": HI, "stop_sequences": "x"}, "stop_sequences"),
        ({"model": MODEL, "max_tokens": 4, "messages": HI, "stream": "yes"}, "stream"),
        ({"model": MODEL, "max_tokens": 4, "messages": HI, "tools": [{"name": "f"}]}, "tools[0].input_schema"),
        ({"model": MODEL, "max_tokens": 4, "messages": HI, "tool_choice": {"type": "auto"}}, "tool_choice"),
        ({"model": MODEL, "max_tokens": 4, "messages": HI, "thinking": {"type": "enabled"}}, "thinking"),
        ({"model": MODEL, "max_tokens": 4, "messages": HI, "metadata": "x"}, "metadata"),
        ({"model": "../etc", "max_tokens": 4, "messages": HI}, "model"),
    ],
)
async def test_bad_request_is_400_naming_the_field(client: httpx.AsyncClient, body: dict[str, Any], field: str) -> None:
    r = await client.post("/v1/messages", json=body)
    message = _error(r, 400, "invalid_request_error")
    assert field in message, message
    assert r.headers["request-id"].startswith("req_")
    assert "x-rbee-job-id" not in r.headers
    assert (await client.get("/v1/jobs")).json()["jobs"] == []


async def test_body_that_is_not_json_or_not_an_object_is_400(client: httpx.AsyncClient) -> None:
    _error(await client.post("/v1/messages", content=b"{oops", headers=JSON), 400, "invalid_request_error")
    _error(await client.post("/v1/messages/count_tokens", json=[1]), 400, "invalid_request_error")


async def test_unknown_model_is_404_and_no_worker_is_529(client: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "max_tokens": 4, "messages": HI}
    assert "no hive" in _error(await client.post("/v1/messages", json=body), 529, "overloaded_error")
    await client.post("/v1/hives/heartbeat", json=_beat())
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        r = await client.post(path, json={**body, "model": "nope"})
        assert "nope" in _error(r, 404, "not_found_error")


async def test_tools_are_accepted_when_tool_choice_is_none(client: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "max_tokens": 4, "messages": HI, "metadata": {"user_id": "u"}}
    body |= {"tools": [{"name": "f", "input_schema": {"type": "object"}}], "tool_choice": {"type": "none"}}
    _error(await client.post("/v1/messages", json=body), 529, "overloaded_error")  # past validation


# -- answers from a fake worker -------------------------------------------------------


async def test_message_usage_and_max_tokens(tmp_path: Path) -> None:
    async with with_worker(tmp_path) as (_, client):
        body = {"model": MODEL, "max_tokens": 3, "system": [{"type": "text", "text": "Be brief."}], "messages": HI}
        r = await client.post("/v1/messages", json=body)
        assert r.status_code == 200, r.text
        message = r.json()
        assert message["id"].startswith("msg_") and message["type"] == "message" and message["role"] == "assistant"
        assert message["model"] == MODEL
        assert message["content"] == [{"type": "text", "text": "Hello there, friend"}]
        assert message["stop_reason"] == "max_tokens" and message["stop_sequence"] is None
        assert message["usage"]["output_tokens"] == 3 and message["usage"]["input_tokens"] > 0
        job = (await client.get(f"/v1/jobs/{r.headers['x-rbee-job-id']}")).json()
        assert job["status"] == "completed" and job["operation"] == "infer"
        assert r.headers["request-id"].startswith("req_")
        # All of it, to the end of the script: end_turn.
        r = await client.post("/v1/messages", json={**body, "max_tokens": 50})
        assert r.json()["stop_reason"] == "end_turn" and r.json()["content"][0]["text"] == "".join(PIECES)


async def test_the_stop_sequence_that_matched_is_the_one_named(tmp_path: Path) -> None:
    async with with_worker(tmp_path) as (_, client):
        body = {"model": MODEL, "max_tokens": 50, "messages": HI, "stop_sequences": ["never", " there"]}
        r = await client.post("/v1/messages", json=body)
        assert r.status_code == 200, r.text
        assert (r.json()["stop_reason"], r.json()["stop_sequence"]) == ("stop_sequence", " there")


async def test_stream_has_anthropics_events_in_order(tmp_path: Path) -> None:
    async with with_worker(tmp_path) as (_, client):
        body = {"model": MODEL, "max_tokens": 50, "messages": HI, "stream": True, "stop_sequences": [", "]}
        r = await client.post("/v1/messages", json=body)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _events(r.text)
        names = [name for name, _ in events]
        assert names[:3] == ["message_start", "content_block_start", "ping"]
        assert names[3:-3] == ["content_block_delta"] * (len(names) - 6)
        assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
        assert all(data["type"] == name for name, data in events)
        start = events[0][1]["message"]
        assert start["id"].startswith("msg_") and start["content"] == [] and start["stop_reason"] is None
        text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
        assert text == "Hello there"
        delta = events[-2][1]
        assert delta["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": ", "}
        assert delta["usage"]["output_tokens"] == 3 and delta["usage"]["input_tokens"] > 0
        assert r.headers["x-rbee-job-id"].startswith("job-")


async def test_failure_mid_stream_is_an_error_event(tmp_path: Path) -> None:
    async with with_worker(tmp_path, fail_after=2) as (_, client):
        r = await client.post("/v1/messages", json={"model": MODEL, "max_tokens": 50, "messages": HI, "stream": True})
        assert r.status_code == 200
        events = _events(r.text)
        assert [n for n, _ in events if n == "content_block_delta"]
        assert events[-1][0] == "error" and events[-1][1]["error"]["type"] in ("api_error", "invalid_request_error")
        assert "message_stop" not in [n for n, _ in events]
        # Not streaming, the same failure is a status (nothing was said before it).
        r = await client.post("/v1/messages", json={"model": MODEL, "max_tokens": 50, "messages": HI})
        assert r.status_code >= 500 and r.json()["type"] == "error"


async def test_count_tokens_is_the_workers_count(tmp_path: Path) -> None:
    async with with_worker(tmp_path) as (_, client):
        body = {"model": MODEL, "system": "Be brief.", "messages": HI}
        r = await client.post("/v1/messages/count_tokens", json=body)
        assert r.status_code == 200, r.text
        counted = r.json()["input_tokens"]
        used = (await client.post("/v1/messages", json={**body, "max_tokens": 1})).json()["usage"]["input_tokens"]
        assert counted == used > 0
        assert r.headers["request-id"].startswith("req_")


async def test_a_client_that_leaves_cancels_its_job(tmp_path: Path) -> None:
    async with with_worker(tmp_path, delay_ms=200, pieces=["x"] * 100) as (app, client):
        task = asyncio.create_task(client.post("/v1/messages", json={"model": MODEL, "max_tokens": 90, "messages": HI}))
        registry = app.state.queen.registry
        for _ in range(200):
            if registry.live:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        listed = (await client.get("/v1/jobs")).json()["jobs"]
        assert len(listed) == 1
        job_id = listed[0]["job_id"] if "job_id" in listed[0] else listed[0]["id"]
        for _ in range(100):
            job = (await client.get(f"/v1/jobs/{job_id}")).json()
            if job["status"] != "running" and job["status"] != "queued":
                break
            await asyncio.sleep(0.05)
        assert job["status"] == "cancelled", job


# -- the edge ----------------------------------------------------------------------------


async def test_api_key_or_bearer_token_and_refusals_in_anthropics_shape(tmp_path: Path) -> None:
    async with queen(tmp_path, token=TOKEN) as (_, client):
        body = {"model": MODEL, "max_tokens": 4, "messages": HI}
        for headers in ({}, {"x-api-key": "wrong"}, {"Authorization": "Bearer wrong"}):
            for path in ("/v1/messages", "/v1/messages/count_tokens"):
                r = await client.post(path, json=body, headers=headers)
                assert "x-api-key" in _error(r, 401, "authentication_error")
        for headers in ({"x-api-key": TOKEN}, {"Authorization": f"Bearer {TOKEN}"}):
            _error(await client.post("/v1/messages", json=body, headers=headers), 529, "overloaded_error")
        # The key is the token everywhere; other paths keep their own error shapes.
        assert (await client.get("/v1/jobs", headers={"x-api-key": TOKEN})).status_code == 200
        r = await client.get("/v1/jobs", headers={"x-api-key": "wrong"})
        assert r.status_code == 401 and r.json()["error"]["kind"] == "unauthorized"
        r = await client.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


async def test_edge_refusals_use_anthropics_shape(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"x" * 500_000

    _error(await client.post("/v1/messages", content=chunks(), headers=JSON), 413, "request_too_large")
    big = b"x" * 1_500_000
    _error(await client.post("/v1/messages", content=big, headers=JSON), 413, "request_too_large")
    r = await client.post("/v1/messages", content=b"{}", headers={"Content-Type": "text/plain"})
    _error(r, 415, "invalid_request_error")
    _error(await client.post("/v1/messages/nope", json={}), 404, "not_found_error")
    _error(await client.get("/v1/messages"), 405, "invalid_request_error")
    r = await client.post("/v1/messages", json={}, headers={"Host": "evil.example"})
    _error(r, 403, "permission_error")
    r = await client.post("/v1/messages", json={}, headers={"Origin": "https://evil.example"})
    _error(r, 403, "permission_error")


async def test_openapi_declares_anthropics_error_shape(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    assert "AnthropicError" in schema["components"]["schemas"]
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        responses = schema["paths"][path]["post"]["responses"]
        assert {"400", "404", "413", "415", "429", "529"} <= set(responses)
        for status, response in responses.items():
            if status[0] in "45":
                ref = response["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/AnthropicError"), (path, status)
