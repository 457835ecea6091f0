"""The queen's Ollama endpoints in process: models, validation, errors, auth.

Nothing here reaches a real worker (the heartbeats name workers at closed
ports); generation with the real model and the official client is in
tests/e2e/test_ollama_api.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from modelserver import ModelServer, tiny_gguf
from rbee.contracts.operations import Infer
from rbee.queen.app import QueenSettings, create_queen_app
from rbee.worker.app import WorkerSettings, create_worker_app
from rbee.worker.fake import FakeEngine

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
        ({"model": MODEL, "messages": [{"role": "bot", "content": "x"}]}, "messages[0].role"),
        ({"model": MODEL, "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, "images"),
        ({"model": MODEL, "messages": CHAT, "tools": [{"type": "function"}]}, "tools[0].function"),
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
    # No content type: the edge refuses it (in Ollama's shape), as for every endpoint.
    r = await client.post("/api/generate", content=b'{"model": "x"}', headers={"Content-Type": ""})
    assert "application/json" in _error(r, 415)


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
            assert "bearer token" in _error(r, 401)
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


# -- embeddings -------------------------------------------------------------------

WORKER_TOKEN = "worker-token-0123456789"


@contextlib.asynccontextmanager
async def with_worker(home: Path) -> AsyncIterator[tuple[FakeEngine, httpx.AsyncClient]]:
    """A queen whose one ready worker is a fake one in process."""
    engine = FakeEngine(model_id=MODEL_ID, n_ctx=64)
    worker = create_worker_app(engine, WorkerSettings(worker_id="w1", aliases=[MODEL], token=WORKER_TOKEN))
    async with worker.router.lifespan_context(worker), queen(home) as (app, client):
        http = app.state.queen.http
        http._transport = httpx.ASGITransport(worker)
        await asyncio.wait_for(worker.state.worker.load_done.wait(), 10)  # the model is loaded
        report: dict[str, Any] = {"worker_id": "w1", "model": MODEL_ID, "model_aliases": [MODEL], "state": "ready"}
        report |= {"url": "http://worker", "n_ctx": 64}
        beat: dict[str, Any] = {"hive_id": "alpha", "url": "http://hive", "models": [MODEL_REPORT], "workers": [report]}
        beat["worker_tokens"] = {"w1": WORKER_TOKEN}
        assert (await client.post("/v1/hives/heartbeat", json=beat)).status_code == 200
        yield engine, client


async def test_embed_in_ollamas_shape(tmp_path: Path) -> None:
    async with with_worker(tmp_path) as (engine, client):
        r = await client.post("/api/embed", json={"model": MODEL, "input": ["a b", "c"], "truncate": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"model", "embeddings", "total_duration", "load_duration", "prompt_eval_count"}
        assert body["model"] == MODEL and body["prompt_eval_count"] == 5
        assert body["embeddings"] == engine.embed([[0, *engine.tokenize("a b")], [0, *engine.tokenize("c")]])
        assert body["total_duration"] > 0 and body["load_duration"] == 0
        for vector in body["embeddings"]:
            assert abs(sum(x * x for x in vector) - 1.0) < 1e-4
        one = (await client.post("/api/embed", json={"model": f"{MODEL}:latest", "input": "c"})).json()
        assert one["embeddings"] == [body["embeddings"][1]]
        old = await client.post("/api/embeddings", json={"model": MODEL, "prompt": "c"})
        assert old.status_code == 200 and old.json() == {"embedding": body["embeddings"][1]}
        empty = await client.post("/api/embeddings", json={"model": MODEL, "prompt": ""})
        assert empty.json() == {"embedding": []}


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"model": MODEL}, "input is required"),
        ({"model": MODEL, "input": []}, "input must be"),
        ({"model": MODEL, "input": [1, 2]}, "input must be"),
        ({"model": MODEL, "input": "x", "truncate": "yes"}, "truncate"),
        ({"input": "x"}, "model is required"),
        ({"model": MODEL, "input": "x", "keep_alive": "soon"}, "keep_alive"),
    ],
)
async def test_bad_embed_request_is_400(tmp_path: Path, body: dict[str, Any], words: str) -> None:
    async with with_worker(tmp_path) as (_, client):
        assert words in _error(await client.post("/api/embed", json=body), 400)


async def test_embed_of_an_unknown_model_is_404(tmp_path: Path) -> None:
    async with with_worker(tmp_path) as (_, client):
        r = await client.post("/api/embed", json={"model": "nope", "input": "x"})
        assert _error(r, 404) == "model 'nope' not found"
        r = await client.post("/api/embeddings", json={"model": "nope", "prompt": "x"})
        assert _error(r, 404) == "model 'nope' not found"


# -- delete and pull (a queen with its local hive, the models from a local server) --------

GGUF = tiny_gguf(64 * 1024)  # 256 KiB


@contextlib.asynccontextmanager
async def with_local_hive(home: Path, **settings: Any) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    async with queen(home, local_hive=True, **settings) as (app, client):
        for _ in range(500):
            if any(h.hive_id == "localhost" for h in app.state.queen.telemetry.fresh_hives()):
                break
            await asyncio.sleep(0.01)
        yield app, client


def _lines(r: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in r.text.splitlines() if line.strip()]


async def test_pull_streams_ollamas_status_lines_then_delete_removes_it(tmp_path: Path) -> None:
    with ModelServer() as server:
        server.add("/tiny-model.gguf", GGUF)
        async with with_local_hive(tmp_path) as (_, client):
            r = await client.post("/api/pull", json={"model": server.url("/tiny-model.gguf")})
            assert r.status_code == 200, r.text
            assert r.headers["content-type"].startswith("application/x-ndjson")
            lines = _lines(r)
            assert lines[0] == {"status": "pulling manifest"}
            assert lines[-2:] == [{"status": "verifying sha256 digest"}, {"status": "success"}]
            downloading = [line for line in lines if line["status"] == "downloading"]
            assert downloading and downloading[-1]["completed"] == downloading[-1]["total"] == len(GGUF)
            assert all(line["digest"].startswith("sha256:") for line in downloading)
            names = [m["name"] for m in (await client.get("/api/tags")).json()["models"]]
            assert "tiny-model" in names, names
            job = (await client.get(f"/v1/jobs/{r.headers['x-rbee-job-id']}")).json()
            assert job["operation"] == "model_download" and job["status"] == "completed"

            r = await client.request("DELETE", "/api/delete", json={"model": "tiny-model"})
            assert r.status_code == 200, r.text
            assert "tiny-model" not in [m["name"] for m in (await client.get("/api/tags")).json()["models"]]
            r = await client.request("DELETE", "/api/delete", json={"model": "tiny-model"})
            assert _error(r, 404) == "model 'tiny-model' not found"


async def test_pull_without_streaming_is_one_object(tmp_path: Path) -> None:
    with ModelServer() as server:
        server.add("/other.gguf", GGUF)
        async with with_local_hive(tmp_path) as (_, client):
            r = await client.post("/api/pull", json={"model": server.url("/other.gguf"), "stream": False})
            assert r.status_code == 200, r.text
            assert r.json() == {"status": "success"}


async def test_pull_failures_are_ollama_errors(tmp_path: Path) -> None:
    with ModelServer() as server:
        server.add("/page.gguf", b"<html>not a model</html>", content_type="text/html")
        async with with_local_hive(tmp_path) as (_, client):
            message = _error(await client.post("/api/pull", json={"model": "llama3.2"}), 400)
            assert "rbee pulls GGUF" in message and "hf:" in message and "llama3.2" in message
            r = await client.post("/api/pull", json={"model": server.url("/missing.gguf")})
            assert r.status_code >= 400 and isinstance(r.json()["error"], str), r.text
            r = await client.post("/api/pull", json={"model": server.url("/page.gguf"), "stream": False})
            assert r.status_code >= 400 and isinstance(r.json()["error"], str), r.text
            assert "stream" in _error(await client.post("/api/pull", json={"model": "hf:a/b/c.gguf", "stream": 1}), 400)


async def test_delete_and_pull_need_the_admin_token(tmp_path: Path) -> None:
    async with queen(tmp_path, token=TOKEN, user_tokens=(USER,)) as (_, client):
        await client.post("/v1/hives/heartbeat", json=_beat("alpha"), headers={"Authorization": f"Bearer {TOKEN}"})
        user = {"Authorization": f"Bearer {USER}"}
        r = await client.request("DELETE", "/api/delete", json={"model": MODEL}, headers=user)
        assert "admin token" in _error(r, 403)
        r = await client.post("/api/pull", json={"model": "hf:org/repo/m.gguf"}, headers=user)
        assert "admin token" in _error(r, 403)


async def test_delete_of_an_unknown_model_is_404(client: httpx.AsyncClient) -> None:
    await client.post("/v1/hives/heartbeat", json=_beat("alpha"))
    r = await client.request("DELETE", "/api/delete", json={"model": "nope"})
    assert _error(r, 404) == "model 'nope' not found"
    assert "model is required" in _error(await client.request("DELETE", "/api/delete", json={}), 400)


def test_without_num_predict_a_chat_runs_to_the_end_of_the_context() -> None:
    from rbee.queen import ollama

    chat = ollama._parse({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, chat=True)
    assert chat.op is not None and chat.op.to_the_context  # the worker bounds it by its context
    unlimited = ollama._parse({"model": MODEL, "prompt": "x", "options": {"num_predict": -1}}, chat=False)
    assert unlimited.op is not None and unlimited.op.to_the_context
    bounded = ollama._parse({"model": MODEL, "prompt": "x", "options": {"num_predict": 7}}, chat=False)
    assert bounded.op is not None and not bounded.op.to_the_context and bounded.op.max_tokens == 7
