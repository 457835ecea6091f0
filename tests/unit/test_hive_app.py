"""The hive app in process: its job API for model and worker operations, refusals at POST, heartbeats."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from rbee.contracts import DEFAULT_MODEL
from rbee.contracts.cluster import Heartbeat
from rbee.hive.app import HiveSettings, create_hive_app

TOKEN = "hive-test-token-0123456789"


async def run_job(client: httpx.AsyncClient, operation: dict[str, Any]) -> tuple[list[tuple[str, Any]], dict]:
    """Submit an operation and collect its events up to ``end``."""
    response = await client.post("/v1/jobs", json=operation)
    assert response.status_code == 201, response.text
    job_id = response.json()["job_id"]
    events: list[tuple[str, Any]] = []
    async with asyncio.timeout(30):
        async with aconnect_sse(client, "GET", f"/v1/jobs/{job_id}/stream") as source:
            async for sse in source.aiter_sse():
                if sse.data == "[DONE]":
                    break
                events.append((sse.event, json.loads(sse.data)))
    kinds = [kind for kind, _ in events]
    assert kinds.count("end") == 1 and kinds[-1] == "end"
    return events, events[-1][1]


def results(events: list[tuple[str, Any]]) -> list[Any]:
    return [data for kind, data in events if kind == "result"]


@pytest.fixture
def beats() -> list[Heartbeat]:
    return []


@pytest.fixture
async def client(tmp_path: Path, beats: list[Heartbeat]):
    settings = HiveSettings(
        home=tmp_path,
        port=7999,
        hive_id="test-hive",
        worker_engine="fake",
        heartbeat_interval_s=0.2,
        deliver=beats.append,
    )
    app = create_hive_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://hive") as c:
            yield c


async def test_health_and_info(client: httpx.AsyncClient, tmp_path: Path) -> None:
    assert (await client.get("/health")).json() == {"status": "ok", "component": "hive", "hive_id": "test-hive"}
    info = (await client.get("/v1/info")).json()
    assert info["component"] == "hive"
    assert info["hive_id"] == "test-hive"
    assert info["url"] == "http://127.0.0.1:7999"
    assert info["home"] == str(tmp_path)
    assert info["workers"] == 0


async def test_model_list_shows_the_bundled_model(client: httpx.AsyncClient) -> None:
    events, end = await run_job(client, {"operation": "model_list"})
    assert end["status"] == "completed"
    (result,) = results(events)
    (model,) = result["models"]
    assert model["id"] == "gemma-3-270m-q4_k_m"
    assert model["alias"] == DEFAULT_MODEL
    assert model["format"] == "gguf"
    assert model["architecture"] == "gemma3"
    assert model["quantization"] == "Q4_K_M"
    assert model["context_length"] == 32768
    assert model["size_bytes"] > 100_000_000
    assert await asyncio.to_thread(Path(model["file"]).is_file)
    narration = [data for kind, data in events if kind == "narration"]
    assert all(n["actor"] == "hive" for n in narration)
    assert "model_list" in [n["action"] for n in narration]


async def test_model_get_by_alias_and_by_id(client: httpx.AsyncClient) -> None:
    for ref in (DEFAULT_MODEL, "gemma-3-270m-q4_k_m"):
        events, end = await run_job(client, {"operation": "model_get", "model": ref})
        assert end["status"] == "completed"
        assert results(events)[0]["model"]["id"] == "gemma-3-270m-q4_k_m"


@pytest.mark.parametrize(
    "operation",
    [
        {"operation": "model_get", "model": "no-such-model"},
        {"operation": "worker_spawn", "model": "no-such-model"},
    ],
)
async def test_an_unknown_model_is_404_at_post(client: httpx.AsyncClient, operation: dict) -> None:
    response = await client.post("/v1/jobs", json=operation)
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["kind"] == "model_not_found"
    assert "no-such-model" in error["message"] and DEFAULT_MODEL in error["message"]


@pytest.mark.parametrize("operation", ["worker_stop", "worker_get"])
async def test_an_unknown_worker_is_404_at_post(client: httpx.AsyncClient, operation: str) -> None:
    response = await client.post("/v1/jobs", json={"operation": operation, "worker_id": "worker-deadbeef"})
    assert response.status_code == 404
    assert response.json()["error"]["kind"] == "worker_not_found"


async def test_infer_is_refused_with_422(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/jobs", json={"operation": "infer", "prompt": "hello"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["kind"] == "unsupported_operation"
    assert "infer" in error["message"]
    assert (await client.get("/v1/jobs")).json()["jobs"] == []  # no job was created


@pytest.mark.parametrize(
    "operation",
    [
        {"operation": "status"},
        {"operation": "queen_check"},
    ],
)
async def test_operations_the_hive_does_not_take_are_422(client: httpx.AsyncClient, operation: dict) -> None:
    response = await client.post("/v1/jobs", json=operation)
    assert response.status_code == 422
    assert response.json()["error"]["kind"] == "unsupported_operation"


async def test_malformed_operations_are_422(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/jobs", json={"operation": "worker_spawn", "device": "tpu"})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "device"


async def test_worker_list_is_empty_at_first(client: httpx.AsyncClient) -> None:
    events, end = await run_job(client, {"operation": "worker_list"})
    assert end["status"] == "completed"
    assert results(events) == [{"workers": []}]


async def test_hive_check_completes(client: httpx.AsyncClient) -> None:
    events, end = await run_job(client, {"operation": "hive_check"})
    assert end["status"] == "completed"
    assert end["error"] is None
    actions = [data["action"] for kind, data in events if kind == "narration"]
    for action in ("check_start", "check_direct", "check_nested", "check_task", "check_catalog", "check_complete"):
        assert action in actions
    assert [data["done"] for kind, data in events if kind == "progress"] == [1, 2, 3, 4]
    (result,) = results(events)
    assert result["hive"] == "ok"
    assert result["hive_id"] == "test-hive"
    assert result["models"] == 1
    assert result["devices"][0]["kind"] == "cpu"
    # Every narration of the job carries the job's id, spawned tasks included.
    job_ids = {data["job_id"] for kind, data in events if kind == "narration"}
    assert job_ids == {end["job_id"]}


async def test_heartbeats_describe_the_hive(client: httpx.AsyncClient, beats: list[Heartbeat]) -> None:
    async with asyncio.timeout(30):
        while True:
            if len(beats) >= 2:
                break
            await asyncio.sleep(0.05)
    beat = beats[0]
    assert beat.hive_id == "test-hive"
    assert beat.url == "http://127.0.0.1:7999"
    assert beat.interval_s == 0.2
    assert beat.workers == []
    assert [m.alias for m in beat.models] == [DEFAULT_MODEL]
    cpu = beat.devices[0]
    assert cpu["kind"] == "cpu" and cpu["cores"] >= 1 and cpu["memory_bytes"] > 0


async def test_a_token_is_required_when_set(tmp_path: Path) -> None:
    app = create_hive_app(HiveSettings(home=tmp_path, token=TOKEN))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://hive") as c:
            assert (await c.get("/health")).status_code == 200
            assert (await c.get("/v1/info")).status_code == 401
            assert (await c.post("/v1/jobs", json={"operation": "worker_list"})).status_code == 401
            ok = await c.get("/v1/info", headers={"Authorization": f"Bearer {TOKEN}"})
            assert ok.status_code == 200 and ok.json()["auth"] is True


async def test_an_operation_for_another_hive_is_refused_and_one_for_this_hive_runs(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/jobs", json={"operation": "model_list", "hive_id": "other-hive"})
    assert r.status_code == 404
    assert r.json()["error"]["kind"] == "hive_not_found" and "other-hive" in r.json()["error"]["message"]
    assert (await client.post("/v1/jobs", json={"operation": "model_list", "hive_id": "test-hive"})).status_code == 201
    assert (await client.post("/v1/jobs", json={"operation": "model_list"})).status_code == 201  # not addressed
