"""The queen's OpenAI endpoints in process: models, validation, errors, auth.

Nothing here reaches a worker; generation through real processes is in
tests/integration/test_openai_*.py.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from rbee.queen.app import QueenSettings, create_queen_app

pytestmark = pytest.mark.timeout(30)

TOKEN = "queen-test-token-0123456789"
MODEL = "gemma3-270m"
CHAT = [{"role": "user", "content": "hi"}]
ERROR_KEYS = {"message", "type", "param", "code"}


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


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again: nothing listens there


def _beat(hive_id: str, *, workers: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "hive_id": hive_id,
        "url": _dead_url(),
        "models": [{"id": "gemma-3-270m-q4_k_m", "alias": MODEL}],
        "workers": workers or [],
        **extra,
    }


def _worker(worker_id: str, model: str = "gemma-3-270m-q4_k_m", **extra: Any) -> dict[str, Any]:
    return {
        "worker_id": worker_id,
        "model": model,
        "model_aliases": [MODEL],
        "state": "ready",
        "url": _dead_url(),
        **extra,
    }


JSON = {"Content-Type": "application/json"}


def _error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    error: dict[str, Any] = body["error"]
    return error


# -- models ---------------------------------------------------------------------


async def test_models_is_an_empty_list_without_hives(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/models")
    assert r.status_code == 200
    assert r.json() == {"object": "list", "data": []}


async def test_models_merges_catalogs_and_workers_of_every_hive(client: httpx.AsyncClient) -> None:
    await client.post("/v1/hives/heartbeat", json=_beat("alpha", workers=[_worker("w1")]))
    await client.post("/v1/hives/heartbeat", json=_beat("beta"))
    only_worker = _worker("w2", model="tinyllama", model_aliases=["tiny"])
    await client.post("/v1/hives/heartbeat", json={**_beat("gamma", workers=[only_worker]), "models": []})
    data = (await client.get("/v1/models")).json()["data"]
    by_id = {m["id"]: m for m in data}
    assert set(by_id) == {"gemma-3-270m-q4_k_m", "tinyllama"}
    gemma = by_id["gemma-3-270m-q4_k_m"]
    assert gemma["object"] == "model" and gemma["owned_by"] == "rbee" and isinstance(gemma["created"], int)
    assert gemma["aliases"] == [MODEL]
    assert sorted(gemma["hives"]) == ["alpha", "beta"]
    assert gemma["workers"] == 1
    assert by_id["tinyllama"]["hives"] == ["gamma"] and by_id["tinyllama"]["aliases"] == ["tiny"]


async def test_one_model_by_id_or_alias_else_404(client: httpx.AsyncClient) -> None:
    await client.post("/v1/hives/heartbeat", json=_beat("alpha"))
    assert (await client.get(f"/v1/models/{MODEL}")).json()["id"] == "gemma-3-270m-q4_k_m"
    assert (await client.get("/v1/models/gemma-3-270m-q4_k_m")).json()["aliases"] == [MODEL]
    error = _error(await client.get("/v1/models/org/other-model"), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"


# -- refused before a job exists --------------------------------------------------------


async def test_unknown_model_is_404(client: httpx.AsyncClient) -> None:
    await client.post("/v1/hives/heartbeat", json=_beat("alpha"))
    for path, body in (("/v1/chat/completions", {"messages": CHAT}), ("/v1/completions", {"prompt": "x"})):
        r = await client.post(path, json={"model": "nope", **body})
        error = _error(r, 404)
        assert error["code"] == "model_not_found" and error["param"] == "model"
        assert error["type"] == "invalid_request_error"
        assert "x-rbee-job-id" not in r.headers  # no job was made
    assert (await client.get("/v1/jobs")).json()["jobs"] == []


async def test_no_hive_is_503(client: httpx.AsyncClient) -> None:
    error = _error(await client.post("/v1/completions", json={"model": MODEL, "prompt": "x"}), 503)
    assert error["code"] == "no_worker" and error["type"] == "server_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": CHAT}, "model"),
        ({"model": MODEL}, "messages"),
        ({"model": MODEL, "messages": "hi"}, "messages"),
        ({"model": MODEL, "messages": [{"role": "user"}]}, "messages[0].content"),
        ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
        ({"model": MODEL, "messages": CHAT, "n": 9}, "n"),
        ({"model": MODEL, "messages": CHAT, "stream": "yes"}, "stream"),
        ({"model": MODEL, "messages": CHAT, "max_tokens": "many"}, "max_tokens"),
        ({"model": MODEL, "messages": CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
        ({"model": MODEL, "messages": CHAT, "max_tokens": 0}, "max_tokens"),
        ({"model": MODEL, "messages": CHAT, "temperature": True}, "temperature"),
        ({"model": MODEL, "messages": CHAT, "tools": [{"type": "function"}]}, "tools[0].function"),
        ({"model": MODEL, "messages": CHAT, "response_format": {"type": "xml"}}, "response_format"),
        ({"model": MODEL, "messages": CHAT, "logit_bias": {"one": 2}}, "logit_bias"),
        ({"model": "../etc", "messages": CHAT}, "model"),
    ],
)
async def test_bad_chat_request_is_400_naming_the_param(
    client: httpx.AsyncClient, body: dict[str, Any], param: str
) -> None:
    error = _error(await client.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL}, "prompt"),
        ({"model": MODEL, "prompt": [1, 2, 3]}, "prompt"),
        ({"model": MODEL, "prompt": ["a", "b"]}, "prompt"),
        ({"model": MODEL, "prompt": "x", "logprobs": 6}, "logprobs"),
        ({"model": MODEL, "prompt": "x", "best_of": 2}, "best_of"),
        ({"model": MODEL, "prompt": "x", "suffix": 3}, "suffix"),
        ({"model": MODEL, "prompt": "x", "stop": [""]}, "stop"),
        ({"model": MODEL, "prompt": "x", "top_k": -1}, "top_k"),
    ],
)
async def test_bad_completion_request_is_400_naming_the_param(
    client: httpx.AsyncClient, body: dict[str, Any], param: str
) -> None:
    error = _error(await client.post("/v1/completions", json=body), 400)
    assert error["param"] == param, error


async def test_body_that_is_not_json_or_not_an_object_is_400(client: httpx.AsyncClient) -> None:
    _error(await client.post("/v1/completions", content=b"{oops", headers=JSON), 400)
    _error(await client.post("/v1/chat/completions", json=[1, 2]), 400)


async def test_oversized_body_is_413_in_openai_shape(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"x" * 500_000

    error = _error(await client.post("/v1/completions", content=chunks(), headers=JSON), 413)
    assert error["code"] == "payload_too_large"
    # With a Content-Length the edge answers before reading; in OpenAI's shape too.
    error = _error(await client.post("/v1/chat/completions", content=b"x" * 1_500_000, headers=JSON), 413)
    assert error["code"] == "payload_too_large"


# -- a job that fails before its first token ------------------------------------------------


async def test_failure_before_the_first_token_is_answered_with_a_status(client: httpx.AsyncClient) -> None:
    """A worker that cannot be reached: the job fails (worker_lost) before any output."""
    for stream in (False, True):
        await client.post("/v1/hives/heartbeat", json=_beat("alpha", workers=[_worker("w1"), _worker("w2")]))
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "stream": stream})
        error = _error(r, 502)
        assert error["code"] == "worker_lost" and error["type"] == "server_error"
        job_id = r.headers["x-rbee-job-id"]
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
        assert job["status"] == "failed" and job["error"]["kind"] == "worker_lost"


# -- auth ------------------------------------------------------------------------------------


async def test_token_is_required_and_refusals_use_openai_shape(tmp_path: Path) -> None:
    async with queen(tmp_path, token=TOKEN) as (_, client):
        for method, path in (
            ("GET", "/v1/models"),
            ("GET", f"/v1/models/{MODEL}"),
            ("POST", "/v1/completions"),
            ("POST", "/v1/chat/completions"),
        ):
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                r = await client.request(method, path, headers=headers, json={})
                error = _error(r, 401)
                assert error["code"] == "invalid_api_key"
                assert r.headers["www-authenticate"] == "Bearer"
        # Other endpoints keep rbee's shape.
        r = await client.get("/v1/jobs")
        assert r.status_code == 401 and r.json()["error"]["kind"] == "unauthorized"
        ok = await client.get("/v1/models", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and ok.json()["object"] == "list"
