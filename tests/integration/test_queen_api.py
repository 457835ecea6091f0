"""The queen's job server in process: its operations, history, restart and refusals.

The queen app is built with ``create_queen_app`` and its lifespan run by the
test, with ``RBEE_HOME`` a temporary directory; requests go through
``httpx.ASGITransport`` (which hands back a stream once it is complete).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from cluster import StallingHive
from rbee.contracts.events import JobStatus
from rbee.contracts.operations import Infer
from rbee.jobs.job import Job
from rbee.queen.app import QueenSettings, create_queen_app
from rbee.queen.store import JobStore

TOKEN = "queen-test-token-0123456789"


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


def parse_frames(text: str) -> list[dict[str, Any]]:
    frames = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        if block.strip():
            frame: dict[str, Any] = {}
            for line in block.split("\n"):
                name, _, value = line.partition(":")
                frame[name or "comment"] = value.removeprefix(" ")
            frames.append(frame)
    return frames


async def read_stream(client: httpx.AsyncClient, job_id: str) -> list[dict[str, Any]]:
    async with asyncio.timeout(30), client.stream("GET", f"/v1/jobs/{job_id}/stream") as response:
        assert response.status_code == 200
        return parse_frames((await response.aread()).decode())


def check_contract(frames: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """ids 1, 2, 3 ...; one-line JSON data; exactly one end, last; then [DONE]. Returns (events, end data)."""
    assert frames[-1] == {"data": "[DONE]"}
    events = [f for f in frames if "event" in f]
    assert [int(f["id"]) for f in events] == list(range(1, len(events) + 1))
    for f in events:
        f["json"] = json.loads(f["data"])
    assert [f["event"] for f in events].count("end") == 1 and events[-1]["event"] == "end"
    return events, events[-1]["json"]


async def run(client: httpx.AsyncClient, op: dict[str, Any]) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    response = await client.post("/v1/jobs", json=op)
    assert response.status_code == 201, response.text
    job_id = response.json()["job_id"]
    events, end = check_contract(await read_stream(client, job_id))
    return job_id, events, end


# -- operations the queen runs itself ---------------------------------------------------


async def test_queen_check_narrates_every_path_and_completes(client: httpx.AsyncClient) -> None:
    job_id, events, end = await run(client, {"operation": "queen_check"})
    assert end["status"] == "completed" and end["error"] is None
    narration = [e["json"] for e in events if e["event"] == "narration"]
    assert all(n["job_id"] == job_id for n in narration)
    actions = [n["action"] for n in narration]
    assert {"check_start", "check_direct", "check_nested", "check_task", "check_complete"} <= set(actions)
    assert sorted(n["task"] for n in narration if n["action"] == "check_task") == [0, 1, 2]
    assert [n["depth"] for n in narration if n["action"] == "check_nested"] == [0, 1, 2]
    assert any(e["event"] == "progress" for e in events)
    result = next(e["json"] for e in events if e["event"] == "result")
    assert result["queen"] == "ok"


async def test_status_reports_the_cluster_as_a_result(client: httpx.AsyncClient) -> None:
    _, events, end = await run(client, {"operation": "status"})
    assert end["status"] == "completed"
    result = next(e["json"] for e in events if e["event"] == "result")
    assert result["hives"] == [] and result["workers"] == []


async def test_hive_list_with_no_hives(client: httpx.AsyncClient) -> None:
    _, events, end = await run(client, {"operation": "hive_list"})
    assert end["status"] == "completed"
    assert next(e["json"] for e in events if e["event"] == "result") == {"hives": []}


# -- refused at POST, never hanging ----------------------------------------------------------


async def test_hive_operation_for_an_unknown_hive_is_404_at_post(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/jobs", json={"operation": "model_download", "source": "https://x/m.gguf"})
    assert response.status_code == 404
    assert response.json()["error"]["kind"] == "hive_not_found"
    assert (await client.get("/v1/jobs")).json()["jobs"] == []


async def test_infer_with_no_hive_is_refused_at_post(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/jobs", json={"operation": "infer", "prompt": "hi"})
    assert response.status_code in (404, 503)
    assert response.json()["error"]["kind"] in ("no_worker", "model_not_found")


async def test_a_heartbeat_body_that_is_not_utf8_is_422_naming_the_body(client: httpx.AsyncClient) -> None:
    headers = {"content-type": "application/json"}
    response = await client.post("/v1/hives/heartbeat", content=b"#\xfft", headers=headers)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["kind"] == "invalid_request" and response.json()["error"]["field"] == "body"


async def test_invalid_operation_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/jobs", json={"operation": "infer", "prompt": "hi", "temperature": 9})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "temperature"


async def test_forward_to_a_hive_that_is_gone_ends_failed(client: httpx.AsyncClient) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]  # closed again: nothing listens there
    beat = {"hive_id": "gone", "url": f"http://127.0.0.1:{dead_port}"}
    assert (await client.post("/v1/hives/heartbeat", json=beat)).status_code == 200
    # The queen hands the operation to the hive during the POST, so a hive that
    # is gone is the POST's answer, and no job is left behind.
    before = len((await client.get("/v1/jobs")).json()["jobs"])
    response = await client.post("/v1/jobs", json={"operation": "worker_list", "hive_id": "gone"})
    assert response.status_code == 502
    assert response.json()["error"]["kind"] == "hive_unreachable"
    assert "gone" in response.json()["error"]["message"]
    assert len((await client.get("/v1/jobs")).json()["jobs"]) == before


async def test_an_operation_pinned_to_an_offline_hive_is_409_at_post(tmp_path: Path) -> None:
    async with queen(tmp_path, heartbeat_interval_s=0.05) as (_, client):
        models = [{"id": "gemma3-270m", "path": "/m.gguf", "size_bytes": 1}]
        beat = {"hive_id": "old", "url": "http://127.0.0.1:9", "models": models}
        assert (await client.post("/v1/hives/heartbeat", json=beat)).status_code == 200
        await asyncio.sleep(0.3)  # three intervals without a heartbeat: stale
        before = len((await client.get("/v1/jobs")).json()["jobs"])
        for op in (
            {"operation": "infer", "prompt": "hi", "hive_id": "old"},
            {"operation": "worker_list", "hive_id": "old"},
        ):
            response = await client.post("/v1/jobs", json=op)
            assert response.status_code == 409, response.text
            error = response.json()["error"]
            assert error["kind"] == "hive_offline" and error["message"].startswith("hive_id: ")
            assert "'old' has not sent a heartbeat" in error["message"]
        assert len((await client.get("/v1/jobs")).json()["jobs"]) == before


# -- cancel and lookups -------------------------------------------------------------------------


async def test_cancel_of_a_finished_job_is_409_with_its_state(client: httpx.AsyncClient) -> None:
    job_id, _, _ = await run(client, {"operation": "status"})
    response = await client.delete(f"/v1/jobs/{job_id}")
    assert response.status_code == 409
    assert response.json()["status"] == "completed"


@pytest.mark.parametrize("method,suffix", [("GET", ""), ("DELETE", ""), ("GET", "/stream")])
async def test_unknown_job_is_404(client: httpx.AsyncClient, method: str, suffix: str) -> None:
    response = await client.request(method, f"/v1/jobs/job-00000000-0000-0000-0000-000000000000{suffix}")
    assert response.status_code == 404


async def test_concurrent_posts_get_unique_ids(client: httpx.AsyncClient) -> None:
    async def post() -> str:
        response = await client.post("/v1/jobs", json={"operation": "status"})
        return str(response.json()["job_id"])

    ids = await asyncio.gather(*(post() for _ in range(100)))
    assert len(set(ids)) == 100


# -- history -----------------------------------------------------------------------------------------


async def test_finished_job_outlives_the_registry_in_the_history(tmp_path: Path) -> None:
    async with queen(tmp_path, job_ttl_s=0) as (app, client):
        job_id, events, _ = await run(client, {"operation": "queen_check"})
        app.state.queen.registry.sweep()
        assert app.state.queen.registry.find(job_id) is None
        record = (await client.get(f"/v1/jobs/{job_id}")).json()
        assert record["status"] == "completed" and record["operation"] == "queen_check"
        replayed, _ = check_contract(await read_stream(client, job_id))
        assert [(e["id"], e["event"], e["data"]) for e in replayed] == [
            (e["id"], e["event"], e["data"]) for e in events
        ]
        conflict = await client.delete(f"/v1/jobs/{job_id}")
        assert conflict.status_code == 409 and conflict.json()["status"] == "completed"


async def test_job_history_survives_a_restart(tmp_path: Path) -> None:
    async with queen(tmp_path) as (_, client):
        ids = [(await run(client, {"operation": "status"}))[0] for _ in range(3)]
    async with queen(tmp_path) as (_, client):
        listed = (await client.get("/v1/jobs")).json()["jobs"]
        assert [j["job_id"] for j in listed] == ids[::-1]
        assert all(j["status"] == "completed" for j in listed)
        record = (await client.get(f"/v1/jobs/{ids[0]}")).json()
        assert record["status"] == "completed"


async def test_jobs_running_at_a_crash_are_failed_queen_restarted_at_start(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "queen.sqlite")
    job = Job("job-11111111-2222-3333-4444-555555555555", Infer(prompt="long"))
    store.created(job)
    job.transition(JobStatus.RUNNING)
    store.close()  # the queen died with the job running
    async with queen(tmp_path) as (_, client):
        record = (await client.get(f"/v1/jobs/{job.id}")).json()
    assert record["status"] == "failed"
    assert record["error"]["kind"] == "queen_restarted"


async def test_live_jobs_end_cancelled_when_the_queen_stops(tmp_path: Path) -> None:
    with StallingHive() as hang:
        async with queen(tmp_path) as (_, client):
            beat = {"hive_id": "slow", "url": hang.url}
            await client.post("/v1/hives/heartbeat", json=beat)
            job_id = (await client.post("/v1/jobs", json={"operation": "hive_check", "hive_id": "slow"})).json()[
                "job_id"
            ]
            await asyncio.sleep(0.1)
            assert (await client.get(f"/v1/jobs/{job_id}")).json()["status"] == "running"
        async with queen(tmp_path) as (_, client):
            record = (await client.get(f"/v1/jobs/{job_id}")).json()
        assert record["status"] == "cancelled"


# -- auth ------------------------------------------------------------------------------------------------


async def test_queen_with_a_token_requires_bearer_everywhere_but_health(tmp_path: Path) -> None:
    async with queen(tmp_path, token=TOKEN) as (app, client):
        assert (await client.get("/health")).status_code == 200
        # A hive joining has no token yet: its one-time invite, in the body, is the credential.
        assert (await client.post("/v1/hives/join", json={"invite": "x" * 20, "hive_id": "h"})).status_code == 403
        paths = [p for p in app.openapi()["paths"] if p not in ("/health", "/v1/hives/join")]
        assert "/v1/jobs" in paths and "/v1/hives/heartbeat" in paths
        for path in paths:
            for method in app.openapi()["paths"][path]:
                url = path.replace("{job_id}", "job-x")
                assert (await client.request(method, url)).status_code == 401, (method, path)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        response = await client.post("/v1/jobs", json={"operation": "status"}, headers=headers)
        assert response.status_code == 201


async def test_hive_that_never_answers_is_a_502_at_post_not_a_hang(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rbee.queen.router

    monkeypatch.setattr(rbee.queen.router, "PRESUBMIT_TIMEOUT_S", 0.5)
    with socket.socket() as hang:
        hang.bind(("127.0.0.1", 0))
        hang.listen(8)  # accepts connections, never answers
        beat = {"hive_id": "mute", "url": f"http://127.0.0.1:{hang.getsockname()[1]}"}
        assert (await client.post("/v1/hives/heartbeat", json=beat)).status_code == 200
        async with asyncio.timeout(10):
            response = await client.post("/v1/jobs", json={"operation": "model_list", "hive_id": "mute"})
    assert response.status_code == 502
    assert "did not take the operation" in response.json()["error"]["message"]
