"""The queen's Ollama endpoints in process: models, validation, errors, auth.

Nothing here reaches a real worker (the heartbeats name workers at closed
ports); generation with the real model and the official client is in
tests/e2e/test_ollama_api.py.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from rbee.contracts.operations import Infer
from rbee.queen.app import QueenSettings, create_queen_app

pytestmark = pytest.mark.timeout(30)

TOKEN = "queen-test-token-0123456789"
USER = "queen-user-token-0123456789"
MODEL = "gemma3-270m"
MODEL_ID = "gemma-3-270m-q4_k_m"
CHAT = [{"role": "user", "content": "hi"}]


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
        return f"http://127.0.0.1:{s.getsockname()[1]}"


MODEL_REPORT = {
    "id": MODEL_ID,
    "alias": MODEL,
    "size_bytes": 253_000_000,
    "architecture": "gemma3",
    "quantization": "q4_k_m",
    "context_length": 32768,
    "chat_template": "gemma",
}


def _beat(hive_id: str, *, workers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"hive_id": hive_id, "url": _dead_url(), "models": [MODEL_REPORT], "workers": workers or []}


def _worker(worker_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "worker_id": worker_id,
        "model": MODEL_ID,
        "model_aliases": [MODEL],
        "state": "ready",
        "url": _dead_url(),
        **extra,
    }


def _error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    message: str = body["error"]
    return message


# -- models ---------------------------------------------------------------------


async def test_tags_ps_version_without_hives(client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/tags")).json() == {"models": []}
    assert (await client.get("/api/ps")).json() == {"models": []}
    version = (await client.get("/api/version")).json()
    assert version["version"].count(".") == 2 and "rbee_version" in version


async def test_tags_in_ollamas_shape(client: httpx.AsyncClient) -> None:
    await client.post("/v1/hives/heartbeat", json=_beat("alpha"))
    await client.post("/v1/hives/heartbeat", json=_beat("beta"))
    (tag,) = (await client.get("/api/tags")).json()["models"]
    assert tag["name"] == tag["model"] == MODEL
    assert tag["size"] == 253_000_000
    assert len(tag["digest"]) == 64
    assert tag["modified_at"].endswith("Z")
    assert tag["details"] == {
        "parent_model": "",
        "format": "gguf",
        "family": "gemma3",
        "families": ["gemma3"],
        "parameter_size": "270M",
        "quantization_level": "Q4_K_M",
    }


async def test_show_by_alias_id_or_latest_tag_else_404(client: httpx.AsyncClient) -> None:
    await client.post("/v1/hives/heartbeat", json=_beat("alpha"))
    for name in (MODEL, MODEL_ID, f"{MODEL}:latest"):
        r = await client.post("/api/show", json={"model": name})
        assert r.status_code == 200, r.text
        shown = r.json()
        assert shown["template"] == shown["chat_template"] == "gemma"
        assert shown["context_length"] == 32768
        assert shown["model_info"]["gemma3.context_length"] == 32768
        assert shown["details"]["family"] == "gemma3"
    assert (await client.post("/api/show", json={"name": MODEL})).status_code == 200  # older clients
    assert _error(await client.post("/api/show", json={"model": "nope"}), 404) == "model 'nope' not found"
    assert "model is required" in _error(await client.post("/api/show", json={}), 400)


async def test_ps_lists_workers_with_their_expiry(client: httpx.AsyncClient) -> None:
    unloads_at = time.time() + 120
    workers = [
        _worker("w1", unloads_at=unloads_at, keep_alive_s=300, memory_bytes=400_000_000, n_ctx=4096),
        _worker("w2", state="busy", keep_alive_s=-1, device="cuda:0", memory_bytes=500_000_000),
        _worker("w3", state="dead"),
    ]
    await client.post("/v1/hives/heartbeat", json=_beat("alpha", workers=workers))
    models = (await client.get("/api/ps")).json()["models"]
    assert [m["worker_id"] for m in models] == ["w1", "w2"]
    w1, w2 = models
    assert w1["name"] == MODEL and w1["size"] == 400_000_000 and w1["size_vram"] == 0
    assert w1["context_length"] == 4096
    expires = w1["expires_at"]
    assert expires.endswith("Z")
    assert w2["size_vram"] == 500_000_000 and w2["expires_at"].startswith("2318-")


# -- refused before a job exists --------------------------------------------------------


async def test_unknown_model_is_404_in_ollamas_words(client: httpx.AsyncClient) -> None:
    await client.post("/v1/hives/heartbeat", json=_beat("alpha"))
    for path, body in (("/api/chat", {"messages": CHAT}), ("/api/generate", {"prompt": "x"})):
        r = await client.post(path, json={"model": "nope", **body})
        assert _error(r, 404) == "model 'nope' not found"
        assert "x-rbee-job-id" not in r.headers
    # Unloading an unknown model too.
    r = await client.post("/api/generate", json={"model": "nope", "keep_alive": 0})
    assert _error(r, 404) == "model 'nope' not found"
    assert (await client.get("/v1/jobs")).json()["jobs"] == []


async def test_no_hive_is_503(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/generate", json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 503, r.text
    assert isinstance(r.json()["error"], str)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"prompt": "x"}, "model is required"),
        ({"model": MODEL, "prompt": "x", "stream": "yes"}, "stream"),
        ({"model": MODEL, "prompt": 3}, "prompt"),
        ({"model": MODEL, "prompt": "x", "options": "hot"}, "options must be an object"),
        ({"model": MODEL, "prompt": "x", "options": {"temperature": "hot"}}, "options.temperature"),
        ({"model": MODEL, "prompt": "x", "options": {"temperature": 5}}, "options.temperature"),
        ({"model": MODEL, "prompt": "x", "options": {"top_k": 1.5}}, "options.top_k"),
        ({"model": MODEL, "prompt": "x", "options": {"num_predict": 0}}, "options.num_predict"),
        ({"model": MODEL, "prompt": "x", "options": {"num_predict": 10**9}}, "options.num_predict"),
        ({"model": MODEL, "prompt": "x", "options": {"stop": [""]}}, "options.stop"),
        ({"model": MODEL, "prompt": "x", "options": {"num_ctx": "big"}}, "options.num_ctx"),
        ({"model": MODEL, "prompt": "x", "keep_alive": "soon"}, "keep_alive"),
        ({"model": MODEL, "prompt": "x", "images": ["aGk="]}, "images"),
        ({"model": MODEL, "prompt": "x", "template": "{{ .Prompt }}"}, "template"),
        ({"model": MODEL, "prompt": "x", "context": [1, 2]}, "context"),
        ({"model": MODEL, "prompt": "x", "format": 3}, "format"),
        ({"model": "../etc", "prompt": "x"}, "model"),
    ],
)
async def test_bad_generate_request_is_400_naming_the_field(
    client: httpx.AsyncClient, body: dict[str, Any], words: str
) -> None:
    assert words in _error(await client.post("/api/generate", json=body), 400)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"model": MODEL, "messages": "hi"}, "messages"),
        ({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"model": MODEL, "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, "images"),
        ({"model": MODEL, "messages": CHAT, "tools": [{"type": "function"}]}, "tools"),
        ({"model": MODEL, "messages": CHAT, "think": True}, "think"),
    ],
)
async def test_bad_chat_request_is_400(client: httpx.AsyncClient, body: dict[str, Any], words: str) -> None:
    assert words in _error(await client.post("/api/chat", json=body), 400)


async def test_format_is_passed_on_or_refused(client: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "prompt": "x", "format": "json"}
    r = await client.post("/api/generate", json=body)
    if "json_schema" in Infer.model_fields:
        assert r.status_code == 503, r.text  # accepted; no hive to run it
    else:
        assert "format" in _error(r, 400)


async def test_body_that_is_not_json_is_400(client: httpx.AsyncClient) -> None:
    headers = {"Content-Type": "application/json"}
    _error(await client.post("/api/generate", content=b"{oops", headers=headers), 400)
    _error(await client.post("/api/chat", json=[1, 2]), 400)
    # No content type: the edge refuses it (in rbee's shape), as for every endpoint.
    r = await client.post("/api/generate", content=b'{"model": "x"}', headers={"Content-Type": ""})
    assert r.status_code == 415


# -- a job that fails before its first token ------------------------------------------------


async def test_failure_before_the_first_token_is_answered_with_a_status(client: httpx.AsyncClient) -> None:
    for stream in (False, True):
        await client.post("/v1/hives/heartbeat", json=_beat("alpha", workers=[_worker("w1"), _worker("w2")]))
        r = await client.post("/api/chat", json={"model": MODEL, "messages": CHAT, "stream": stream})
        assert r.status_code == 502, r.text
        assert isinstance(r.json()["error"], str)
        job = (await client.get(f"/v1/jobs/{r.headers['x-rbee-job-id']}")).json()
        assert job["status"] == "failed" and job["error"]["kind"] == "worker_lost"
        assert job["operation"] == "infer"


# -- auth --------------------------------------------------------------------------------------


async def test_token_is_required_and_unloading_needs_the_admin_token(tmp_path: Path) -> None:
    async with queen(tmp_path, token=TOKEN, user_tokens=(USER,)) as (_, client):
        for method, path in (("GET", "/api/tags"), ("GET", "/api/ps"), ("POST", "/api/generate")):
            r = await client.request(method, path, json={"model": MODEL})
            assert r.status_code == 401
        admin = {"Authorization": f"Bearer {TOKEN}"}
        await client.post("/v1/hives/heartbeat", json=_beat("alpha"), headers=admin)
        user = {"Authorization": f"Bearer {USER}"}
        r = await client.post("/api/generate", json={"model": MODEL, "keep_alive": 0}, headers=user)
        assert r.status_code == 403 and isinstance(r.json()["error"], str)
        assert (await client.get("/api/tags", headers=user)).json()["models"][0]["name"] == MODEL


async def test_penalties_pass_through_where_infer_has_them_else_only_neutral(client: httpx.AsyncClient) -> None:
    for name, value in (("repeat_penalty", 1.1), ("min_p", 0.1), ("presence_penalty", 0.5)):
        r = await client.post("/api/generate", json={"model": MODEL, "prompt": "x", "options": {name: value}})
        assert r.status_code == (503 if name in Infer.model_fields else 400), r.text
    ok = await client.post("/api/generate", json={"model": MODEL, "prompt": "x", "options": {"mirostat": 0}})
    assert ok.status_code == 503  # neutral: accepted (no hive to run it)
    r = await client.post("/api/generate", json={"model": MODEL, "prompt": "x", "options": {"mirostat": 2}})
    assert "options.mirostat" in _error(r, 400)


async def test_head_of_the_root_answers_200_as_ollama_s_clients_expect(client: httpx.AsyncClient) -> None:
    response = await client.head("/")
    assert response.status_code == 200
